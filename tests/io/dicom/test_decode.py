"""Tests of medsearch.io.dicom.decode: pixel values after decoding, rescale and photometric conversion.

Each file is decoded through scan and load_volume, as an indexed case is; real files first
(pydicom's and pydicom-data's test files), synthetic DICOMs in tmp_path only for what no real file shows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsearch.io.dicom import (
    LoadFailure,
    SkipReason,
    load_volume,
    scan,
)


@pytest.fixture
def raw(testfile: Callable[[str], Path]) -> Callable[[str | Path], np.ndarray]:
    """The pixel array pydicom reads from a file (a path, or a pydicom test file's name)."""

    def read(name_or_path: str | Path) -> np.ndarray:
        path = Path(name_or_path) if isinstance(name_or_path, Path) else testfile(name_or_path)
        return pydicom.dcmread(path).pixel_array

    return read


def _load_one(path: Path):
    result = scan([path])
    assert len(result.cases) == 1, result.skipped
    return load_volume(result.cases[0])


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
    reference: str,
    other: str,
    testfile: Callable[[str], Path],
) -> None:
    ref, _ = _load_one(testfile(reference))
    vol, _ = _load_one(testfile(other))
    assert vol.pixels.dtype == np.float32
    assert np.array_equal(ref.pixels, vol.pixels)
    assert ref.spacing == vol.spacing and ref.rgb == vol.rgb


def test_rescale_is_applied_ct_small(testfile: Callable[[str], Path]) -> None:
    path = testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol, skipped = _load_one(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert skipped == []
    assert vol.pixels.shape == (1, 128, 128)
    assert np.array_equal(vol.pixels[0], expected.astype(np.float32))
    assert vol.modality == "CT" and not vol.rgb
    assert vol.spacing == pytest.approx((5.0, 0.661468, 0.661468))


def test_monochrome1_is_inverted_real_cr(testfile: Callable[[str], Path]) -> None:
    path = testfile("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    vol, _ = _load_one(path)
    top = 2.0 ** int(ds.BitsStored) - 1
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = (top * slope + 2 * intercept) - (ds.pixel_array * slope + intercept)
    assert np.allclose(vol.pixels[0], expected)


def test_monochrome1_inverts_the_same_image_as_monochrome2(
    tmp_path: Path,
    copy_testfile: Callable[..., Path],
    testfile: Callable[[str], Path],
) -> None:
    mono2, _ = _load_one(copy_testfile("MR_small.dcm", tmp_path / "m2.dcm"))
    mono1, _ = _load_one(
        copy_testfile("MR_small.dcm", tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    )
    ds = pydicom.dcmread(testfile("MR_small.dcm"))
    lo, hi = (
        (-(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1)
        if ds.PixelRepresentation
        else (0.0, 2.0**ds.BitsStored - 1)
    )
    assert np.array_equal(mono1.pixels, (lo + hi) - mono2.pixels)


@pytest.mark.parametrize(
    "name", ["SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"]
)
def test_ybr_becomes_rgb(name: str, testfile: Callable[[str], Path]) -> None:
    ref, _ = _load_one(testfile("SC_rgb.dcm"))
    vol, _ = _load_one(testfile(name))
    assert vol.rgb and vol.pixels.shape == (1, 100, 100, 3)
    assert np.abs(vol.pixels - ref.pixels).mean() < 3.0  # lossy JPEG and YBR rounding only


def test_palette_colour_becomes_rgb(testfile: Callable[[str], Path]) -> None:
    vol, _ = _load_one(testfile("OBXXXX1A.dcm"))
    assert vol.rgb and vol.pixels.shape == (1, 600, 800, 3) and vol.pixels.dtype == np.float32
    assert not np.array_equal(vol.pixels[..., 0], vol.pixels[..., 1])
    assert vol.modality == "US"


def test_file_without_meta_loads(testfile: Callable[[str], Path]) -> None:
    vol, _ = _load_one(testfile("OT-PAL-8-face.dcm"))
    assert vol.rgb and vol.pixels.shape == (1, 480, 640, 3)


def test_multiframe_becomes_volume(testfile: Callable[[str], Path], raw: Callable[[str | Path], np.ndarray]) -> None:
    path = testfile("emri_small.dcm")
    vol, _ = _load_one(path)
    assert vol.pixels.shape == (10, 64, 64)
    assert np.array_equal(vol.pixels, raw(path).astype(np.float32))
    assert vol.spacing[0] == pytest.approx(float(pydicom.dcmread(path).SpacingBetweenSlices))


def test_enhanced_rescale_per_frame_then_shared(
    tmp_path: Path,
    testfile: Callable[[str], Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def transform(slope: float, intercept: float) -> Dataset:
        group, item = Dataset(), Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
        group.PixelValueTransformationSequence = Sequence([item])
        return group

    ds = pydicom.dcmread(testfile("emri_small.dcm"))
    ds.SharedFunctionalGroupsSequence = Sequence([transform(2.0, -100.0)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [transform(3.0, 5.0)] + [Dataset() for _ in range(9)]
    )
    vol, _ = _load_one(write_dicom(ds, tmp_path / "enh.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    assert np.allclose(vol.pixels[0], raw[0] * 3 + 5)
    assert np.allclose(vol.pixels[1:], raw[1:] * 2 - 100)


def test_enhanced_ct_uses_functional_groups(testfile: Callable[[str], Path]) -> None:
    path = testfile("eCT_Supplemental.dcm")
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


# ---------------------------------------------------------------------------------------------
# Files that do not decode


def test_decode_error_skips_file_and_raises_when_nothing_decodes(tmp_path: Path, corrupt_j2k: Callable[[Path], Path]) -> None:
    case = scan([corrupt_j2k(tmp_path / "bad.dcm")]).cases[0]
    with pytest.raises(LoadFailure, match=r"could be decoded") as info:
        load_volume(case)
    (skip,) = info.value.skipped
    assert skip.reason is SkipReason.DECODE_ERROR and skip.detail and "\n" not in skip.detail


def test_short_encapsulated_pixel_data_is_truncated(testfile: Callable[[str], Path]) -> None:
    result = scan([testfile("emri_small_jpeg_2k_lossless_too_short.dcm")])
    with pytest.raises(LoadFailure) as info:
        load_volume(result.cases[0])
    assert [s.reason for s in info.value.skipped] == [SkipReason.TRUNCATED]


# ---------------------------------------------------------------------------------------------
# The float32 shortcut of the modality LUT

GRAY_FILES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "emri_small.dcm", "MR_small_bigendian.dcm", "OBXXXX1A.dcm"]


@pytest.mark.parametrize("name", GRAY_FILES)
@pytest.mark.parametrize("changes", [{}, {"RescaleSlope": -1, "RescaleIntercept": 0}, {"RescaleSlope": 2, "RescaleIntercept": -3},
                                     {"RescaleSlope": 0.5, "RescaleIntercept": 0}, {"PhotometricInterpretation": "MONOCHROME1"}])
def test_gray_in_float32_is_the_float64_result(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    changes: dict,
    copy_testfile: Callable[..., Path],
) -> None:
    from medsearch.io.dicom import decode as dicom

    ds = pydicom.dcmread(copy_testfile(name, tmp_path / name, **changes))
    if ds.get("SamplesPerPixel", 1) != 1:
        pytest.skip(f"{name} is not grayscale")
    arr = ds.pixel_array
    arr = arr[np.newaxis] if arr.ndim == 2 else arr
    fast = dicom._gray(arr, ds)
    monkeypatch.setattr(dicom, "_gray_in_float32", lambda arr, ds: None)
    slow = dicom._gray(arr, ds)
    assert fast.dtype == slow.dtype == np.float32
    assert fast.tobytes() == slow.tobytes()


# ---------------------------------------------------------------------------------------------
# A compressed image must be the size its header declares, before any decoder runs

BOMBS = ["j2k", "jpeg", "jpegls"]


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the pixel decoder (pydicom's frame iterator)."""
    from medsearch.io.dicom import decode

    calls: list[int] = []
    real = decode._frames_of
    monkeypatch.setattr(decode, "_frames_of", lambda ds: calls.append(1) or real(ds))
    return calls


@pytest.mark.parametrize("kind", BOMBS)
def test_a_codestream_that_claims_60000_x_60000_is_too_large_before_decoding(
    tmp_path: Path, kind: str, testfile: Callable[[str], Path], decoder_calls: list[int]
) -> None:
    """A 6 KB JPEG 2000 file whose SIZ claims 60000 x 60000 under a 64 x 64 header drove a worker to 7.9 GB."""
    from hostile.files import _BOMB_SOURCES, codestream_bomb

    testfile(_BOMB_SOURCES[kind])
    path = codestream_bomb(tmp_path / f"{kind}.dcm", kind)
    with pytest.raises(LoadFailure) as info:
        _load_one(path)
    (skip,) = info.value.skipped
    assert skip.reason is SkipReason.TOO_LARGE and "frame 1 claims more pixels than the 1 GiB" in skip.detail
    assert "60000" not in skip.detail and decoder_calls == []


@pytest.mark.parametrize("kind", BOMBS)
def test_a_codestream_of_another_size_than_the_header_is_a_mismatch(
    tmp_path: Path, kind: str, testfile: Callable[[str], Path], decoder_calls: list[int]
) -> None:
    from hostile.files import _BOMB_SOURCES, codestream_bomb

    testfile(_BOMB_SOURCES[kind])
    path = codestream_bomb(tmp_path / f"{kind}.dcm", kind, size=96)
    with pytest.raises(LoadFailure) as info:
        _load_one(path)
    (skip,) = info.value.skipped
    assert skip.reason is SkipReason.CODESTREAM_MISMATCH and "is not the size the header declares" in skip.detail
    assert decoder_calls == []


COMPRESSED = [
    "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "emri_small_jpeg_2k_lossless.dcm", "US1_J2KR.dcm", "RG3_J2KR.dcm",
    "JPEG-LL.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_small_odd_jpeg.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "emri_small_jpeg_ls_lossless.dcm",
]


@pytest.mark.parametrize("name", COMPRESSED)
def test_real_compressed_files_pass_the_codestream_check(name: str, testfile: Callable[[str], Path]) -> None:
    from pydicom.encaps import generate_frames

    from medsearch.io.dicom import decode

    ds = pydicom.dcmread(testfile(name))
    decode._check_codestreams(ds)  # raises nothing
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    found = decode._codestream_size(next(generate_frames(ds.PixelData, number_of_frames=frames))[: 2**20])
    assert found is not None and found[1:] == (ds.Columns, ds.Rows, ds.SamplesPerPixel)


def test_frames_are_decoded_one_at_a_time_into_one_array(testfile: Callable[[str], Path], decoder_calls: list[int]) -> None:
    """A multi-frame file gives the frames pydicom's whole-array decode gives, bit for bit."""
    from medsearch.io.dicom.decode import _decode
    from medsearch.io.dicom.read import _read_full

    for name in ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"):
        ds = _read_full(testfile(name))
        out = _decode(ds)
        assert out.dtype == np.float32 and out.shape == (10, 64, 64)
        assert np.array_equal(out, pydicom.dcmread(testfile(name)).pixel_array.astype(np.float32))
    assert len(decoder_calls) == 3
