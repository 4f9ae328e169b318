"""Tests of medsearch.io.dicom.study: a case's volume, a query study and its errors, and the real scanner sets.

Real files first (pydicom's and pydicom-data's test files, the sets in ../shared/data); synthetic
DICOMs in tmp_path only for what no real file shows.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLE
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom import (
    CaseRef,
    LoadFailure,
    ScanResult,
    SkipReason,
    load_study,
    load_volume,
    scan,
)

# ---------------------------------------------------------------------------------------------
# load_volume: files left out of a case


def test_inconsistent_shape_is_skipped(tmp_path: Path, copy_testfile: Callable[..., Path]) -> None:
    series, study = generate_uid(), generate_uid()
    for name, source in [
        ("a.dcm", "MR_small.dcm"),
        ("b.dcm", "MR_small.dcm"),
        ("c.dcm", "CT_small.dcm"),
    ]:
        copy_testfile(
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


def test_one_bad_file_does_not_stop_the_series(
    tmp_path: Path,
    copy_testfile: Callable[..., Path],
    corrupt_j2k: Callable[[Path], Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
) -> None:
    series = generate_uid()
    copy_testfile(
        "MR_small.dcm",
        tmp_path / "good.dcm",
        SeriesInstanceUID=series,
        SOPInstanceUID=generate_uid(),
    )
    ds = pydicom.dcmread(corrupt_j2k(tmp_path / "bad.dcm"))
    ds.SeriesInstanceUID, ds.StudyInstanceUID = (
        series,
        pydicom.dcmread(tmp_path / "good.dcm").StudyInstanceUID,
    )
    write_dicom(ds, tmp_path / "bad.dcm")
    (case,) = scan(tmp_path).cases
    vol, skipped = load_volume(case)
    assert vol.pixels.shape == (1, 64, 64)
    assert [(s.path.name, s.reason) for s in skipped] == [("bad.dcm", SkipReason.DECODE_ERROR)]


# ---------------------------------------------------------------------------------------------
# load_study: errors a person can act on


@pytest.fixture
def setup_error(
    testfile: Callable[[str], Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
    as_mpeg2: Callable[[pydicom.Dataset], pydicom.Dataset],
    corrupt_j2k: Callable[[Path], Path],
) -> Callable[[str, Path], Path]:
    def make(kind: str, tmp_path: Path) -> Path:
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
            return testfile("reportsi.dcm")
        if kind == "truncated":
            data = testfile("CT_small.dcm").read_bytes()
            (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
            return tmp_path / "cut.dcm"
        if kind == "several":
            shutil.copy(testfile("CT_small.dcm"), tmp_path / "ct.dcm")
            shutil.copy(testfile("MR_small.dcm"), tmp_path / "mr.dcm")
            return tmp_path
        if kind == "unsupported":
            return write_dicom(as_mpeg2(pydicom.dcmread(testfile("MR_small.dcm"))), tmp_path / "mpeg.dcm")
        if kind == "undecodable":
            return corrupt_j2k(tmp_path / "bad.dcm")
        raise ValueError(kind)

    return make


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
        r"reportsi\.dcm holds no image: Basic Text SR Storage is not an image storage class .*; give",
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
def test_load_study_errors(
    kind: str,
    error: type[Exception],
    match: str,
    tmp_path: Path,
    setup_error: Callable[[str, Path], Path],
) -> None:
    path = setup_error(kind, tmp_path)
    with pytest.raises(error, match=match) as info:
        load_study(path)
    assert "\n" not in str(info.value)


def test_load_study_file_and_folder(tmp_path: Path, testfile: Callable[[str], Path]) -> None:
    case, vol = load_study(testfile("CT_small.dcm"))
    assert vol.pixels.shape == (1, 128, 128) and case.header.Modality == "CT"
    shutil.copy(testfile("MR_small.dcm"), tmp_path / "mr")
    (tmp_path / "LICENSE").write_text("BSD")
    case, vol = load_study(tmp_path)
    assert case.files == (tmp_path / "mr",) and vol.modality == "MR"


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


def test_tcga_scan_counts_and_hounsfield(shared_dicom: Path, totals_add_up: Callable[[ScanResult], None]) -> None:
    result = scan(shared_dicom / "tcga-luad-ct100")
    assert result.n_files == 101
    assert len(result.cases) == 95
    reasons = Counter(s.reason for s in result.skipped)
    assert reasons == {SkipReason.DUPLICATE: 5, SkipReason.NOT_DICOM: 1}
    assert [s.path.name for s in result.skipped if s.reason is SkipReason.NOT_DICOM] == [
        "labels.csv"
    ]
    totals_add_up(result)
    for case in result.cases[::19]:
        vol, _ = load_volume(case)
        air = np.mean((vol.pixels > -1100) & (vol.pixels < -900))
        assert air > 0.02, case.files[0]  # rescale applied: air is near -1000 HU


def test_ge_mrdc_files_load(shared_dicom: Path) -> None:
    case, vol = load_study(shared_dicom / "mr-ge-dwi" / "In" / "01_Ax_DWI_TENSOR_R2")
    assert len(case.files) == 14 and all(".MRDC." in f.name for f in case.files)
    assert vol.pixels.shape == (2, 256, 256)  # 2 slice positions x 7 diffusion volumes


@pytest.mark.parametrize(("folder", "tile"), [("ax/axasc36", 64), ("axmb/AxAsc36mb2a", 86), ("axmb/AxInt36mb", 86)])
def test_siemens_mosaic_loads_as_its_slices(shared_dicom: Path, folder: str, tile: int) -> None:
    """Issue 17: a mosaic was one tiled picture; each file is now a volume of its 36 slices (JPEG and
    JPEG 2000 ones too), and the series folder of two time points says to give one file."""
    series = shared_dicom / "mr-siemens-mosaic" / "In" / "Orientation" / folder
    first = sorted(p for p in series.iterdir() if p.is_file())[0]
    case, vol = load_study(first)
    assert vol.pixels.shape == (36, tile, tile)
    assert all(vol.pixels[i].max() > 0 for i in range(36))
    assert vol.spacing[1] == vol.spacing[2] and vol.spacing[0] > 0
    with pytest.raises(InvalidStudyError, match=r"holds one series of 2 multi-frame or mosaic files, each a volume of its own; give one of its files"):
        load_study(series)


def test_philips_enhanced_64_frames(shared_dicom: Path) -> None:
    path = shared_dicom / "mr-enhanced-multiframe" / "In" / "Philips" / "IM_0027_fMAP.dcm"
    case, vol = load_study(path)
    assert case.header.NumberOfFrames == 64
    assert vol.pixels.shape == (32, 64, 64)  # 2 frames at each of 32 positions
    assert vol.spacing == pytest.approx((4.0, 4.0, 4.0))


def test_one_series_of_several_volumes_is_not_called_several_series(shared_dicom: Path) -> None:
    """Issue 17: the message said "holds 4 series" for one series of 4 multi-frame objects."""
    folder = shared_dicom / "mr-enhanced-multiframe" / "In" / "Siemens"
    with pytest.raises(InvalidStudyError) as info:
        load_study(folder)
    assert "holds one series of 4 multi-frame or mosaic files, each a volume of its own; give one of its files" in str(info.value)
    assert "4 series" not in str(info.value)


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
def test_everything_scans_and_loads_or_fails_cleanly(shared_dicom: Path, totals_add_up: Callable[[ScanResult], None]) -> None:
    files = [p for p in shared_dicom.rglob("*") if p.is_file()]
    files += [Path(p) for p in get_testdata_files() if Path(p).is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately odd files
        result = scan(files)
        assert result.n_files == len(set(files))
        totals_add_up(result)
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

    imported: set[str] = set()
    for path in sorted(Path(module.__file__).parent.glob("*.py")):  # every module of the subpackage
        tree = ast.parse(path.read_text())
        imported |= {
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


@pytest.fixture
def sample_series(write_dicom: Callable[[pydicom.Dataset, Path], Path]) -> Callable[..., Path]:
    """A series of the bundled TCGA CT slice at 2.5 mm steps, files named in ``order``; a repeated position."""

    def make(root: Path, order: list[int], *, duplicate: int | None = None) -> Path:
        src = min((SAMPLE / "tcga-luad-ct").glob("*.dcm"))
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
            write_dicom(ds, root / f"f{name:02d}.dcm")
        return root

    return make


SELECT_SERIES = [
    ("in order", list(range(8)), None),
    ("shuffled", [5, 0, 7, 2, 6, 1, 4, 3, 9, 8, 11, 10], None),
    ("a repeated position", list(range(9)), 3),
]


@pytest.mark.parametrize(("name", "order", "duplicate"), SELECT_SERIES, ids=[c[0] for c in SELECT_SERIES])
def test_select_decodes_only_the_used_slices_of_a_sample_series(
    tmp_path: Path,
    name: str,
    order: list[int],
    duplicate: int | None,
    sample_series: Callable[..., Path],
) -> None:
    result = scan(sample_series(tmp_path / "series", order, duplicate=duplicate))
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


def test_select_leaves_multiframe_and_rgb_cases_whole(testfile: Callable[[str], Path]) -> None:
    for name in ("emri_small.dcm", "SC_rgb.dcm", "US1_UNCR.dcm"):
        (case,) = scan([testfile(name)]).cases
        part, _ = _same_used_slices(case)
        assert part.decoded is None, name


@pytest.fixture
def break_pixels(write_dicom: Callable[[pydicom.Dataset, Path], Path]) -> Callable[[Path], None]:
    """Make a file whose header and length read fine but whose pixel data does not decode."""

    def make(path: Path) -> None:
        ds = pydicom.dcmread(path)
        ds.BitsAllocated = 32  # twice the bytes the stored pixel data holds
        ds.BitsStored = 32
        ds.HighBit = 31
        write_dicom(ds, path)

    return make


def test_a_broken_slice_that_is_not_used_stays_in_the_case(
    tmp_path: Path,
    sample_series: Callable[..., Path],
    break_pixels: Callable[[Path], None],
) -> None:
    root = sample_series(tmp_path / "series", list(range(8)))
    unused = sorted(root.glob("*.dcm"))[1]  # stack position 1: not among 0, 2, 4, 5, 7
    break_pixels(unused)
    (case,) = scan(root).cases
    full, full_skipped = load_volume(case)
    assert [s.path for s in full_skipped] == [unused] and full.pixels.shape[0] == 7
    part, part_skipped = load_volume(case, select=_axial_and_middle)
    # its pixels are not checked: it counts as part of the case, and the stack keeps its place
    assert part_skipped == [] and part.pixels.shape[0] == 8 and part.decoded == (0, 2, 4, 5, 7)


def test_a_broken_slice_that_is_used_makes_the_whole_case_decode(
    tmp_path: Path,
    sample_series: Callable[..., Path],
    break_pixels: Callable[[Path], None],
) -> None:
    root = sample_series(tmp_path / "series", list(range(8)))
    used = sorted(root.glob("*.dcm"))[2]
    break_pixels(used)
    (case,) = scan(root).cases
    part, skipped = _same_used_slices(case)
    assert [s.path for s in skipped] == [used] and skipped[0].reason in (SkipReason.DECODE_ERROR, SkipReason.TRUNCATED)
    assert part.decoded is None and part.pixels.shape[0] == 7


def _count_full_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    from medsearch.io.dicom import study as dicom

    read: list[Path] = []
    real = dicom._read_full

    def counting(path: Path):
        read.append(path)
        return real(path)

    monkeypatch.setattr(dicom, "_read_full", counting)
    return read


def test_select_reads_only_the_selected_files_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sample_series: Callable[..., Path],
) -> None:
    root = sample_series(tmp_path / "series", [5, 0, 7, 2, 6, 1, 4, 3])  # file name order is not stack order
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


def test_a_selected_file_that_moved_since_the_scan_makes_the_case_read_again(
    tmp_path: Path,
    sample_series: Callable[..., Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
) -> None:
    root = sample_series(tmp_path / "series", list(range(8)))
    (case,) = scan(root).cases
    moved = root / "f02.dcm"  # stack position 2, selected
    ds = pydicom.dcmread(moved)
    ds.ImagePositionPatient = [0.0, 0.0, 500.0]  # now the top of the stack
    write_dicom(ds, moved)
    part, skipped = load_volume(case, select=_axial_and_middle)
    fresh, fresh_skipped = load_volume(scan(root).cases[0], select=_axial_and_middle)
    assert skipped == fresh_skipped == [] and part.decoded == fresh.decoded
    np.testing.assert_array_equal(part.pixels, fresh.pixels)  # the stack as the files now are


def test_select_indices_out_of_range_raise(tmp_path: Path, sample_series: Callable[..., Path]) -> None:
    (case,) = scan(sample_series(tmp_path / "series", list(range(3)))).cases
    with pytest.raises(ValueError, match=r"slice indices \[3\] for a stack of 3"):
        load_volume(case, select=lambda depth: [depth])


# ---------------------------------------------------------------------------------------------
# A multi-frame volume is put in order in place, not copied

IN_ORDER_TABLE = [
    [0, 1, 2, 3, 4],
    [4, 3, 2, 1, 0],
    [1, 2, 3, 4, 0],
    [2, 0, 4],  # frames at one position dropped: only the kept ones, in their order
    [3],
]


@pytest.mark.parametrize("order", IN_ORDER_TABLE)
def test_frames_are_reordered_in_place(order: list[int]) -> None:
    from medsearch.io.dicom.study import _in_order

    frames = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    expected = frames[order].copy()
    out = _in_order(frames, order)
    assert np.array_equal(out, expected) and np.shares_memory(out, frames)
