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

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom import (
    LoadFailure,
    SkipReason,
    load_study,
    scan,
)

# ---------------------------------------------------------------------------------------------
# scan: classification of single files

SKIP_TABLE = [
    ("reportsi.dcm", SkipReason.NOT_AN_IMAGE, "Basic Text SR Storage is not an image storage class"),
    ("test-SR.dcm", SkipReason.NOT_AN_IMAGE, "Comprehensive SR Storage is not an image storage class"),
    ("rtplan.dcm", SkipReason.NOT_AN_IMAGE, "RT Plan Storage is not an image storage class"),
    ("rtstruct.dcm", SkipReason.NOT_AN_IMAGE, "RT Structure Set Storage is not an image storage class"),
    ("waveform_ecg.dcm", SkipReason.NOT_AN_IMAGE, "12-lead ECG Waveform Storage"),
    ("ExplVR_BigEndNoMeta.dcm", SkipReason.NOT_AN_IMAGE, "RT Ion Plan Storage"),
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


# ---------------------------------------------------------------------------------------------
# What is read is bounded by what the header declares, whatever the file holds


def _bytes_read() -> int:
    """Bytes this process has read from files so far (``rchar`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


needs_proc_io = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read with /proc/self/io (Linux)")
PADDING = 100 * 2**20  # zeros after a valid file: parsed at ~0.3 s/MB before reading stopped at the pixel data


@needs_proc_io
@pytest.mark.parametrize("source", ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm", "emri_small.dcm"])
def test_zero_padding_after_the_pixel_data_is_never_read(tmp_path: Path, source: str, testfile: Callable[[str], Path]) -> None:
    """A valid file followed by 100 MB of zeros loads as the file alone does, reading no more bytes than its size."""
    from hostile.files import zero_padded

    testfile(source)
    path = zero_padded(tmp_path / "padded.dcm", padding=PADDING, source=source)
    size = path.stat().st_size - PADDING
    reference = load_study(testfile(source))[1]
    before = _bytes_read()
    volume = load_study(path)[1]
    read = _bytes_read() - before
    assert np.array_equal(volume.pixels, reference.pixels)
    assert read < 4 * size + 2**20, f"{read} bytes read for a {size}-byte file padded with {PADDING} bytes"


@needs_proc_io
def test_a_pixel_element_far_longer_than_its_image_is_read_only_as_far_as_the_image(tmp_path: Path) -> None:
    """A 64 x 64 image whose Pixel Data element declares 3 GiB (a sparse file): 8 KiB of pixels are read."""
    from hostile.files import oversized_pixel_element

    path = oversized_pixel_element(tmp_path / "oversized.dcm")
    before = _bytes_read()
    volume = load_study(path)[1]
    assert _bytes_read() - before < 2**20
    assert volume.pixels.shape == (1, 64, 64) and np.unique(volume.pixels).size == 1  # zeros, rescaled


def test_a_header_over_the_limit_is_too_large_before_its_pixel_data_is_read(
    tmp_path: Path, copy_testfile: Callable[..., Path]
) -> None:
    from medsearch.io.dicom.study import load_volume

    path = copy_testfile("MR_small.dcm", tmp_path / "huge.dcm", Rows=60000, Columns=60000)
    (case,) = scan([path]).cases
    with pytest.raises(LoadFailure) as info:
        load_volume(case)
    (skip,) = info.value.skipped
    assert skip.reason is SkipReason.TOO_LARGE and "more than the 1 GiB one file may hold" in skip.detail


def test_deeply_nested_sequences_are_unreadable_not_a_crash(tmp_path: Path) -> None:
    from hostile.files import deep_sequences

    (skip,) = scan([deep_sequences(tmp_path / "deep.dcm")]).skipped
    assert skip.reason is SkipReason.UNREADABLE and "\n" not in skip.detail


# ---------------------------------------------------------------------------------------------
# Library messages quote no header value


ONE_LINE_TABLE = [
    ("could not convert string to float: 'SLOPEZQX'", "could not convert string to float: <value>"),
    ('invalid literal for int() with base 10: "12AB"', "invalid literal for int() with base 10: <value>"),
    ("cannot decode b'\\x00SECRET'", "cannot decode <value>"),
    ("the decoder doesn't support it", "the decoder doesn't support it"),  # an apostrophe in a word quotes nothing
    ("line one\n  line two", "line one line two"),
    ("", "ValueError"),
]


@pytest.mark.parametrize(("message", "expected"), ONE_LINE_TABLE)
def test_one_line_removes_what_a_message_quotes(message: str, expected: str) -> None:
    from medsearch.io.dicom.read import _one_line

    assert _one_line(ValueError(message)) == expected


def test_one_line_removes_header_text_a_message_repeats(testfile: Callable[[str], Path]) -> None:
    from medsearch.io.dicom.read import _one_line

    ds = pydicom.dcmread(testfile("CT_small.dcm"))
    ds.PatientName, ds.SeriesDescription = PHI_NAME, "QUORBELLE CHEST"
    text = _one_line(RuntimeError(f"bad element QUORBELLE CHEST near {PHI_NAME} in {ds.StudyInstanceUID}"), ds)
    assert "QUORBELLE" not in text and "Zyxwvut" not in text and ds.StudyInstanceUID not in text
    assert text.startswith("bad element <redacted> near <redacted>")


def test_a_header_value_a_parser_quotes_reaches_no_detail_or_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """'SLOPEZQX' in Rescale Slope: the file is skipped, and no detail, error or log line quotes it."""
    from hostile.files import SEEDED, seeded_value

    from medsearch.io.dicom.study import load_volume

    path = seeded_value(tmp_path / "seeded" / "ct.dcm")
    texts = []
    with caplog.at_level(logging.DEBUG):
        (case,) = scan([path]).cases
        with pytest.raises(LoadFailure) as info:
            load_volume(case)
        texts += [str(info.value), *(s.detail for s in info.value.skipped)]
        with pytest.raises(InvalidStudyError) as study:
            load_study(path.parent)
        texts.append(str(study.value))
    assert info.value.skipped[0].reason is SkipReason.DECODE_ERROR
    assert "Rescale Slope or Rescale Intercept is not a number" in info.value.skipped[0].detail
    for text in [*texts, caplog.text]:
        assert SEEDED not in text
