"""A mixed archive as a clinic's export holds one: real files where they exist, built ones for the rest.

:func:`write_mixed_archive` writes images (CT, MR) beside a segmentation, an RT structure set, an RT
dose grid (with pixel data), a structured report, an ECG waveform (pydicom's own test files), a key
object selection and a presentation state (built: the presentation state keeps an image's pixel
data, to show that the SOP Class decides), a 10 x 10 slide-microscopy image and a 16 x 16 CT (too
small), a byte copy of a file and a copy with new UIDs, and, where ../shared/data is present, a
Siemens mosaic. It returns what each file should become: a case (None) or a skip reason.

:func:`write_patients` writes sample CT slices under chosen patients, with new UIDs, for the
tests of ``exclude_same_patient``, ``one_per_patient`` and copy collapsing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

SAMPLE_CT = Path(__file__).resolve().parents[2] / "medsearch" / "data" / "sample" / "tcga-luad-ct"

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
WHOLE_SLIDE_MICROSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.6"
MOSAIC_FILE = ("mr-siemens-mosaic", "In", "Orientation", "ax", "axasc36")

#: file name in the archive -> the class the skip detail names (for the files that are not images)
NOT_IMAGES = {
    "seg.dcm": "Segmentation Storage",
    "rtstruct.dcm": "RT Structure Set Storage",
    "rtdose.dcm": "RT Dose Storage",
    "sr.dcm": "Basic Text SR Storage",
    "ecg.dcm": "12-lead ECG Waveform Storage",
    "ko.dcm": "Key Object Selection Document Storage",
    "pr.dcm": "Grayscale Softcopy Presentation State Storage",
    "sm-10px.dcm": "VL Whole Slide Microscopy Image Storage",
    "ct-16px.dcm": "CT Image Storage of 16 x 16 pixels",
}


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed with pydicom")
    return Path(path)


def _new_uids(ds: pydicom.Dataset, seed: str) -> None:
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


def _as_class(ds: pydicom.Dataset, uid: str, seed: str) -> pydicom.Dataset:
    ds.SOPClassUID = uid
    ds.file_meta.MediaStorageSOPClassUID = uid
    _new_uids(ds, seed)
    return ds


def write_mixed_archive(folder: Path, *, shared_dicom: Path | None = None) -> dict[str, str | None]:
    """Write the mixed archive under ``folder``; return each file's expected skip reason (None: in a case)."""
    expected: dict[str, str | None] = {}
    ct_small = _testfile("CT_small.dcm")
    for name, target in (("ct.dcm", ct_small), ("mr.dcm", _testfile("MR_small.dcm"))):
        shutil.copy(target, folder / name)
        expected[name] = None
    (folder / "zz-copies").mkdir()
    shutil.copy(ct_small, folder / "zz-copies" / "ct-byte-copy.dcm")
    expected["zz-copies/ct-byte-copy.dcm"] = "duplicate"  # the same SOP instance reached by a second path
    renamed = pydicom.dcmread(ct_small)
    _new_uids(renamed, "ct-new-uids")
    _save(renamed, folder / "zz-copies" / "ct-new-uids.dcm")
    expected["zz-copies/ct-new-uids.dcm"] = None  # a case of its own; its pixels are ct.dcm's
    for name, source in (("seg.dcm", "liver_1frame.dcm"), ("rtstruct.dcm", "rtstruct.dcm"), ("rtdose.dcm", "rtdose.dcm"),
                         ("sr.dcm", "reportsi.dcm"), ("ecg.dcm", "waveform_ecg.dcm")):
        shutil.copy(_testfile(source), folder / name)
        expected[name] = "not_an_image"
    ko = _as_class(pydicom.dcmread(ct_small), KEY_OBJECT_SELECTION, "ko")
    del ko.PixelData
    ko.Modality = "KO"
    _save(ko, folder / "ko.dcm")
    pr = _as_class(pydicom.dcmread(ct_small), GRAYSCALE_PRESENTATION_STATE, "pr")  # pixel data kept on purpose
    pr.Modality = "PR"
    _save(pr, folder / "pr.dcm")
    sm = _as_class(pydicom.dcmread(ct_small), WHOLE_SLIDE_MICROSCOPY, "sm")
    sm.Modality = "SM"
    _crop(sm, 10)
    _save(sm, folder / "sm-10px.dcm")
    tiny = pydicom.dcmread(ct_small)
    _new_uids(tiny, "ct-16px")
    _crop(tiny, 16)
    _save(tiny, folder / "ct-16px.dcm")
    for name in ("ko.dcm", "pr.dcm", "sm-10px.dcm", "ct-16px.dcm"):
        expected[name] = "not_an_image"
    if shared_dicom is not None:
        source = sorted(p for p in shared_dicom.joinpath(*MOSAIC_FILE).iterdir() if p.is_file())[0]
        shutil.copy(source, folder / "mosaic.dcm")
        expected["mosaic.dcm"] = None
    return expected


def _crop(ds: pydicom.Dataset, side: int) -> None:
    pixels = ds.pixel_array[:side, :side].copy()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def write_patients(folder: Path, plan: dict[str, tuple[str, str]]) -> dict[str, Path]:
    """Sample CT slices as new series of chosen patients: ``{name: (sample file, PatientID)}``.

    Each file gets new study, series and SOP UIDs (seeded by its name), so two names of one sample
    file are exact pixel copies that are different cases.
    """
    written = {}
    for name, (sample, patient) in plan.items():
        ds = pydicom.dcmread(SAMPLE_CT / sample)
        _new_uids(ds, name)
        ds.PatientID = patient
        written[name] = _save(ds, folder / f"{name}.dcm")
    return written
