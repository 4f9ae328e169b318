"""Nothing identifying from a DICOM header reaches the index, a report, a log or the CLI's output.

The corpus: every file of pydicom's test data and pydicom-data, ``../shared/data/dicom`` where present,
and synthetic DICOMs seeded with distinctive identifying values (in standard attributes, nested
sequences and private tags) so the test cannot pass by luck. The forbidden values are those of every
attribute the PS3.15 Annex E profile removes or replaces (as ``medsearch.deid`` implements it), and of
every private tag. A negative control runs the same scan over the raw files and finds them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.deid import ATTRIBUTE_ACTIONS, DeidOptions, profile_action

SEEDED = {
    "PatientName": "Leakwell^Zelda^Quinn",
    "PatientID": "LEAKID-771234",
    "PatientBirthDate": "19450312",
    "OtherPatientIDs": "OTHERLEAK-5521",
    "PatientAddress": "12 Leakhaven Road, Sometown",
    "AccessionNumber": "ACCLEAK99817",
    "StudyDate": "20190417",
    "SeriesDate": "20190418",
    "AcquisitionDate": "20190419",
    "ContentDate": "20190420",
    "StudyTime": "101112.131415",
    "InstitutionName": "Leakville General Hospital",
    "InstitutionAddress": "99 Infirmary Lane, Leakville",
    "ReferringPhysicianName": "Leakmore^Horatio",
    "PerformingPhysicianName": "Drip^Dorothea",
    "OperatorsName": "Seepage^Oswald",
    "StationName": "LEAKSTATION7",
    "StudyDescription": "Follow-up of Zelda Leakwell",
    "SeriesDescription": "Leakwell chest series",
    "ProtocolName": "Leakwell protocol 42",
    "ImageComments": "Patient Zelda says hello",
    "StudyID": "STUDYLEAK31",
    "DeviceSerialNumber": "SERIALLEAK8080",
}
NESTED_VALUE = "Nestedleak^Norbert"
PRIVATE_VALUE = "Privateleak Penelope"
UID_ROOT = "1.2.826.0.1.3680043.8.498."
# Code strings (CS) are defined terms ("ORIGINAL", "MONOCHROME2"), not identifying: left out.
STRING_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "DA", "DT", "TM", "UI", "AE", "AS", "UR", "UN"}
DATE = re.compile(r"^(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])$")
OPTIONS = DeidOptions()


def _seed(ds: Dataset) -> Dataset:
    for keyword, value in SEEDED.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.SOPInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    item = Dataset()
    item.RequestedProcedureDescription = "Requested for Zelda Leakwell"
    item.ScheduledPerformingPhysicianName = NESTED_VALUE
    ds.RequestAttributesSequence = Sequence([item])
    block = ds.private_block(0x0011, "LEAKTEST PRIVATE", create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    inner = Dataset()
    inner.PatientName = "Deepnested^Delia"
    block.add_new(0x02, "SQ", Sequence([inner]))
    return ds


def _make_seeded(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    made = []
    for name, source in (("seeded_ct.dcm", pydicom.examples.ct), ("seeded_mr.dcm", pydicom.examples.mr)):
        ds = _seed(source.copy())
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        made.append(path)
    # a report without pixels and a truncated image, seeded too: they end in the skip report
    sr = _seed(pydicom.dcmread(get_testdata_files("test-SR.dcm")[0]))
    sr.save_as(folder / "seeded_sr.dcm", enforce_file_format=True)
    data = made[0].read_bytes()
    (folder / "seeded_truncated.dcm").write_bytes(data[: len(data) - 5000])
    return made


def _strings(element) -> list[str]:
    value = element.value
    if element.VR == "UN" or isinstance(value, bytes):
        raw = value if isinstance(value, bytes) else b""
        text = raw.decode("latin-1", errors="ignore").strip("\x00 ")
        return [text] if text.isprintable() else []
    values = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
    return [str(v).strip() for v in values if v is not None]


def _collect(ds: Dataset, forbidden: set[str], kept: set[str], *, inside_removed: bool = False) -> None:
    for element in ds:
        if element.VR == "SQ":
            if element.tag.is_private or not element.keyword:
                removed = True
            else:
                removed = profile_action(element.keyword, OPTIONS) not in ("K", "C")
            for item in element.value or []:
                _collect(item, forbidden, kept, inside_removed=inside_removed or removed)
            continue
        if element.tag.group == 0x0002:
            continue
        if element.VR == "CS":  # defined terms: never identifying, and kept ones are shown (body part)
            if element.keyword in ATTRIBUTE_ACTIONS:
                kept.update(s for s in _strings(element) if s)
            continue
        if element.VR not in STRING_VRS:
            continue
        if element.tag.is_private or inside_removed:
            target = forbidden
        elif element.keyword in ATTRIBUTE_ACTIONS:
            target = kept if profile_action(element.keyword, OPTIONS) in ("K", "C") else forbidden
        else:
            continue
        try:
            strings = _strings(element)
        except Exception:  # noqa: BLE001 - a value that does not parse cannot be looked for
            continue
        target.update(s for s in strings if len(s) >= 6)


def _forbidden_values(files: list[Path], root: Path) -> set[str]:
    forbidden: set[str] = set()
    kept: set[str] = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # noqa: BLE001 - not DICOM: it holds no header values to look for
            continue
        try:
            _collect(ds, forbidden, kept)
        except Exception:  # noqa: BLE001 - an odd header: the values read before it still count
            continue
    # Not leaks: a value that some file legitimately keeps elsewhere, or a part of one (e.g. "SIEMENS"
    # both as Manufacturer and in a private tag, "LightSpeed Pro" inside a kept model name); a part of
    # a file or folder name (the CLI names files: "IM000001" is both a DICOMDIR entry and a file);
    # standard DICOM UIDs (SOP classes, transfer syntaxes); short numbers that are not dates.
    standard_names = {str(entry[0]) for entry in UID_dictionary.values()}
    kept_text = "\n".join(sorted(kept | standard_names)).lower()
    names = "\n".join(sorted({part for f in files for part in f.relative_to(root).parts})).lower()

    def innocent(value: str) -> bool:
        low = value.lower()
        return (
            low in kept_text
            or low in names
            or value.startswith("1.2.840.10008.")
            or (value.isdigit() and len(value) < 10 and not DATE.match(value))
        )

    return {v for v in forbidden if not innocent(v)}


def _hits(haystack: bytes, values: set[str]) -> set[str]:
    found = set()
    lowered = haystack.lower()
    for value in values:
        for encoded in {value.encode("utf-8", "ignore"), value.encode("latin-1", "ignore")}:
            if encoded and encoded.lower() in lowered:
                found.add(value)
    return found


@pytest.mark.slow
def test_nothing_identifying_reaches_index_reports_logs_or_output(tmp_path, caplog, monkeypatch):
    archive = tmp_path / "archive"
    for i, f in enumerate(p for p in map(Path, get_testdata_files()) if p.is_file()):
        target = archive / "pydicom" / f"{i:03d}_{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
    if shared.is_dir():
        shutil.copytree(shared, archive / "shared")
    seeded = _make_seeded(archive / "seeded")
    sources = [p for p in archive.rglob("*") if p.is_file()]

    forbidden = _forbidden_values(sources, archive)
    seeded_values = set(SEEDED.values()) | {NESTED_VALUE, PRIVATE_VALUE}
    assert seeded_values <= forbidden
    # negative control: the same scan over the raw files finds every seeded value
    raw = b"\n".join(p.read_bytes() for p in sources)
    assert _hits(raw, seeded_values) == seeded_values

    config = tmp_path / "fast.toml"
    config.write_text("[preprocess]\nsize = 64\nslices = 1\n")
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(tmp_path / "keys" / "site.key"))
    index = tmp_path / "index"
    runner = CliRunner()
    results = []
    caplog.set_level(logging.DEBUG)
    calls = [
        ["-v", "index", str(archive), "--index", str(index), "--config", str(config), "--links", str(tmp_path / "links.csv")],
        ["-v", "index", str(archive), "--index", str(index), "--json"],
        ["info", str(index)],
        ["info", str(index), "--json"],
        ["export-index", str(index), str(tmp_path / "shared-copy"), "--json"],
    ]
    for study in seeded + [archive / "seeded" / "seeded_sr.dcm", archive / "seeded" / "seeded_truncated.dcm"]:
        calls.append(["-v", "query", str(study), "--index", str(index), "-k", "5"])
        calls.append(["query", str(study), "--index", str(index), "--json"])
    caplog.clear()  # what the test itself read above is not medsearch's output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for args in calls:
            results.append(runner.invoke(app, args))
    assert results[0].exit_code == 0 and "indexed" in results[0].stdout
    assert json.loads(results[1].stdout)["cases_added"] == 0
    assert results[4].exit_code == 0, results[4].stderr
    assert [r.exit_code for r in results[-4:]] == [2, 2, 2, 2]  # the report and the truncated file
    said = [r.stdout + "\n" + r.stderr for r in results] + [caplog.text] + [str(w.message) for w in caught]
    printed = "\n".join(said).encode("utf-8")

    index_bytes = b"\n".join(p.read_bytes() for p in index.rglob("*") if p.is_file())
    export_bytes = b"\n".join(p.read_bytes() for p in (tmp_path / "shared-copy").rglob("*") if p.is_file())
    assert index_bytes and export_bytes
    leaks = {
        "index directory": _hits(index_bytes, forbidden),
        "exported copy": _hits(export_bytes, forbidden),
        "CLI output and logs": _hits(printed, forbidden),
    }
    import os
    if os.environ.get("LEAK_DEBUG"):
        Path(os.environ["LEAK_DEBUG"]).write_text(json.dumps({k: sorted(v) for k, v in leaks.items()}, indent=1))
        Path(os.environ["LEAK_DEBUG"] + ".out").write_bytes(printed)
    assert leaks == {where: set() for where in leaks}, leaks
    # the link table is the controlled way back: it does hold UIDs, and only there
    links = (tmp_path / "links.csv").read_bytes()
    assert (tmp_path / "links.csv").stat().st_mode & 0o077 == 0
    ct_uid = pydicom.dcmread(seeded[0], stop_before_pixels=True).StudyInstanceUID
    assert ct_uid.encode() in links
