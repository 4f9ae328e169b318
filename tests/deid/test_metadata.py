"""Tests of medsearch.deid.metadata: what leaves a header in the case table row."""

from __future__ import annotations

import datetime as dt
from dataclasses import fields, replace

import pydicom
import pydicom.examples
import pytest
from deid.headers import _NONE, _synthetic_header
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from medsearch.deid import (
    ATTRIBUTE_ACTIONS,
    CASE_FIELDS,
    CASE_METADATA_KEYS,
    DERIVED_FIELDS,
    DeidOptions,
    age_band,
    case_metadata,
    patient_pseudonym,
    profile_action,
)

# Several cases set invalid values on purpose; pydicom warns about each as it is set.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
]

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

# Values seeded into the synthetic header; none may appear in any case_metadata output.
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

# (BodyPartExamined, StudyDescription, clean_descriptors) -> body_part: a defined term, or OTHER
BODY_PART_CASES = [
    ("CHEST", None, False, "CHEST"),
    ("chest", None, False, "CHEST"),
    ("ABDOMEN_PELVIS", None, False, "ABDOMENPELVIS"),
    ("C-SPINE", None, False, "CSPINE"),
    ("WHOLE BODY", None, False, "WHOLEBODY"),
    ("THORAX", None, False, "CHEST"),
    ("HEAD 2", None, False, "HEAD"),
    ("A VERY LONG BODY PART", None, False, "OTHER"),
    ("QUORBELLE", None, False, "OTHER"),  # any 16 letters used to pass as a token
    ("SMITH", None, False, "OTHER"),
    ("", "CT CHEST", False, None),
    (None, "CT CHEST", False, None),
    ("C-SPINE", None, True, "CSPINE"),
    ("chest", None, True, "CHEST"),
    (None, "CT Thorax w/o contrast for Zzyzx", True, "CHEST"),
    (None, "CT CHEST ABDOMEN PELVIS", True, "CHESTABDPELVIS"),
    (None, "MR Head and neck", True, "HEADNECK"),
    (None, "CT Liver and chest", True, None),
    ("SMITH", "Dr Leakcheck's protocol", True, "OTHER"),
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

# (PatientSize, PatientWeight) -> (patient_size_m, patient_weight_kg): 10 cm and 10 kg bands
SIZE_WEIGHT_CASES = [
    ("1.83", "81.7", "1.80-1.89", "80-89"),
    ("1.85", "82.5", "1.80-1.89", "80-89"),
    ("1.549", "89.99", "1.50-1.59", "80-89"),
    ("1.7", "70", "1.70-1.79", "70-79"),  # a band's lower edge is in it
    ("0.52", "2.2", "0.50-0.59", "2-9"),  # a newborn: 2.2 kg is not 0
    ("0.4", "2", "0.40-0.49", "2-9"),
    ("0.39", "1.9", None, None),  # under the plausible range
    ("2.31", "312", "2.20+", "250+"),  # extremes are pooled into the top band
    ("3.0", "700", "2.20+", "250+"),
    ("0", "0", None, None),  # zero is what scanners write for unknown
    ("-1.7", "-70", None, None),
    ("170", "900", None, None),  # centimetres in a metres field; not a weight
    ("nan", "inf", None, None),
    (None, None, None, None),
]

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# case_metadata against the policy
# --------------------------------------------------------------------------------------------


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
            "manufacturer": "GE",  # the file says GE MEDICAL SYSTEMS
            "model": "OTHER",  # RHAPSODE: not a scanner model of the vocabulary
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
            "patient_weight_kg": "80-89",
            "manufacturer": "Canon/Toshiba",  # the file says TOSHIBA_MEC
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
    assert everything["patient_size_m"] == "1.80-1.89"
    assert everything["patient_weight_kg"] == "80-89"
    assert everything["manufacturer"] == "OTHER"  # ACME MEDICAL: in no vocabulary
    assert everything["model"] == "OTHER"
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
    assert no_patient["manufacturer"] == "OTHER"

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
def test_size_and_weight_are_banded(key, size, weight, size_m, weight_kg):
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
        ("Manufacturer", "GE\x1b[31m", "manufacturer", "GE"),  # the vendor, never the control characters
        ("Manufacturer", "  Philips   Medical Systems  ", "manufacturer", "Philips"),
        ("Manufacturer", "Dr Quorbelle Imaging", "manufacturer", "OTHER"),
        ("ManufacturerModelName", "Dr Quorbelle Imaging", "model", "OTHER"),
        ("ManufacturerModelName", "sensation   16", "model", "Sensation 16"),
        ("Modality", "QUORBELLE", "modality", "OT"),
        ("PhotometricInterpretation", "QUORBELLE", "photometric", None),
    ],
)
def test_values_outside_the_vocabulary_are_dropped(key, keyword, value, field, expected):
    header = _synthetic_header()
    setattr(header, keyword, value)
    assert case_metadata(header, key=key)[field] == expected
