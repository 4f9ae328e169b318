"""Tests of medsearch.io.dicom: discovery, header scan, grouping, decoding, and study errors.

Real files first (pydicom's and pydicom-data's test files, the sets in ../shared/data); synthetic
DICOMs in tmp_path only for what no real file shows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom import (
    CaseRef,
    LoadFailure,
    ScanResult,
    SkipReason,
    find_files,
    load_study,
    load_volume,
    scan,
)


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


def _raw(name_or_path: str | Path) -> np.ndarray:
    path = Path(name_or_path) if isinstance(name_or_path, Path) else _testfile(name_or_path)
    return pydicom.dcmread(path).pixel_array


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


def _copy(name: str, path: Path, **changes: object) -> Path:
    """Write a copy of a pydicom test file with header changes (None deletes the element)."""
    ds = pydicom.dcmread(_testfile(name))
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _write(ds, path)


def _as_mpeg2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Relabel a dataset as MPEG2 video, a transfer syntax pydicom has no decoder for."""
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    return ds


def _totals_add_up(result: ScanResult) -> None:
    in_cases = [f for case in result.cases for f in case.files]
    skipped = [s.path for s in result.skipped]
    assert len(in_cases) + len(skipped) == result.n_files
    assert len(set(in_cases) | set(skipped)) == result.n_files  # each file in exactly one place


def _load_one(path: Path):
    result = scan([path])
    assert len(result.cases) == 1, result.skipped
    return load_volume(result.cases[0])


# ---------------------------------------------------------------------------------------------
# find_files


def test_find_files_single_file_yields_itself() -> None:
    path = _testfile("CT_small.dcm")
    assert list(find_files(path)) == [path]


def test_find_files_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ["b/i12.MRDC.3", "a.dcm", "b/noext", ".hidden", ".git/x.dcm", "b/.DS_Store"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list(find_files(str(tmp_path))) == [
        tmp_path / "a.dcm",
        tmp_path / "b" / "i12.MRDC.3",
        tmp_path / "b" / "noext",
    ]


def test_find_files_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InvalidStudyError, match=r"nope does not exist.*check the path"):
        list(find_files(missing))


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
    name: str, reason: SkipReason, detail: str
) -> None:
    result = scan([_testfile(name)])
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
def test_scan_finds_one_case_per_image_file(name: str) -> None:
    path = _testfile(name)
    result = scan(path)
    assert result.skipped == []
    (case,) = result.cases
    assert case.files == (path,)
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    assert case.instance_uids == (str(ds.get("SOPInstanceUID", "")),)
    assert "PixelData" not in case.header  # headers only


def test_scan_unsupported_transfer_syntax_names_uid(tmp_path: Path) -> None:
    ds = _as_mpeg2(pydicom.dcmread(_testfile("MR_small.dcm")))
    result = scan([_write(ds, tmp_path / "mpeg.dcm")])
    (skip,) = result.skipped
    assert skip.reason is SkipReason.UNSUPPORTED_TRANSFER_SYNTAX
    assert "1.2.840.10008.1.2.4.100" in skip.detail and "MPEG2" in skip.detail


def test_scan_byte_identical_copy_is_duplicate(tmp_path: Path) -> None:
    for name in ("a.dcm", "b.dcm"):
        shutil.copy(_testfile("CT_small.dcm"), tmp_path / name)
    result = scan(tmp_path)
    assert [c.files for c in result.cases] == [(tmp_path / "a.dcm",)]
    (skip,) = result.skipped
    assert skip.path == tmp_path / "b.dcm"
    assert skip.reason is SkipReason.DUPLICATE
    assert skip.detail == f"same SOP instance as {tmp_path / 'a.dcm'}"
    _totals_add_up(result)


def test_scan_groups_series_and_sorts_files(tmp_path: Path) -> None:
    series = generate_uid()
    for i, name in enumerate(["c.dcm", "a.dcm", "b.dcm"]):
        _copy(
            "MR_small.dcm",
            tmp_path / "s" / name,
            SOPInstanceUID=generate_uid(),
            SeriesInstanceUID=series,
        )
    shutil.copy(_testfile("CT_small.dcm"), tmp_path / "ct.dcm")
    result = scan(tmp_path)
    assert [len(c.files) for c in result.cases] == [1, 3]  # sorted by first file: ct.dcm < s/a.dcm
    mr = result.cases[1]
    assert mr.files == tuple(tmp_path / "s" / n for n in ["a.dcm", "b.dcm", "c.dcm"])
    assert mr.series_uid == series
    assert mr.header.SOPInstanceUID == mr.instance_uids[0]


def test_scan_files_without_uids_get_stable_own_cases(tmp_path: Path) -> None:
    for name in ("x.dcm", "y.dcm"):
        _copy(
            "MR_small.dcm",
            tmp_path / name,
            SOPInstanceUID=generate_uid(),
            StudyInstanceUID=None,
            SeriesInstanceUID=None,
        )
    first, second = scan(tmp_path), scan(tmp_path)
    assert len(first.cases) == 2
    keys = [(c.study_uid, c.series_uid) for c in first.cases]
    assert len(set(keys)) == 2
    assert keys == [(c.study_uid, c.series_uid) for c in second.cases]


def test_scan_splits_multiframe_objects_sharing_a_series(tmp_path: Path) -> None:
    for name in ("m1.dcm", "m2.dcm"):
        _copy("emri_small.dcm", tmp_path / name, SOPInstanceUID=generate_uid())
    _copy(
        "emri_small.dcm",
        tmp_path / "single.dcm",
        SOPInstanceUID=generate_uid(),
        NumberOfFrames=1,
        PixelData=pydicom.dcmread(_testfile("emri_small.dcm")).PixelData[: 64 * 64 * 2],
    )
    result = scan(tmp_path)
    assert [(c.files[0].name, c.part) for c in result.cases] == [
        ("m1.dcm", "mf1"),
        ("m2.dcm", "mf2"),
        ("single.dcm", ""),
    ]
    assert len({c.series_uid for c in result.cases}) == 1


def test_scan_accepts_iterable_and_totals_add_up() -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "reportsi.dcm", "README.txt"]
    result = scan(_testfile(n) for n in names)
    assert result.n_files == 5
    _totals_add_up(result)
    assert Counter(s.reason for s in result.skipped) == {
        SkipReason.DUPLICATE: 1,
        SkipReason.NO_PIXEL_DATA: 1,
        SkipReason.NOT_DICOM: 1,
    }


# ---------------------------------------------------------------------------------------------
# load_volume: pixel values

SAME_PIXELS_TABLE = [
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_expb.dcm"),
    ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm"),
    ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
    ("US1_UNCR.dcm", "US1_J2KR.dcm"),
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"),
]


@pytest.mark.parametrize(("reference", "other"), SAME_PIXELS_TABLE)
def test_transfer_syntaxes_and_byte_orders_give_identical_volumes(
    reference: str, other: str
) -> None:
    ref, _ = _load_one(_testfile(reference))
    vol, _ = _load_one(_testfile(other))
    assert vol.pixels.dtype == np.float32
    assert np.array_equal(ref.pixels, vol.pixels)
    assert ref.spacing == vol.spacing and ref.rgb == vol.rgb


def test_rescale_is_applied_ct_small() -> None:
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol, skipped = _load_one(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert skipped == []
    assert vol.pixels.shape == (1, 128, 128)
    assert np.array_equal(vol.pixels[0], expected.astype(np.float32))
    assert vol.modality == "CT" and not vol.rgb
    assert vol.spacing == pytest.approx((5.0, 0.661468, 0.661468))


def test_monochrome1_is_inverted_real_cr() -> None:
    path = _testfile("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    vol, _ = _load_one(path)
    top = 2.0 ** int(ds.BitsStored) - 1
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = (top * slope + 2 * intercept) - (ds.pixel_array * slope + intercept)
    assert np.allclose(vol.pixels[0], expected)


def test_monochrome1_inverts_the_same_image_as_monochrome2(tmp_path: Path) -> None:
    mono2, _ = _load_one(_copy("MR_small.dcm", tmp_path / "m2.dcm"))
    mono1, _ = _load_one(
        _copy("MR_small.dcm", tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    )
    ds = pydicom.dcmread(_testfile("MR_small.dcm"))
    lo, hi = (
        (-(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1)
        if ds.PixelRepresentation
        else (0.0, 2.0**ds.BitsStored - 1)
    )
    assert np.array_equal(mono1.pixels, (lo + hi) - mono2.pixels)


@pytest.mark.parametrize(
    "name", ["SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"]
)
def test_ybr_becomes_rgb(name: str) -> None:
    ref, _ = _load_one(_testfile("SC_rgb.dcm"))
    vol, _ = _load_one(_testfile(name))
    assert vol.rgb and vol.pixels.shape == (1, 100, 100, 3)
    assert np.abs(vol.pixels - ref.pixels).mean() < 3.0  # lossy JPEG and YBR rounding only


def test_palette_colour_becomes_rgb() -> None:
    vol, _ = _load_one(_testfile("OBXXXX1A.dcm"))
    assert vol.rgb and vol.pixels.shape == (1, 600, 800, 3) and vol.pixels.dtype == np.float32
    assert not np.array_equal(vol.pixels[..., 0], vol.pixels[..., 1])
    assert vol.modality == "US"


def test_file_without_meta_loads() -> None:
    vol, _ = _load_one(_testfile("OT-PAL-8-face.dcm"))
    assert vol.rgb and vol.pixels.shape == (1, 480, 640, 3)


def test_multiframe_becomes_volume() -> None:
    path = _testfile("emri_small.dcm")
    vol, _ = _load_one(path)
    assert vol.pixels.shape == (10, 64, 64)
    assert np.array_equal(vol.pixels, _raw(path).astype(np.float32))
    assert vol.spacing[0] == pytest.approx(float(pydicom.dcmread(path).SpacingBetweenSlices))


def test_enhanced_rescale_per_frame_then_shared(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def transform(slope: float, intercept: float) -> Dataset:
        group, item = Dataset(), Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
        group.PixelValueTransformationSequence = Sequence([item])
        return group

    ds = pydicom.dcmread(_testfile("emri_small.dcm"))
    ds.SharedFunctionalGroupsSequence = Sequence([transform(2.0, -100.0)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [transform(3.0, 5.0)] + [Dataset() for _ in range(9)]
    )
    vol, _ = _load_one(_write(ds, tmp_path / "enh.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    assert np.allclose(vol.pixels[0], raw[0] * 3 + 5)
    assert np.allclose(vol.pixels[1:], raw[1:] * 2 - 100)


def test_enhanced_ct_uses_functional_groups() -> None:
    path = _testfile("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    vol, _ = _load_one(path)
    assert vol.pixels.shape == (2, 512, 512)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    z = [
        np.dot(np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float), normal)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    expected = ds.pixel_array[np.argsort(z)] - 1024.0  # shared Rescale Intercept -1024
    assert np.array_equal(vol.pixels, expected.astype(np.float32))
    assert vol.spacing == pytest.approx(
        (10.0, 0.388672, 0.388672)
    )  # per-frame positions 10 mm apart


def _series(tmp_path: Path, rows: list[dict[str, object]]) -> CaseRef:
    """A series of MR_small copies; each row's pixels are filled with its InstanceNumber."""
    series = generate_uid()
    base = pydicom.dcmread(_testfile("MR_small.dcm"))
    for i, row in enumerate(rows):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), series
        for keyword, value in row.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.PixelData = np.full(
            (64, 64), int(ds.InstanceNumber), dtype=base.pixel_array.dtype
        ).tobytes()
        _write(ds, tmp_path / f"f{i}.dcm")
    (case,) = scan(tmp_path).cases
    return case


def test_slices_sorted_by_position_not_instance(tmp_path: Path) -> None:
    # positions along z with uneven gaps 2, 3, 5; InstanceNumbers disagree with position order
    zs, instances = [10.0, 0.0, 5.0, 2.0], [1, 2, 3, 4]
    case = _series(
        tmp_path,
        [{"ImagePositionPatient": [0, 0, z], "InstanceNumber": n} for z, n in zip(zs, instances)],
    )
    vol, _ = load_volume(case)
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [2, 4, 3, 1]
    assert vol.spacing[0] == pytest.approx(3.0)  # median gap


def test_tilted_orientation_sorts_along_normal(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    orientation = [1, 0, 0, 0, c, s]
    normal = np.cross(orientation[:3], orientation[3:])
    rows = [
        {
            "ImageOrientationPatient": orientation,
            "ImagePositionPatient": list(normal * d + [7 * d, 0, 0]),
            "InstanceNumber": n,
        }
        for n, d in [(1, 6.0), (2, -3.0), (3, 0.0)]
    ]
    vol, _ = load_volume(_series(tmp_path, rows))
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [2, 3, 1]


def test_instance_number_orders_without_positions(tmp_path: Path) -> None:
    rows = [{"ImagePositionPatient": None, "InstanceNumber": n} for n in (3, 1, 2)]
    vol, _ = load_volume(_series(tmp_path, rows))
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [1, 2, 3]
    assert vol.spacing[0] == pytest.approx(0.8)  # Slice Thickness of MR_small


def test_one_image_per_position_first_by_instance(tmp_path: Path) -> None:
    # two time points at two positions: the volume keeps the lower InstanceNumber per position
    rows = [
        {"ImagePositionPatient": [0, 0, z], "InstanceNumber": n}
        for z, n in [(0, 4), (0, 2), (3, 1), (3, 3)]
    ]
    vol, skipped = load_volume(_series(tmp_path, rows))
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [2, 1]
    assert skipped == []


def test_inconsistent_shape_is_skipped(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    for name, source in [
        ("a.dcm", "MR_small.dcm"),
        ("b.dcm", "MR_small.dcm"),
        ("c.dcm", "CT_small.dcm"),
    ]:
        _copy(
            source,
            tmp_path / name,
            SOPInstanceUID=generate_uid(),
            SeriesInstanceUID=series,
            StudyInstanceUID=study,
        )
    (case,) = scan(tmp_path).cases
    vol, skipped = load_volume(case)
    assert vol.pixels.shape[1:] == (64, 64)
    assert [(s.path.name, s.reason) for s in skipped] == [("c.dcm", SkipReason.INCONSISTENT_SERIES)]


def _corrupt_j2k(path: Path) -> Path:
    ds = pydicom.dcmread(_testfile("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    ds["PixelData"].VR = "OB"
    return _write(ds, path)


def test_decode_error_skips_file_and_raises_when_nothing_decodes(tmp_path: Path) -> None:
    case = scan([_corrupt_j2k(tmp_path / "bad.dcm")]).cases[0]
    with pytest.raises(LoadFailure, match=r"could be decoded") as info:
        load_volume(case)
    (skip,) = info.value.skipped
    assert skip.reason is SkipReason.DECODE_ERROR and skip.detail and "\n" not in skip.detail


def test_short_encapsulated_pixel_data_is_truncated() -> None:
    result = scan([_testfile("emri_small_jpeg_2k_lossless_too_short.dcm")])
    with pytest.raises(LoadFailure) as info:
        load_volume(result.cases[0])
    assert [s.reason for s in info.value.skipped] == [SkipReason.TRUNCATED]


def test_one_bad_file_does_not_stop_the_series(tmp_path: Path) -> None:
    series = generate_uid()
    _copy(
        "MR_small.dcm",
        tmp_path / "good.dcm",
        SeriesInstanceUID=series,
        SOPInstanceUID=generate_uid(),
    )
    ds = pydicom.dcmread(_corrupt_j2k(tmp_path / "bad.dcm"))
    ds.SeriesInstanceUID, ds.StudyInstanceUID = (
        series,
        pydicom.dcmread(tmp_path / "good.dcm").StudyInstanceUID,
    )
    _write(ds, tmp_path / "bad.dcm")
    (case,) = scan(tmp_path).cases
    vol, skipped = load_volume(case)
    assert vol.pixels.shape == (1, 64, 64)
    assert [(s.path.name, s.reason) for s in skipped] == [("bad.dcm", SkipReason.DECODE_ERROR)]


# ---------------------------------------------------------------------------------------------
# load_study: errors a person can act on


def _setup_error(kind: str, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "missing"
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "not_dicom":
        (tmp_path / "notes.txt").write_text("not an image\n")
        return tmp_path / "notes.txt"
    if kind == "folder_not_dicom":
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "a.txt").write_text("a")
        (tmp_path / "f" / "b.csv").write_text("b,c")
        return tmp_path / "f"
    if kind == "sr":
        return _testfile("reportsi.dcm")
    if kind == "truncated":
        data = _testfile("CT_small.dcm").read_bytes()
        (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
        return tmp_path / "cut.dcm"
    if kind == "several":
        shutil.copy(_testfile("CT_small.dcm"), tmp_path / "ct.dcm")
        shutil.copy(_testfile("MR_small.dcm"), tmp_path / "mr.dcm")
        return tmp_path
    if kind == "unsupported":
        return _write(_as_mpeg2(pydicom.dcmread(_testfile("MR_small.dcm"))), tmp_path / "mpeg.dcm")
    if kind == "undecodable":
        return _corrupt_j2k(tmp_path / "bad.dcm")
    raise ValueError(kind)


STUDY_ERRORS = [
    ("missing", InvalidStudyError, r"missing does not exist; check the path"),
    ("empty", InvalidStudyError, r"empty holds no files; give a DICOM file or a series folder"),
    (
        "not_dicom",
        InvalidStudyError,
        r"notes\.txt is not a DICOM file \(no 'DICM' marker and no readable header\); give a DICOM file",
    ),
    (
        "folder_not_dicom",
        InvalidStudyError,
        r"holds no loadable DICOM image \(2 files: 2 not_dicom\)",
    ),
    (
        "sr",
        InvalidStudyError,
        r"reportsi\.dcm holds no image: Basic Text SR Storage has no pixel data; give",
    ),
    ("truncated", InvalidStudyError, r"cut\.dcm is truncated: .*; copy the file again"),
    ("several", InvalidStudyError, r"holds 2 series; give one series folder or one file"),
    (
        "unsupported",
        InvalidStudyError,
        r"mpeg\.dcm cannot be decoded here: transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100",
    ),
    ("undecodable", LoadFailure, r"bad\.dcm: decode_error: "),
]


@pytest.mark.parametrize(("kind", "error", "match"), STUDY_ERRORS)
def test_load_study_errors(kind: str, error: type[Exception], match: str, tmp_path: Path) -> None:
    path = _setup_error(kind, tmp_path)
    with pytest.raises(error, match=match) as info:
        load_study(path)
    assert "\n" not in str(info.value)


def test_load_study_file_and_folder(tmp_path: Path) -> None:
    case, vol = load_study(_testfile("CT_small.dcm"))
    assert vol.pixels.shape == (1, 128, 128) and case.header.Modality == "CT"
    shutil.copy(_testfile("MR_small.dcm"), tmp_path / "mr")
    (tmp_path / "LICENSE").write_text("BSD")
    case, vol = load_study(tmp_path)
    assert case.files == (tmp_path / "mr",) and vol.modality == "MR"


PHI_NAME, PHI_ID = "Zyxwvut^Qwerasdf", "PID-8675309-XQ"


def test_messages_and_logs_carry_no_patient_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = pydicom.dcmread(_testfile("CT_small.dcm"))
    base.PatientName, base.PatientID = PHI_NAME, PHI_ID
    good = _write(base, tmp_path / "good" / "ct.dcm")
    data = good.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "ct.dcm").write_bytes(data[: len(data) - 1000])
    no_pixels = copy.deepcopy(base)
    del no_pixels.PixelData
    _write(no_pixels, tmp_path / "nopix" / "ct.dcm")
    bad = copy.deepcopy(base)
    bad.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    bad.PixelData = encapsulate([PHI_NAME.encode() + b"\x00" * 99])
    bad["PixelData"].VR = "OB"
    _write(bad, tmp_path / "bad" / "ct.dcm")
    shutil.copy(good, tmp_path / "good" / "copy.dcm")
    _write(_as_mpeg2(copy.deepcopy(base)), tmp_path / "mpeg" / "ct.dcm")

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
# The real scanner sets of ../shared/data/dicom


def test_siemens_transfer_syntaxes_decode_identically(shared_dicom: Path) -> None:
    files = sorted((shared_dicom / "mr-siemens-transfer-syntaxes" / "In").glob("*.dcm"))
    assert len(files) == 9
    volumes = [load_study(f)[1].pixels for f in files]
    assert all(np.array_equal(volumes[0], v) for v in volumes[1:])
    syntaxes = {
        pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID for f in files
    }
    assert len(syntaxes) >= 7


def test_ge_gantry_tilt_is_one_sorted_case(shared_dicom: Path) -> None:
    folder = shared_dicom / "ct-head-ge-gantry-tilt" / "In" / "GE"
    case, vol = load_study(folder)
    assert len(case.files) == 28 and vol.pixels.shape == (28, 512, 512)
    # expected order: by position projected on the slice normal, computed here independently
    headers = [pydicom.dcmread(f) for f in case.files]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort(
        [np.dot(np.array(h.ImagePositionPatient, dtype=float), normal) for h in headers]
    )
    for k in (0, 13, 27):
        h = headers[order[k]]
        assert np.array_equal(
            vol.pixels[k], (h.pixel_array * float(h.RescaleSlope) + float(h.RescaleIntercept))
        )
    assert vol.spacing[0] > 0 and vol.modality == "CT"


def test_tcga_scan_counts_and_hounsfield(shared_dicom: Path) -> None:
    result = scan(shared_dicom / "tcga-luad-ct100")
    assert result.n_files == 101
    assert len(result.cases) == 95
    reasons = Counter(s.reason for s in result.skipped)
    assert reasons == {SkipReason.DUPLICATE: 5, SkipReason.NOT_DICOM: 1}
    assert [s.path.name for s in result.skipped if s.reason is SkipReason.NOT_DICOM] == [
        "labels.csv"
    ]
    _totals_add_up(result)
    for case in result.cases[::19]:
        vol, _ = load_volume(case)
        air = np.mean((vol.pixels > -1100) & (vol.pixels < -900))
        assert air > 0.02, case.files[0]  # rescale applied: air is near -1000 HU


def test_ge_mrdc_files_load(shared_dicom: Path) -> None:
    case, vol = load_study(shared_dicom / "mr-ge-dwi" / "In" / "01_Ax_DWI_TENSOR_R2")
    assert len(case.files) == 14 and all(".MRDC." in f.name for f in case.files)
    assert vol.pixels.shape == (2, 256, 256)  # 2 slice positions x 7 diffusion volumes


@pytest.mark.parametrize("folder", ["ax/axasc36", "axmb/AxAsc36mb2a", "axmb/AxInt36mb"])
def test_siemens_mosaic_loads(shared_dicom: Path, folder: str) -> None:
    case, vol = load_study(shared_dicom / "mr-siemens-mosaic" / "In" / "Orientation" / folder)
    assert len(case.files) == 2
    assert vol.pixels.ndim == 3 and vol.pixels.shape[0] == 1  # both time points at one position
    assert vol.pixels.max() > 0


def test_philips_enhanced_64_frames(shared_dicom: Path) -> None:
    path = shared_dicom / "mr-enhanced-multiframe" / "In" / "Philips" / "IM_0027_fMAP.dcm"
    case, vol = load_study(path)
    assert case.header.NumberOfFrames == 64
    assert vol.pixels.shape == (32, 64, 64)  # 2 frames at each of 32 positions
    assert vol.spacing == pytest.approx((4.0, 4.0, 4.0))


def test_siemens_xa_enhanced_objects_are_cases_of_their_own(shared_dicom: Path) -> None:
    result = scan(shared_dicom / "mr-enhanced-multiframe" / "In" / "Siemens")
    assert [c.part for c in result.cases] == ["mf1", "mf2", "mf3", "mf4"]
    for case in result.cases:
        vol, skipped = load_volume(case)
        assert vol.pixels.shape == (6, 64, 64) and skipped == []


def test_philips_fmri_keeps_one_time_point(shared_dicom: Path) -> None:
    folder = shared_dicom / "mr-philips-fmri" / "In" / "Magdeburg_2014" / "fmri"
    case, vol = load_study(folder)
    assert len(case.files) == 27 and vol.pixels.shape == (9, 64, 64)
    headers = [pydicom.dcmread(f) for f in case.files]
    first = min(headers, key=lambda h: int(h.InstanceNumber))
    kept = [h for h in headers if h.ImagePositionPatient == first.ImagePositionPatient]
    assert min(int(h.InstanceNumber) for h in kept) == int(first.InstanceNumber)
    expected = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert any(np.array_equal(vol.pixels[k], expected.astype(np.float32)) for k in range(9))


def test_toshiba_partial_series_loads(shared_dicom: Path) -> None:
    case, vol = load_study(
        shared_dicom / "mr-toshiba-dti-partial" / "In" / "Galan" / "7006_DTI_ortho"
    )
    assert len(case.files) == 10 and vol.pixels.shape[1:] == (64, 64)


@pytest.mark.slow
def test_everything_scans_and_loads_or_fails_cleanly(shared_dicom: Path) -> None:
    files = [p for p in shared_dicom.rglob("*") if p.is_file()]
    files += [Path(p) for p in get_testdata_files() if Path(p).is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately odd files
        result = scan(files)
        assert result.n_files == len(set(files))
        _totals_add_up(result)
        assert all(s.detail for s in result.skipped)
        loaded = failed = 0
        for case in result.cases:
            try:
                vol, skipped = load_volume(case)
            except LoadFailure as exc:
                assert exc.skipped and "\n" not in str(exc)
                failed += 1
                continue
            assert vol.pixels.dtype == np.float32
            assert vol.pixels.ndim == (4 if vol.rgb else 3)
            assert vol.pixels.shape[0] >= 1 and all(s > 0 for s in vol.spacing)
            assert {s.path for s in skipped} <= set(case.files)
            loaded += 1
    assert loaded > 100 and failed < 10


def test_io_layer_imports_no_torch_monai_or_faiss() -> None:
    import ast

    import medsearch.io.dicom as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"torch", "monai", "faiss"}


# ---------------------------------------------------------------------------------------------
# load_volume(select=...): only the slices that will be used are decoded, the same ones


def _axial_and_middle(depth: int) -> list[int]:
    """What the indexing pipeline asks for by default: 5 evenly spaced slices and the middle one."""
    return sorted({int((i + 0.5) * depth / min(5, depth)) for i in range(min(5, depth))} | {depth // 2})


def _same_used_slices(case: CaseRef) -> tuple:
    """Load ``case`` whole and with select; check the selected load gives the same volume where it matters."""
    full, full_skipped = load_volume(case)
    part, part_skipped = load_volume(case, select=_axial_and_middle)
    assert full.decoded is None
    assert part.pixels.shape == full.pixels.shape and part.pixels.dtype == full.pixels.dtype
    assert (part.spacing, part.modality, part.rgb) == (full.spacing, full.modality, full.rgb)
    assert part_skipped == full_skipped
    used = part.decoded if part.decoded is not None else range(full.pixels.shape[0])
    for i in used:
        np.testing.assert_array_equal(part.pixels[i], full.pixels[i])
    # without the geometry the scan recorded (a case from an older file-state cache): every file
    # is read again, and the result is the same
    again, again_skipped = load_volume(dataclasses.replace(case, geometry=()), select=_axial_and_middle)
    assert again_skipped == part_skipped and again.decoded == part.decoded and again.spacing == part.spacing
    np.testing.assert_array_equal(again.pixels, part.pixels)
    return part, part_skipped


def _sample_series(root: Path, order: list[int], *, duplicate: int | None = None) -> Path:
    """A series of the bundled TCGA CT slice at 2.5 mm steps, files named in ``order``; a repeated position."""
    src = min((Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample" / "tcga-luad-ct").glob("*.dcm"))
    base = pydicom.dcmread(src)
    study, series = generate_uid(entropy_srcs=["sel", "study"]), generate_uid(entropy_srcs=["sel", "series"])
    for name, z in enumerate(order):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["sel", str(name)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        position = duplicate if duplicate is not None and name == len(order) - 1 else z
        ds.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * position]
        ds.InstanceNumber = name + 1
        pixels = ds.pixel_array.copy()
        pixels[:8, :8] = z  # each slice different
        ds.PixelData = pixels.tobytes()
        _write(ds, root / f"f{name:02d}.dcm")
    return root


SELECT_SERIES = [
    ("in order", list(range(8)), None),
    ("shuffled", [5, 0, 7, 2, 6, 1, 4, 3, 9, 8, 11, 10], None),
    ("a repeated position", list(range(9)), 3),
]


@pytest.mark.parametrize(("name", "order", "duplicate"), SELECT_SERIES, ids=[c[0] for c in SELECT_SERIES])
def test_select_decodes_only_the_used_slices_of_a_sample_series(tmp_path: Path, name: str, order: list[int], duplicate: int | None) -> None:
    result = scan(_sample_series(tmp_path / "series", order, duplicate=duplicate))
    (case,) = result.cases
    part, _ = _same_used_slices(case)
    depth = len(set(order)) if duplicate is None else len(order) - 1
    assert part.pixels.shape[0] == depth
    assert part.decoded == tuple(_axial_and_middle(depth))
    unused = [i for i in range(depth) if i not in part.decoded]
    assert unused and not part.pixels[unused].any()  # never decoded


SHARED_SERIES = ["ct-head-ge-gantry-tilt", "mr-ge-dwi", "mr-philips-fmri", "mr-toshiba-dti-partial",
                 "mr-enhanced-multiframe", "mr-siemens-transfer-syntaxes", "tcga-luad-ct100"]


@pytest.mark.parametrize("folder", SHARED_SERIES)
def test_select_gives_the_slices_of_a_full_decode_on_real_series(shared_dicom: Path, folder: str) -> None:
    result = scan(shared_dicom / folder)
    partial = 0
    for case in result.cases[:12]:
        part, _ = _same_used_slices(case)
        partial += part.decoded is not None and len(part.decoded) < part.pixels.shape[0]
    if folder in ("ct-head-ge-gantry-tilt", "mr-philips-fmri", "mr-toshiba-dti-partial"):
        assert partial  # long series of single-frame files: most slices were not decoded


def test_select_leaves_multiframe_and_rgb_cases_whole() -> None:
    for name in ("emri_small.dcm", "SC_rgb.dcm", "US1_UNCR.dcm"):
        (case,) = scan([_testfile(name)]).cases
        part, _ = _same_used_slices(case)
        assert part.decoded is None, name


def _break_pixels(path: Path) -> None:
    """Make a file whose header and length read fine but whose pixel data does not decode."""
    ds = pydicom.dcmread(path)
    ds.BitsAllocated = 32  # twice the bytes the stored pixel data holds
    ds.BitsStored = 32
    ds.HighBit = 31
    _write(ds, path)


def test_a_broken_slice_that_is_not_used_stays_in_the_case(tmp_path: Path) -> None:
    root = _sample_series(tmp_path / "series", list(range(8)))
    unused = sorted(root.glob("*.dcm"))[1]  # stack position 1: not among 0, 2, 4, 5, 7
    _break_pixels(unused)
    (case,) = scan(root).cases
    full, full_skipped = load_volume(case)
    assert [s.path for s in full_skipped] == [unused] and full.pixels.shape[0] == 7
    part, part_skipped = load_volume(case, select=_axial_and_middle)
    # its pixels are not checked: it counts as part of the case, and the stack keeps its place
    assert part_skipped == [] and part.pixels.shape[0] == 8 and part.decoded == (0, 2, 4, 5, 7)


def test_a_broken_slice_that_is_used_makes_the_whole_case_decode(tmp_path: Path) -> None:
    root = _sample_series(tmp_path / "series", list(range(8)))
    used = sorted(root.glob("*.dcm"))[2]
    _break_pixels(used)
    (case,) = scan(root).cases
    part, skipped = _same_used_slices(case)
    assert [s.path for s in skipped] == [used] and skipped[0].reason in (SkipReason.DECODE_ERROR, SkipReason.TRUNCATED)
    assert part.decoded is None and part.pixels.shape[0] == 7


def _count_full_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    from medsearch.io import dicom

    read: list[Path] = []
    real = dicom._read_full

    def counting(path: Path):
        read.append(path)
        return real(path)

    monkeypatch.setattr(dicom, "_read_full", counting)
    return read


def test_select_reads_only_the_selected_files_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _sample_series(tmp_path / "series", [5, 0, 7, 2, 6, 1, 4, 3])  # file name order is not stack order
    (case,) = scan(root).cases
    assert len(case.geometry) == 8 and all(g is not None and (g.rows, g.columns) == (512, 512) for g in case.geometry)
    read = _count_full_reads(monkeypatch)
    part, skipped = load_volume(case, select=_axial_and_middle)
    assert skipped == [] and part.decoded == (0, 2, 4, 5, 7)
    # the files at stack positions 0, 2, 4, 5 and 7, and no other
    by_position = {z: root / f"f{name:02d}.dcm" for name, z in enumerate([5, 0, 7, 2, 6, 1, 4, 3])}
    assert sorted(read) == sorted(by_position[z] for z in (0, 2, 4, 5, 7))
    read.clear()
    load_volume(dataclasses.replace(case, geometry=()), select=_axial_and_middle)
    assert len(read) == 8  # without recorded geometry, every file


def test_a_selected_file_that_moved_since_the_scan_makes_the_case_read_again(tmp_path: Path) -> None:
    root = _sample_series(tmp_path / "series", list(range(8)))
    (case,) = scan(root).cases
    moved = root / "f02.dcm"  # stack position 2, selected
    ds = pydicom.dcmread(moved)
    ds.ImagePositionPatient = [0.0, 0.0, 500.0]  # now the top of the stack
    _write(ds, moved)
    part, skipped = load_volume(case, select=_axial_and_middle)
    fresh, fresh_skipped = load_volume(scan(root).cases[0], select=_axial_and_middle)
    assert skipped == fresh_skipped == [] and part.decoded == fresh.decoded
    np.testing.assert_array_equal(part.pixels, fresh.pixels)  # the stack as the files now are


def test_slice_geometry_survives_its_list_form() -> None:
    from medsearch.io import SliceGeometry

    for g in (SliceGeometry(512, 512, (0.0, -1.5, 2.25), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 3.0, math.inf),
              SliceGeometry(10, 20, None, None, math.inf, 7.0)):
        assert SliceGeometry.from_list(json.loads(json.dumps(g.to_list()))) == g


def test_select_indices_out_of_range_raise(tmp_path: Path) -> None:
    (case,) = scan(_sample_series(tmp_path / "series", list(range(3)))).cases
    with pytest.raises(ValueError, match=r"slice indices \[3\] for a stack of 3"):
        load_volume(case, select=lambda depth: [depth])


GRAY_FILES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "emri_small.dcm", "MR_small_bigendian.dcm", "OBXXXX1A.dcm"]


@pytest.mark.parametrize("name", GRAY_FILES)
@pytest.mark.parametrize("changes", [{}, {"RescaleSlope": -1, "RescaleIntercept": 0}, {"RescaleSlope": 2, "RescaleIntercept": -3},
                                     {"RescaleSlope": 0.5, "RescaleIntercept": 0}, {"PhotometricInterpretation": "MONOCHROME1"}])
def test_gray_in_float32_is_the_float64_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, changes: dict) -> None:
    from medsearch.io import dicom

    ds = pydicom.dcmread(_copy(name, tmp_path / name, **changes))
    if ds.get("SamplesPerPixel", 1) != 1:
        pytest.skip(f"{name} is not grayscale")
    arr = ds.pixel_array
    arr = arr[np.newaxis] if arr.ndim == 2 else arr
    fast = dicom._gray(arr, ds)
    monkeypatch.setattr(dicom, "_gray_in_float32", lambda arr, ds: None)
    slow = dicom._gray(arr, ds)
    assert fast.dtype == slow.dtype == np.float32
    assert fast.tobytes() == slow.tobytes()
