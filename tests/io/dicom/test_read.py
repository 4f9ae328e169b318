"""Tests of medsearch.io.dicom.read: how each file is read and classified, and messages that name no patient.

Real files first (pydicom's and pydicom-data's test files); synthetic DICOMs in tmp_path only for
what no real file shows.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom import (
    SkipReason,
    load_study,
    scan,
)

# ---------------------------------------------------------------------------------------------
# scan: classification of single files

SKIP_TABLE = [
    ("reportsi.dcm", SkipReason.NO_PIXEL_DATA, "Basic Text SR Storage has no pixel data"),
    ("test-SR.dcm", SkipReason.NO_PIXEL_DATA, "Comprehensive SR Storage has no pixel data"),
    ("rtplan.dcm", SkipReason.NO_PIXEL_DATA, "RT Plan Storage has no pixel data"),
    ("rtstruct.dcm", SkipReason.NO_PIXEL_DATA, "RT Structure Set Storage has no pixel data"),
    ("waveform_ecg.dcm", SkipReason.NO_PIXEL_DATA, "12-lead ECG Waveform Storage"),
    ("ExplVR_BigEndNoMeta.dcm", SkipReason.NO_PIXEL_DATA, "RT Ion Plan Storage"),
    ("MR_truncated.dcm", SkipReason.TRUNCATED, "pixel data is 62 bytes shorter"),
    ("rtplan_truncated.dcm", SkipReason.TRUNCATED, "ends inside its header"),
    ("README.txt", SkipReason.NOT_DICOM, "not a DICOM file"),
    ("crayons.icc", SkipReason.NOT_DICOM, "not a DICOM file"),
    ("test1.json", SkipReason.NOT_DICOM, "not a DICOM file"),
]


@pytest.mark.parametrize(("name", "reason", "detail"), SKIP_TABLE)
def test_scan_classifies_files_without_usable_image(
    name: str,
    reason: SkipReason,
    detail: str,
    testfile: Callable[[str], Path],
) -> None:
    result = scan([testfile(name)])
    assert result.cases == []
    assert [s.reason for s in result.skipped] == [reason]
    assert detail in result.skipped[0].detail
    assert result.n_files == 1


IMAGE_TABLE = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG-LL.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "image_dfl.dcm",  # deflated transfer syntax
    "OT-PAL-8-face.dcm",  # no preamble, no file meta
    "emri_small.dcm",
]


@pytest.mark.parametrize("name", IMAGE_TABLE)
def test_scan_finds_one_case_per_image_file(name: str, testfile: Callable[[str], Path]) -> None:
    path = testfile(name)
    result = scan(path)
    assert result.skipped == []
    (case,) = result.cases
    assert case.files == (path,)
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    assert case.instance_uids == (str(ds.get("SOPInstanceUID", "")),)
    assert "PixelData" not in case.header  # headers only


def test_scan_unsupported_transfer_syntax_names_uid(
    tmp_path: Path,
    as_mpeg2: Callable[[pydicom.Dataset], pydicom.Dataset],
    testfile: Callable[[str], Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
) -> None:
    ds = as_mpeg2(pydicom.dcmread(testfile("MR_small.dcm")))
    result = scan([write_dicom(ds, tmp_path / "mpeg.dcm")])
    (skip,) = result.skipped
    assert skip.reason is SkipReason.UNSUPPORTED_TRANSFER_SYNTAX
    assert "1.2.840.10008.1.2.4.100" in skip.detail and "MPEG2" in skip.detail


# ---------------------------------------------------------------------------------------------
# Messages and logs: no patient identity

PHI_NAME, PHI_ID = "Zyxwvut^Qwerasdf", "PID-8675309-XQ"


def test_messages_and_logs_carry_no_patient_identity(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    testfile: Callable[[str], Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
    as_mpeg2: Callable[[pydicom.Dataset], pydicom.Dataset],
) -> None:
    base = pydicom.dcmread(testfile("CT_small.dcm"))
    base.PatientName, base.PatientID = PHI_NAME, PHI_ID
    good = write_dicom(base, tmp_path / "good" / "ct.dcm")
    data = good.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "ct.dcm").write_bytes(data[: len(data) - 1000])
    no_pixels = copy.deepcopy(base)
    del no_pixels.PixelData
    write_dicom(no_pixels, tmp_path / "nopix" / "ct.dcm")
    bad = copy.deepcopy(base)
    bad.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    bad.PixelData = encapsulate([PHI_NAME.encode() + b"\x00" * 99])
    bad["PixelData"].VR = "OB"
    write_dicom(bad, tmp_path / "bad" / "ct.dcm")
    shutil.copy(good, tmp_path / "good" / "copy.dcm")
    write_dicom(as_mpeg2(copy.deepcopy(base)), tmp_path / "mpeg" / "ct.dcm")

    messages = []
    with caplog.at_level(logging.DEBUG, logger="medsearch"):
        for folder in ["cut", "nopix", "bad", "mpeg"]:
            with pytest.raises(InvalidStudyError) as info:
                load_study(tmp_path / folder)
            messages.append(str(info.value))
        with pytest.raises(InvalidStudyError) as info:
            load_study(tmp_path)  # several series
        messages.append(str(info.value))
        result = scan(tmp_path)
        messages += [s.detail for s in result.skipped]
        load_study(tmp_path / "good")
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    assert "CT Image Storage has no pixel data" in text  # the checks did run
    for value in (
        PHI_NAME,
        PHI_ID,
        "Zyxwvut",
        base.StudyInstanceUID,
        base.SOPInstanceUID,
        str(base.StudyDate),
    ):
        assert value not in text
