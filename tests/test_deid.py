"""Tests of medsearch.deid: the PS3.15 policy table, the site key, and what leaves a header."""

from __future__ import annotations

import ast
import csv
import datetime as dt
import doctest
import re
import stat
from dataclasses import fields, replace
from pathlib import Path

import pydicom
import pydicom.examples
import pytest
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from medsearch import deid
from medsearch.deid import (
    ATTRIBUTE_ACTIONS,
    CASE_FIELDS,
    CASE_METADATA_KEYS,
    DERIVED_FIELDS,
    OPTION_ACTIONS,
    STRICTER_THAN_PROFILE,
    DeidOptions,
    SiteKey,
    age_band,
    case_id,
    case_metadata,
    patient_pseudonym,
    profile_action,
)
from medsearch.errors import InvalidStudyError, KeyFileError

# Several cases set invalid values on purpose; pydicom warns about each as it is set.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
]

DATA = Path(__file__).parent / "data"
KEY_HEX = "5e" * 16 + "a7" * 16  # a fixed test key: results do not change between runs
OTHER_KEY_HEX = "c3" * 32

# --------------------------------------------------------------------------------------------
# Tables of cases
# --------------------------------------------------------------------------------------------

AGE_BAND_CASES = [
    ("060Y", "60-69"),
    ("089Y", "80-89"),
    ("090Y", "90+"),
    ("104Y", "90+"),
    ("010Y", "10-19"),
    ("009Y", "1-9"),
    ("000Y", "0"),
    ("006M", "0"),
    ("011M", "0"),
    ("012M", "1-9"),
    ("003M", "0"),
    ("002W", "0"),
    ("052W", "0"),
    ("010D", "0"),
    ("366D", "1-9"),
    (" 060Y ", "60-69"),
    (45, "40-49"),
    (0, "0"),
    (90, "90+"),
    ("", None),
    ("abc", None),
    ("60Y", None),
    ("060", None),
    ("060X", None),
    ("-60Y", None),
    (None, None),
    (-1, None),
    (True, None),
    (60.5, None),
]

# Each option column of the transcribed table, and the options that turn on just that option.
_NONE = DeidOptions(
    retain_device_identity=False,
    retain_patient_characteristics=False,
    longitudinal_dates=False,
    clean_descriptors=False,
)
OPTION_COLUMNS = {
    "basic_action": _NONE,
    "retain_patient_chars_action": replace(_NONE, retain_patient_characteristics=True),
    "retain_device_action": replace(_NONE, retain_device_identity=True),
    "retain_long_modif_dates_action": replace(_NONE, longitudinal_dates=True),
    "clean_desc_action": replace(_NONE, clean_descriptors=True),
}
OPTION_SETS = [
    DeidOptions(),
    _NONE,
    DeidOptions(True, True, True, True),
    *(replace(_NONE, **{f.name: True}) for f in fields(DeidOptions)),
]
OPTION_IDS = [
    "default",
    "none",
    "all",
    *(f"only-{f.name}" for f in fields(DeidOptions)),
]

# How much each action removes: an action may differ from the profile's only by removing more.
STRICTNESS = {"K": 0, "C": 1, "U": 1, "D": 2, "Z": 2, "X": 2}


def _read_profile_table() -> list[dict[str, str]]:
    with open(DATA / "ps3_15_annex_e_subset.csv", newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


PROFILE_ROWS = _read_profile_table()
PROFILE_CASES = [(row, column) for row in PROFILE_ROWS for column in OPTION_COLUMNS]
PROFILE_IDS = [f"{row['keyword']}-{column}" for row, column in PROFILE_CASES]

# Values seeded into the synthetic header; none may appear in any case_metadata output.
LEAK_NAME = "Zzyzx^Leakcheck"
SECRETS = [
    "Zzyzx",
    "Leakcheck",
    "LEAK-ID-9931",
    "9931",
    "LEAK-ISSUER-Q",
    "Quxley",
    "Wobbleton",
    "Frobisher",
    "Leakcheck Memorial",
    "17 Quxley Lane",
    "LEAKSTATION01",
    "SN-LEAK-77321",
    "ACC-LEAK-5521",
    "SID-LEAK-88",
    "19530316",
    "1953-03-16",
    "20230315",
    "2023-03-15",
    "20230316",
    "2023-03-16",
    "101502",
    "10:15:02",
    "1.2.826.0.1.3680043.8.498.101",
    "1.2.826.0.1.3680043.8.498.102",
    "1.2.826.0.1.3680043.8.498.103",
    "1.2.826.0.1.3680043.8.498.104",
    "Private",
    "Nested",
]

# (BodyPartExamined, StudyDescription, clean_descriptors) -> body_part
BODY_PART_CASES = [
    ("CHEST", None, False, "CHEST"),
    ("chest", None, False, "CHEST"),
    ("ABDOMEN_PELVIS", None, False, "ABDOMEN PELVIS"),
    ("C-SPINE", None, False, None),
    ("HEAD 2", None, False, None),
    ("A VERY LONG BODY PART", None, False, None),
    ("", "CT CHEST", False, None),
    (None, "CT CHEST", False, None),
    ("C-SPINE", None, True, "CSPINE"),
    ("chest", None, True, "CHEST"),
    (None, "CT Thorax w/o contrast for Zzyzx", True, "CHEST"),
    (None, "CT CHEST ABDOMEN PELVIS", True, "CHESTABDPELVIS"),
    (None, "MR Head and neck", True, "HEADNECK"),
    (None, "CT Liver and chest", True, None),
    ("SMITH", "Dr Leakcheck's protocol", True, None),
    ("SMITH", "abdomen", True, "ABDOMEN"),
]

# (PatientAge, PatientBirthDate, StudyDate) -> age_band
AGE_FROM_HEADER_CASES = [
    ("067Y", "19530316", "20230315", "60-69"),  # PatientAge wins
    (None, "19530316", "20230315", "60-69"),  # 69 the day before the birthday
    (None, "19530315", "20230315", "70-79"),  # 70 on it
    (None, "20230101", "20230315", "0"),
    (None, "2023.01.01", "2023.03.15", "0"),  # old dotted form
    ("abc", "19530315", "20230315", "70-79"),  # an invalid age falls back on the dates
    (None, "20240101", "20230315", None),  # born after the study
    (None, "", "20230315", None),
    (None, "19531340", "20230315", None),  # no 13th month
    (None, "19530315", None, None),
]

# (PatientSize, PatientWeight) -> (patient_size_m, patient_weight_kg)
SIZE_WEIGHT_CASES = [
    ("1.83", "81.7", 1.8, 80.0),
    ("1.85", "82.5", 1.9, 85.0),  # half up
    ("1.549", "82.4", 1.5, 80.0),
    ("0", "0", None, None),  # zero is what scanners write for unknown
    ("-1.7", "-70", None, None),
    ("170", "900", None, None),  # centimetres in a metres field; not a weight
    (None, None, None, None),
]

FORBIDDEN_IMPORTS = {"torch", "monai", "faiss", "pandas", "numpy"}

# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_key_environment(monkeypatch, tmp_path):
    """Keep the user's real key and environment out of every test."""
    monkeypatch.delenv("MEDSEARCH_SITE_KEY", raising=False)
    monkeypatch.delenv("MEDSEARCH_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def key(tmp_path) -> SiteKey:
    path = tmp_path / "fixed.key"
    path.write_text(KEY_HEX + "\n")
    path.chmod(0o600)
    return SiteKey.load(path)


@pytest.fixture
def other_key(tmp_path) -> SiteKey:
    path = tmp_path / "other.key"
    path.write_text(OTHER_KEY_HEX)
    path.chmod(0o600)
    return SiteKey.load(path)


def _synthetic_header() -> Dataset:
    """A CT header seeded with distinctive identifying values in every place they hide."""
    ds = Dataset()
    ds.PatientName = LEAK_NAME
    ds.PatientID = "LEAK-ID-9931"
    ds.IssuerOfPatientID = "LEAK-ISSUER-Q"
    ds.OtherPatientIDs = "LEAK-ID-9931-B"
    ds.PatientBirthDate = "19530316"
    ds.PatientAddress = "17 Quxley Lane, Leakcheck Town"
    ds.PatientSex = "M"
    ds.PatientAge = "069Y"
    ds.PatientSize = "1.83"
    ds.PatientWeight = "81.7"
    ds.EthnicGroup = "Leakcheck"
    ds.StudyDate = "20230315"
    ds.StudyTime = "101502"
    ds.SeriesDate = "20230316"
    ds.ContentDate = "20230316"
    ds.AcquisitionDateTime = "20230316101502"
    ds.AccessionNumber = "ACC-LEAK-5521"
    ds.StudyID = "SID-LEAK-88"
    ds.InstitutionName = "Leakcheck Memorial Hospital"
    ds.InstitutionAddress = "17 Quxley Lane"
    ds.InstitutionalDepartmentName = "Leakcheck Radiology"
    ds.ReferringPhysicianName = "Quxley^Refdoc"
    ds.PerformingPhysicianName = "Wobbleton^Perf"
    ds.OperatorsName = "Frobisher^Op"
    ds.PhysiciansOfRecord = "Quxley^Record"
    ds.StationName = "LEAKSTATION01"
    ds.DeviceSerialNumber = "SN-LEAK-77321"
    ds.StudyDescription = "CT CHEST for Zzyzx Leakcheck"
    ds.SeriesDescription = "AX 5mm Leakcheck"
    ds.ProtocolName = "Leakcheck protocol CHEST"
    ds.ImageComments = "Patient Zzyzx asked for Dr Quxley"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.101"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.102"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.103"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.104"
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "ACME MEDICAL"
    ds.ManufacturerModelName = "Scanotron 9000"
    ds.PhotometricInterpretation = "MONOCHROME2"
    block = ds.private_block(0x0009, "LEAKCHECK CREATOR", create=True)
    block.add_new(0x10, "LO", "Zzyzx^Private")
    item = Dataset()
    item.PatientName = "Zzyzx^Nested"
    item.RequestedProcedureDescription = "Nested request for Leakcheck"
    ds.RequestAttributesSequence = Sequence([item])
    return ds


class _RecordingDataset(Dataset):
    """A dataset that records which attributes are looked up, by keyword or by tag."""

    def __init__(self, source: Dataset) -> None:
        super().__init__(source)
        self._reads: list[object] = []

    def __getattr__(self, name: str):
        if tag_for_keyword(name) is not None:
            self._reads.append(name)
        return super().__getattr__(name)

    def __getitem__(self, key):
        # Reads by keyword come here too, as tags; record those under their keyword.
        name = keyword_for_tag(key) if isinstance(key, int) else ""
        self._reads.append(name or key)
        return super().__getitem__(key)


def _allowed_reads(options: DeidOptions) -> set[str]:
    allowed = {
        kw
        for kw in ATTRIBUTE_ACTIONS
        if isinstance(kw, str) and profile_action(kw, options) in "KC"
    }
    allowed |= {"PatientID", "IssuerOfPatientID", "StudyInstanceUID"}  # the patient pseudonym
    if options.retain_patient_characteristics:
        allowed |= {"PatientBirthDate", "StudyDate"}  # an age when PatientAge is missing
    return allowed


# --------------------------------------------------------------------------------------------
# Age bands
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), AGE_BAND_CASES)
def test_age_band(value, expected):
    assert age_band(value) == expected


def test_docstring_examples_run():
    assert doctest.testmod(deid).failed == 0


# --------------------------------------------------------------------------------------------
# The policy against PS3.15 Table E.1-1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "column"), PROFILE_CASES, ids=PROFILE_IDS)
def test_profile_action_agrees_with_annex_e(row, column):
    standard = row[column].split("/")[0]  # of "X/Z/D" medsearch takes the strictest, the first
    ours = profile_action(row["keyword"], OPTION_COLUMNS[column])
    if ours != standard:
        assert row["keyword"] in STRICTER_THAN_PROFILE, f"{row['keyword']}: {ours} vs {row[column]}"
        assert STRICTNESS[ours] > STRICTNESS[standard]


@pytest.mark.parametrize("row", PROFILE_ROWS, ids=[r["keyword"] for r in PROFILE_ROWS])
def test_transcribed_row_is_consistent(row):
    group, element = (int(x, 16) for x in row["tag"].strip("()").split(","))
    assert tag_for_keyword(row["keyword"]) == (group << 16) | element
    assert ATTRIBUTE_ACTIONS[row["keyword"]] == ATTRIBUTE_ACTIONS[(group, element)]
    assert profile_action((group, element), _NONE) == profile_action(row["keyword"], _NONE)
    if row["in_table_e1_1"] == "no":
        assert {row[c] for c in OPTION_COLUMNS} == {"K"}


def test_every_listed_attribute_is_in_the_transcribed_table():
    transcribed = {row["keyword"] for row in PROFILE_ROWS}
    listed = {k for k in ATTRIBUTE_ACTIONS if isinstance(k, str)}
    listed |= {k for table in OPTION_ACTIONS.values() for k in table}
    assert listed <= transcribed


@pytest.mark.parametrize("keyword", sorted(STRICTER_THAN_PROFILE))
def test_each_stated_deviation_is_used(keyword):
    row = next(r for r in PROFILE_ROWS if r["keyword"] == keyword)
    assert any(
        profile_action(keyword, options) != row[column].split("/")[0]
        for column, options in OPTION_COLUMNS.items()
    )


def test_option_tables_match_option_fields():
    assert set(OPTION_ACTIONS) == {f.name for f in fields(DeidOptions)}


@pytest.mark.parametrize(
    ("keyword", "options", "expected"),
    [
        ("PatientName", DeidOptions(True, True, True, True), "Z"),
        ("PatientSex", DeidOptions(), "K"),
        ("PatientSex", _NONE, "Z"),
        ("ManufacturerModelName", DeidOptions(), "K"),
        ("ManufacturerModelName", _NONE, "X"),
        ("DeviceSerialNumber", DeidOptions(), "X"),
        ("StationName", DeidOptions(), "X"),
        ("StudyDate", DeidOptions(longitudinal_dates=True), "C"),
        ("SeriesDate", DeidOptions(longitudinal_dates=True), "X"),
        ("StudyDescription", DeidOptions(clean_descriptors=True), "C"),
        ("StudyInstanceUID", DeidOptions(), "U"),
        ("PixelSpacing", DeidOptions(), "X"),  # not listed: removed
        ((0x0009, 0x1010), DeidOptions(), "X"),  # private
        ((0x0010, 0x0010), _NONE, "Z"),
    ],
)
def test_profile_action_examples(keyword, options, expected):
    assert profile_action(keyword, options) == expected


@pytest.mark.parametrize(
    ("keyword", "message"),
    [
        ("PatientNmae", "not a DICOM keyword"),
        ("", "not a DICOM keyword"),
        ((0x0010,), "not a \\(group, element\\) pair"),
        (("0010", "0010"), "not a \\(group, element\\) pair"),
    ],
)
def test_profile_action_rejects_unknown_names(keyword, message):
    with pytest.raises(ValueError, match=message):
        profile_action(keyword, DeidOptions())


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_every_emitted_field_comes_from_a_kept_attribute(options, key):
    row = case_metadata(_synthetic_header(), key=key, options=options)
    assert tuple(row) == CASE_METADATA_KEYS == tuple(CASE_FIELDS)
    for name, value in row.items():
        if value is None or name in DERIVED_FIELDS:
            continue
        actions = {profile_action(kw, options) for kw in CASE_FIELDS[name]}
        assert actions & {"K", "C"}, f"{name} came from attributes with actions {actions}"


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_reads_only_allowed_attributes(options, key):
    header = _RecordingDataset(_synthetic_header())
    case_metadata(header, key=key, options=options)
    assert header._reads, "the recorder saw no reads; the test would prove nothing"
    assert set(header._reads) <= _allowed_reads(options)


def test_module_imports_only_lower_layers():
    tree = ast.parse(Path(deid.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    roots = {name.split(".")[0] for name in imported}
    assert not roots & FORBIDDEN_IMPORTS
    assert {name for name in imported if name.startswith("medsearch")} <= {"medsearch.errors"}


# --------------------------------------------------------------------------------------------
# The site key
# --------------------------------------------------------------------------------------------


def test_create_writes_private_key_and_reload_agrees(tmp_path):
    path = tmp_path / "keys" / "site.key"
    created = SiteKey.load(path, create=True)
    assert created.created and created.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["site.key"]  # no temporary file left

    again = SiteKey.load(path, create=True)
    assert not again.created
    assert case_id(again, "1.2.3", "1.2.3.4") == case_id(created, "1.2.3", "1.2.3.4")
    assert again.check_value() == created.check_value()


def test_default_path_follows_xdg_config_home(tmp_path, monkeypatch):
    created = SiteKey.load(create=True)
    assert created.path == tmp_path / "xdg" / "medsearch" / "site.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    home_key = SiteKey.load(create=True)
    assert home_key.path == tmp_path / "home" / ".config" / "medsearch" / "site.key"
    assert home_key.check_value() != created.check_value()


def test_key_file_environment_variable(tmp_path, monkeypatch, key):
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(tmp_path / "fixed.key"))
    loaded = SiteKey.load()
    assert loaded.path == tmp_path / "fixed.key"
    assert loaded.check_value() == key.check_value()


def test_site_key_environment_variable(monkeypatch, key):
    monkeypatch.setenv("MEDSEARCH_SITE_KEY", KEY_HEX)
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", "/nonexistent/never-read.key")
    loaded = SiteKey.load()
    assert loaded.path is None and not loaded.created
    assert case_id(loaded, "1.2.3", "1.2.3.4") == case_id(key, "1.2.3", "1.2.3.4")
    assert "from environment" in repr(loaded)


def test_same_key_same_ids_other_key_other_ids(key, other_key, tmp_path):
    same = SiteKey.load(tmp_path / "fixed.key")
    assert case_id(key, "1.2.3", "1.2.3.4") == case_id(same, "1.2.3", "1.2.3.4")
    assert case_id(key, "1.2.3", "1.2.3.4") != case_id(other_key, "1.2.3", "1.2.3.4")
    assert key.check_value() != other_key.check_value()


@pytest.mark.parametrize(
    ("content", "setup"),
    [
        (None, "missing"),
        ("not a key\n", "file"),
        ("abcd" * 8, "file"),  # 16 bytes: too short
        ("5e" * 31 + "5", "file"),  # odd number of digits
        ("zz" * 32, "file"),
        ("", "file"),
        ("\xff\xfe", "binary"),
        (None, "directory"),
    ],
)
def test_bad_key_files_raise(tmp_path, content, setup):
    path = tmp_path / "site.key"
    if setup == "file":
        path.write_text(content)
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00")
    elif setup == "directory":
        path.mkdir()
    message = {
        "missing": r"site\.key does not exist; point MEDSEARCH_KEY_FILE .* create=True",
        "file": r"site\.key is not a hex key of at least 32 bytes; restore the original",
        "binary": r"site\.key is not a hex key",
        "directory": r"Cannot read site key file .*site\.key",
    }[setup]
    with pytest.raises(KeyFileError, match=message):
        SiteKey.load(path)
    if setup == "file":
        assert path.read_text() == content  # never replaced by a new key


def test_missing_default_key_names_the_path(tmp_path):
    with pytest.raises(
        KeyFileError, match=re.escape(str(tmp_path / "xdg" / "medsearch" / "site.key"))
    ):
        SiteKey.load()


@pytest.mark.parametrize("value", ["abcd", "not hex at all", "5e" * 31])
def test_bad_environment_key_raises(monkeypatch, value):
    monkeypatch.setenv("MEDSEARCH_SITE_KEY", value)
    with pytest.raises(
        KeyFileError, match="MEDSEARCH_SITE_KEY is not a hex key of at least 32 bytes"
    ) as info:
        SiteKey.load()
    assert value not in str(info.value)


def test_create_in_unwritable_place_raises(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match=r"Cannot create site key file .*a-file/site\.key"):
        SiteKey.load(blocker / "site.key", create=True)


def test_key_is_never_printed(tmp_path, key):
    created = SiteKey.load(tmp_path / "new.key", create=True)
    secret = (tmp_path / "new.key").read_text().strip()
    for k, hex_key in ((created, secret), (key, KEY_HEX)):
        for text in (repr(k), str(k), f"{k}", repr([k])):
            assert hex_key not in text and hex_key.upper() not in text
            assert hex_key[:16] not in text
        assert k.check_value() in repr(k)
    assert repr(key) == f"SiteKey(path={str(tmp_path / 'fixed.key')!r}, check={key.check_value()})"


def test_pseudonym_format_and_encoding(key):
    assert re.fullmatch(r"c-[0-9a-f]{16}", key.pseudonym("1.2", "3.4", kind="case"))
    assert re.fullmatch(r"p-[0-9a-f]{16}", key.pseudonym("x", kind="patient"))
    assert re.fullmatch(r"[0-9a-f]{16}", key.check_value())
    # The encoding is unambiguous: moving a boundary or the kind changes the result.
    assert key.pseudonym("ab", "c", kind="case") != key.pseudonym("a", "bc", kind="case")
    assert key.pseudonym("a", "", kind="case") != key.pseudonym("a", kind="case")
    assert key.pseudonym("a", kind="case")[2:] != key.pseudonym("a", kind="cases")[2:]


@pytest.mark.parametrize(
    ("parts", "kind", "error", "message"),
    [
        (("a",), "", ValueError, "lowercase identifier"),
        (("a",), "Case", ValueError, "lowercase identifier"),
        (("a",), "case id", ValueError, "lowercase identifier"),
        ((None,), "case", TypeError, "must be str, got NoneType"),
        ((b"1.2",), "case", TypeError, "must be str, got bytes"),
    ],
)
def test_pseudonym_rejects_bad_input(key, parts, kind, error, message):
    with pytest.raises(error, match=message):
        key.pseudonym(*parts, kind=kind)


def test_date_offsets_are_keyed_bounded_and_never_zero(key, other_key):
    offsets = [key.date_offset_days(f"p-{i:016x}") for i in range(2000)]
    assert all(-365 <= d <= 365 and d != 0 for d in offsets)
    assert min(offsets) < -300 and max(offsets) > 300  # spread over the range
    assert offsets == [key.date_offset_days(f"p-{i:016x}") for i in range(2000)]
    assert offsets != [other_key.date_offset_days(f"p-{i:016x}") for i in range(2000)]


def test_case_id(key):
    base = case_id(key, "1.2.3", "1.2.3.4")
    assert base.startswith("c-")
    assert case_id(key, "1.2.3", "1.2.3.4", part="1") != base
    assert case_id(key, "1.2.3 ", "1.2.3.4\x00") == base  # DICOM padding is not part of a UID
    assert case_id(key, "1.2.3", "1.2.3.5") != base


@pytest.mark.parametrize(("study", "series"), [("", "1.2"), ("1.2", ""), (" ", "1.2")])
def test_case_id_needs_both_uids(key, study, series):
    with pytest.raises(InvalidStudyError, match="needs a StudyInstanceUID and a SeriesInstanceUID"):
        case_id(key, study, series)


def test_patient_pseudonym(key):
    header = _synthetic_header()
    first = patient_pseudonym(key, header)
    assert first.startswith("p-")

    other_issuer = _synthetic_header()
    other_issuer.IssuerOfPatientID = "ANOTHER-HOSPITAL"
    assert patient_pseudonym(key, other_issuer) != first

    no_id = _synthetic_header()
    no_id.PatientID = ""
    fallback = patient_pseudonym(key, no_id)
    assert fallback.startswith("p-") and fallback != first
    # A patient whose ID is some study's UID must not share that study's fallback pseudonym.
    uid_as_id = _synthetic_header()
    uid_as_id.PatientID = no_id.StudyInstanceUID
    uid_as_id.IssuerOfPatientID = ""
    assert patient_pseudonym(key, uid_as_id) != fallback


def test_patient_pseudonym_needs_an_id_or_a_study(key):
    header = Dataset()
    header.PatientName = LEAK_NAME
    header.PatientID = ""
    with pytest.raises(
        InvalidStudyError, match="neither a PatientID nor a StudyInstanceUID"
    ) as info:
        patient_pseudonym(key, header)
    assert "Zzyzx" not in str(info.value)


# --------------------------------------------------------------------------------------------
# case_metadata
# --------------------------------------------------------------------------------------------

EXAMPLE_CASES = [
    (
        "ct",
        {
            "modality": "CT",
            "sex": "O",
            "age_band": "0",
            "patient_weight_kg": None,  # the file says 0
            "manufacturer": "GE MEDICAL SYSTEMS",
            "model": "RHAPSODE",
            "sop_class": "CT Image Storage",
            "photometric": "MONOCHROME2",
            "study_date_shifted": None,
        },
    ),
    (
        "mr",
        {
            "modality": "MR",
            "sex": "F",
            "age_band": None,
            "patient_weight_kg": 80.0,
            "manufacturer": "TOSHIBA_MEC",
            "model": "MRT50H1",
            "sop_class": "MR Image Storage",
            "photometric": "MONOCHROME2",
            "study_date_shifted": None,
        },
    ),
]


@pytest.mark.parametrize(("name", "expected"), EXAMPLE_CASES, ids=[c[0] for c in EXAMPLE_CASES])
def test_case_metadata_on_pydicom_examples(name, expected, key):
    header = getattr(pydicom.examples, name)
    row = case_metadata(header, key=key)
    assert tuple(row) == CASE_METADATA_KEYS
    assert {k: row[k] for k in expected} == expected
    assert row["patient"] == patient_pseudonym(key, header)


@pytest.mark.parametrize("name", ["ct", "mr"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_pydicom_examples_leak_nothing(name, options, key):
    header = getattr(pydicom.examples, name)
    text = repr(case_metadata(header, key=key, options=options))
    identifying = [
        str(header.PatientName),
        str(header.PatientID),
        header.StudyInstanceUID,
        header.SeriesInstanceUID,
        header.SOPInstanceUID,
        header.StudyDate,
        dt.datetime.strptime(header.StudyDate, "%Y%m%d").date().isoformat(),
    ]
    for value in identifying:
        assert str(value) not in text
    row = case_metadata(header, key=key, options=options)
    # The MR file's institution is its maker's name, which retain_device_identity may keep as the
    # manufacturer: check that no field is the institution, rather than that the text lacks it.
    for keyword in ("InstitutionName", "ReferringPhysicianName"):
        if header.get(keyword):
            assert str(header.get(keyword)) not in row.values()


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
def test_synthetic_header_leaks_nothing(options, key):
    header = _synthetic_header()
    assert "Zzyzx^Private" in repr(header) and "Zzyzx^Nested" in repr(header)  # the bait is there
    text = repr(case_metadata(header, key=key, options=options)).lower()
    for secret in SECRETS:
        assert secret.lower() not in text, secret


def test_options_toggle_fields(key):
    header = _synthetic_header()
    everything = case_metadata(header, key=key, options=DeidOptions(True, True, True, True))
    assert everything["sex"] == "M"
    assert everything["age_band"] == "60-69"
    assert everything["patient_size_m"] == 1.8
    assert everything["patient_weight_kg"] == 80.0
    assert everything["manufacturer"] == "ACME MEDICAL"
    assert everything["model"] == "Scanotron 9000"
    assert everything["body_part"] == "CHEST"
    assert everything["study_date_shifted"] is not None

    no_device = case_metadata(header, key=key, options=DeidOptions(retain_device_identity=False))
    assert no_device["manufacturer"] is None and no_device["model"] is None
    assert no_device["sex"] == "M"

    no_patient = case_metadata(
        header, key=key, options=DeidOptions(retain_patient_characteristics=False)
    )
    assert [no_patient[k] for k in ("sex", "age_band", "patient_size_m", "patient_weight_kg")] == [
        None
    ] * 4
    assert no_patient["manufacturer"] == "ACME MEDICAL"

    default = case_metadata(header, key=key)
    assert default["study_date_shifted"] is None
    assert default["patient"] == everything["patient"] == no_device["patient"]


def test_shifted_dates_keep_a_patients_intervals(key):
    first, second = _synthetic_header(), _synthetic_header()
    second.StudyDate = "20230415"
    options = DeidOptions(longitudinal_dates=True)
    rows = [case_metadata(h, key=key, options=options) for h in (first, second)]
    shift = dt.timedelta(days=key.date_offset_days(rows[0]["patient"]))
    assert rows[0]["study_date_shifted"] == (dt.date(2023, 3, 15) + shift).isoformat()
    shifted = [dt.date.fromisoformat(r["study_date_shifted"]) for r in rows]
    assert shifted[1] - shifted[0] == dt.timedelta(days=31)


@pytest.mark.parametrize("study_date", ["", "2023", "20231345", "yesterday"])
def test_bad_study_date_gives_no_shifted_date(key, study_date):
    header = _synthetic_header()
    header.StudyDate = study_date
    row = case_metadata(header, key=key, options=DeidOptions(longitudinal_dates=True))
    assert row["study_date_shifted"] is None


@pytest.mark.parametrize(("body_part", "description", "clean", "expected"), BODY_PART_CASES)
def test_body_part(key, body_part, description, clean, expected):
    header = _synthetic_header()
    del (
        header.BodyPartExamined,
        header.StudyDescription,
        header.SeriesDescription,
        header.ProtocolName,
    )
    if body_part is not None:
        header.BodyPartExamined = body_part
    if description is not None:
        header.StudyDescription = description
    row = case_metadata(header, key=key, options=DeidOptions(clean_descriptors=clean))
    assert row["body_part"] == expected


@pytest.mark.parametrize(("age", "birth", "study", "expected"), AGE_FROM_HEADER_CASES)
def test_age_band_from_header(key, age, birth, study, expected):
    header = _synthetic_header()
    del header.PatientAge, header.PatientBirthDate, header.StudyDate
    for keyword, value in (("PatientAge", age), ("PatientBirthDate", birth), ("StudyDate", study)):
        if value is not None:
            setattr(header, keyword, value)
    row = case_metadata(header, key=key)
    assert row["age_band"] == expected
    if birth:
        assert birth not in repr(row)


@pytest.mark.parametrize(("size", "weight", "size_m", "weight_kg"), SIZE_WEIGHT_CASES)
def test_size_and_weight_are_rounded(key, size, weight, size_m, weight_kg):
    header = _synthetic_header()
    del header.PatientSize, header.PatientWeight
    if size is not None:
        header.PatientSize = size
    if weight is not None:
        header.PatientWeight = weight
    row = case_metadata(header, key=key)
    assert (row["patient_size_m"], row["patient_weight_kg"]) == (size_m, weight_kg)


@pytest.mark.parametrize(
    ("keyword", "value", "field", "expected"),
    [
        ("PatientSex", "m", "sex", "M"),
        ("PatientSex", "Male", "sex", None),
        ("PatientSex", "", "sex", None),
        ("Modality", "CT\\MR", "modality", None),  # VM 1 expected: a list is not a modality
        ("SOPClassUID", "1.2.826.0.1.3680043.8.498.999", "sop_class", None),  # private class
        ("Manufacturer", "ACME\x1b[31m", "manufacturer", None),  # control characters
        ("Manufacturer", "  ACME   Medical  ", "manufacturer", "ACME Medical"),
    ],
)
def test_values_outside_the_vocabulary_are_dropped(key, keyword, value, field, expected):
    header = _synthetic_header()
    setattr(header, keyword, value)
    assert case_metadata(header, key=key)[field] == expected
