"""Tests of medsearch.io.dicom.scan: finding files, and grouping their headers into cases.

Real files first (pydicom's and pydicom-data's test files); synthetic DICOMs in tmp_path only for
what no real file shows.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hostile import paths
from mixed.archive import NOT_IMAGES, write_mixed_archive
from pydicom.uid import generate_uid

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom import (
    HeaderSummary,
    ScanResult,
    SkippedFile,
    SkipReason,
    find_files,
    scan,
    summarize_file,
)
from medsearch.io.dicom.classes import IMAGE_CLASSES
from medsearch.io.dicom.mosaic import _csa_field, is_mosaic, mosaic_count, mosaic_tile, split_mosaic
from medsearch.io.dicom.scan import printable_path, walk_archive

# ---------------------------------------------------------------------------------------------
# find_files


def test_find_files_single_file_yields_itself(testfile: Callable[[str], Path]) -> None:
    path = testfile("CT_small.dcm")
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
# scan: grouping files into cases


def test_scan_byte_identical_copy_is_duplicate(
    tmp_path: Path,
    testfile: Callable[[str], Path],
    totals_add_up: Callable[[ScanResult], None],
) -> None:
    for name in ("a.dcm", "b.dcm"):
        shutil.copy(testfile("CT_small.dcm"), tmp_path / name)
    result = scan(tmp_path)
    assert [c.files for c in result.cases] == [(tmp_path / "a.dcm",)]
    (skip,) = result.skipped
    assert skip.path == tmp_path / "b.dcm"
    assert skip.reason is SkipReason.DUPLICATE
    assert skip.detail == f"same SOP instance as {tmp_path / 'a.dcm'}"
    totals_add_up(result)


def test_scan_groups_series_and_sorts_files(
    tmp_path: Path,
    copy_testfile: Callable[..., Path],
    testfile: Callable[[str], Path],
) -> None:
    series = generate_uid()
    for name in ["c.dcm", "a.dcm", "b.dcm"]:
        copy_testfile(
            "MR_small.dcm",
            tmp_path / "s" / name,
            SOPInstanceUID=generate_uid(),
            SeriesInstanceUID=series,
        )
    shutil.copy(testfile("CT_small.dcm"), tmp_path / "ct.dcm")
    result = scan(tmp_path)
    assert [len(c.files) for c in result.cases] == [1, 3]  # sorted by first file: ct.dcm < s/a.dcm
    mr = result.cases[1]
    assert mr.files == tuple(tmp_path / "s" / n for n in ["a.dcm", "b.dcm", "c.dcm"])
    assert mr.series_uid == series
    assert mr.header.SOPInstanceUID == mr.instance_uids[0]


def test_scan_files_without_uids_get_stable_own_cases(tmp_path: Path, copy_testfile: Callable[..., Path]) -> None:
    for name in ("x.dcm", "y.dcm"):
        copy_testfile(
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


def test_scan_splits_multiframe_objects_sharing_a_series(
    tmp_path: Path,
    copy_testfile: Callable[..., Path],
    testfile: Callable[[str], Path],
) -> None:
    for name in ("m1.dcm", "m2.dcm"):
        copy_testfile("emri_small.dcm", tmp_path / name, SOPInstanceUID=generate_uid())
    copy_testfile(
        "emri_small.dcm",
        tmp_path / "single.dcm",
        SOPInstanceUID=generate_uid(),
        NumberOfFrames=1,
        PixelData=pydicom.dcmread(testfile("emri_small.dcm")).PixelData[: 64 * 64 * 2],
    )
    result = scan(tmp_path)
    assert [(c.files[0].name, c.part) for c in result.cases] == [
        ("m1.dcm", "mf1"),
        ("m2.dcm", "mf2"),
        ("single.dcm", ""),
    ]
    assert len({c.series_uid for c in result.cases}) == 1


def test_scan_accepts_iterable_and_totals_add_up(
    testfile: Callable[[str], Path],
    totals_add_up: Callable[[ScanResult], None],
) -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "reportsi.dcm", "README.txt"]
    result = scan(testfile(n) for n in names)
    assert result.n_files == 5
    totals_add_up(result)
    assert Counter(s.reason for s in result.skipped) == {
        SkipReason.DUPLICATE: 1,
        SkipReason.NOT_AN_IMAGE: 1,  # the structured report: decided by its SOP Class
        SkipReason.NOT_DICOM: 1,
    }


# ---------------------------------------------------------------------------------------------
# every path accounted for: links, loops, FIFOs, sockets, names that are not UTF-8


def _series(copy_testfile: Callable[..., Path], folder: Path, n: int = 5) -> list[Path]:
    """``n`` slices of one MR series (new SOP instances, one Series Instance UID) in ``folder``."""
    series = generate_uid()
    return [
        copy_testfile("MR_small.dcm", folder / f"slice{i}.dcm", SOPInstanceUID=generate_uid(), SeriesInstanceUID=series,
                      ImagePositionPatient=[0.0, 0.0, float(i)])
        for i in range(n)
    ]


def test_scan_follows_a_linked_series_folder(
    tmp_path: Path, copy_testfile: Callable[..., Path], totals_add_up: Callable[[ScanResult], None]
) -> None:
    outside = tmp_path / "elsewhere" / "series"
    _series(copy_testfile, outside)
    archive = tmp_path / "archive"
    link = paths.linked_series(outside, archive)
    result = scan(archive)
    (case,) = result.cases
    assert case.files == tuple(link / f"slice{i}.dcm" for i in range(5))  # reached through the link
    assert result.n_files == 5 and not result.skipped
    totals_add_up(result)


def test_scan_reports_fifos_broken_links_and_loops(
    tmp_path: Path, testfile: Callable[[str], Path], totals_add_up: Callable[[ScanResult], None]
) -> None:
    archive = tmp_path / "archive"
    shutil.copy(testfile("CT_small.dcm"), (archive / "a").mkdir(parents=True) or archive / "a" / "ct.dcm")
    fifo = paths.fifo(archive / "a")
    broken = paths.broken_link(archive / "a")
    loop = paths.loop_to_parent(archive / "a")
    itself = paths.self_loop(archive)
    result = scan(archive)
    assert [c.files for c in result.cases] == [(archive / "a" / "ct.dcm",)]
    assert {s.path: s.reason for s in result.skipped} == {
        fifo: SkipReason.NOT_A_FILE,
        broken: SkipReason.BROKEN_LINK,
        loop: SkipReason.SYMLINK_LOOP,
        itself: SkipReason.SYMLINK_LOOP,
    }
    assert result.n_files == 5
    totals_add_up(result)
    assert all(s.detail for s in result.skipped)


def test_a_second_link_to_a_folder_is_a_duplicate_not_a_second_walk(
    tmp_path: Path, copy_testfile: Callable[..., Path], totals_add_up: Callable[[ScanResult], None]
) -> None:
    outside = tmp_path / "series"
    _series(copy_testfile, outside, n=2)
    archive = tmp_path / "archive"
    first = paths.linked_series(outside, archive, "a-link")
    second = paths.linked_series(outside, archive, "b-link")
    result = scan(archive)
    assert [c.files[0].parent for c in result.cases] == [first]
    (skip,) = result.skipped
    assert (skip.path, skip.reason) == (second, SkipReason.DUPLICATE) and str(first) in skip.detail
    totals_add_up(result)


def _open_for_writing_later(fifo: Path, seconds: float) -> threading.Thread:
    """If something opened ``fifo`` for reading, a writer comes after ``seconds``: the test then fails
    instead of hanging."""

    def writer() -> None:
        time.sleep(seconds)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader: nobody opened the FIFO, as it should be

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def test_a_fifo_given_by_name_is_never_opened(tmp_path: Path) -> None:
    fifo = paths.fifo(tmp_path)
    _open_for_writing_later(fifo, 5.0)
    found = summarize_file(fifo)
    assert isinstance(found, SkippedFile) and found.reason is SkipReason.NOT_A_FILE and "FIFO" in found.detail
    assert scan([fifo]).skipped == [found]
    assert list(find_files(fifo)) == []  # find_files lists regular files only
    assert list(walk_archive(fifo)) == [found]


def test_a_socket_is_not_a_file(totals_add_up: Callable[[ScanResult], None]) -> None:
    # a short folder: a socket's path must fit in about 100 bytes
    short = Path(tempfile.mkdtemp(prefix="ms-"))
    try:
        with paths.unix_socket(short, "s.dcm") as sock:
            result = scan(short)
            assert [(s.path, s.reason) for s in result.skipped] == [(sock, SkipReason.NOT_A_FILE)]
            totals_add_up(result)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_a_folder_that_cannot_be_listed_is_reported(
    tmp_path: Path, testfile: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(testfile("CT_small.dcm"), locked / "ct.dcm")
    shutil.copy(testfile("MR_small.dcm"), tmp_path / "mr.dcm")
    real = os.scandir

    def scandir(path):  # as for a folder without read permission (which root would read anyway)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan(tmp_path)
    assert [(s.path, s.reason, s.detail) for s in result.skipped] == [
        (locked, SkipReason.UNREADABLE, "the folder cannot be listed: Permission denied")
    ]
    assert result.n_files == 2 and len(result.cases) == 1
    with pytest.raises(InvalidStudyError, match="cannot be listed .*check its permissions"):
        list(walk_archive(locked))


def _stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def test_a_deep_folder_tree_is_walked_without_recursion(tmp_path: Path, testfile: Callable[[str], Path]) -> None:
    # 120 levels under a recursion limit of 50 frames more than the test uses: a walk that recursed
    # once per level would fail (a tree deeper than Python's own limit would outlast rmtree too)
    deep = tmp_path.joinpath(*["d"] * 120)
    deep.mkdir(parents=True)
    shutil.copy(testfile("CT_small.dcm"), deep / "ct.dcm")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 50)
    try:
        found = list(find_files(tmp_path))
    finally:
        sys.setrecursionlimit(limit)
    assert found == [deep / "ct.dcm"]


def test_names_that_are_not_utf8_are_scanned_and_grouped(
    tmp_path: Path, copy_testfile: Callable[..., Path], testfile: Callable[[str], Path]
) -> None:
    ct = paths.non_utf8_copy(testfile("CT_small.dcm"), tmp_path / os.fsdecode(paths.NON_UTF8_FOLDER))
    # a file without UIDs is keyed by a hash of its path: that hash takes any name
    loose = copy_testfile("MR_small.dcm", tmp_path / "loose.dcm", SOPInstanceUID=generate_uid(),
                          StudyInstanceUID=None, SeriesInstanceUID=None)
    odd = paths.non_utf8_copy(loose, tmp_path, b"no-uid-\xff.dcm")
    loose.unlink()
    result = scan(tmp_path)
    assert sorted(c.files for c in result.cases) == sorted([(ct,), (odd,)])
    assert not result.skipped
    assert scan(tmp_path).cases[1].series_uid == result.cases[1].series_uid  # the same key every run


def test_printable_path_escapes_the_bytes_that_are_not_utf8() -> None:
    assert printable_path(os.fsdecode(b"caf\xe9/x\xff.dcm")) == "caf\\xe9/x\\xff.dcm"
    assert printable_path("café/ok.dcm") == "café/ok.dcm"
    assert printable_path("\ud800") == "\\ud800"  # not an escaped byte: still printable


# ---------------------------------------------------------------------------------------------
# only images are cases: decided by SOP Class (issue 17)

# a word of each family's registry names (X-Ray 3D Craniofacial is cone-beam CT, Intra-Oral is DX)
_FAMILY_WORDS = {
    "CR": ("Computed Radiography",), "DX": ("Digital X-Ray", "Intra-Oral"), "MG": ("Mammography", "Breast"),
    "CT": ("CT", "Craniofacial"), "MR": ("MR",), "US": ("Ultrasound", "US Volume"), "SC": ("Secondary Capture",),
    "XA": ("Angiographic", "XA"), "RF": ("Radiofluoroscopic", "XRF"), "NM": ("Nuclear Medicine",),
    "PT": ("Positron Emission Tomography", "PET"),
}


@pytest.mark.parametrize(("uid", "family"), sorted(IMAGE_CLASSES.items()))
def test_allow_list_holds_image_storage_classes_of_the_standard(uid: str, family: str) -> None:
    """Each UID of the allow-list is, in pydicom's registry of the standard, an image storage SOP Class
    of the family it is listed under."""
    name = pydicom.uid.UID(uid).name
    assert name != uid, f"{uid} is not in pydicom's UID registry"
    assert pydicom.uid.UID(uid).type == "SOP Class"
    assert name.endswith(("Image Storage", "Volume Storage", "For Presentation", "For Processing", "Storage (Retired)"))
    assert any(word in name for word in _FAMILY_WORDS[family]), (uid, name, family)


def test_allow_list_covers_every_family_the_issue_names() -> None:
    assert set(IMAGE_CLASSES.values()) == {"CT", "MR", "CR", "DX", "MG", "US", "PT", "NM", "XA", "RF", "SC"}
    # and the Enhanced forms
    for enhanced in ("Enhanced CT Image Storage", "Enhanced MR Image Storage", "Enhanced PET Image Storage",
                     "Enhanced XA Image Storage", "Enhanced XRF Image Storage", "Enhanced US Volume Storage"):
        assert any(pydicom.uid.UID(uid).name == enhanced for uid in IMAGE_CLASSES), enhanced


def test_mixed_archive_keeps_only_images(tmp_path: Path, totals_add_up: Callable[[ScanResult], None]) -> None:
    """Finding 1 of issue 17: a segmentation, RT objects, reports, a key object, a presentation state
    (with pixel data), a slide-microscopy tile and a 16-pixel CT are skipped as not_an_image, each
    naming its class; before, those with pixel data became cases."""
    expected = write_mixed_archive(tmp_path)
    result = scan(tmp_path)
    totals_add_up(result)
    found = {s.path.relative_to(tmp_path).as_posix(): s for s in result.skipped}
    in_cases = {f.relative_to(tmp_path).as_posix() for case in result.cases for f in case.files}
    assert in_cases == {name for name, reason in expected.items() if reason is None}
    assert {name: s.reason.value for name, s in found.items()} == {n: r for n, r in expected.items() if r is not None}
    for name, what in NOT_IMAGES.items():
        assert found[name].detail.startswith(what), (name, found[name].detail)


def test_minimum_image_size_is_a_setting(tmp_path: Path) -> None:
    write_mixed_archive(tmp_path)
    tiny = tmp_path / "ct-16px.dcm"
    skipped = summarize_file(tiny)
    assert isinstance(skipped, SkippedFile) and skipped.reason is SkipReason.NOT_AN_IMAGE
    assert "smaller than the 32 px minimum" in skipped.detail
    assert not isinstance(summarize_file(tiny, min_size=0), SkippedFile)
    assert not isinstance(summarize_file(tiny, min_size=16), SkippedFile)
    assert isinstance(summarize_file(tmp_path / "ct.dcm", min_size=200), SkippedFile)  # 128 x 128


def test_a_file_without_sop_class_is_judged_by_its_modality(tmp_path: Path, copy_testfile: Callable[..., Path]) -> None:
    seg = copy_testfile("CT_small.dcm", tmp_path / "seg.dcm", SOPClassUID=None, Modality="SEG")
    pydicom_ds = pydicom.dcmread(seg)
    del pydicom_ds.file_meta.MediaStorageSOPClassUID
    pydicom_ds.save_as(seg, enforce_file_format=False)
    skipped = summarize_file(seg)
    assert isinstance(skipped, SkippedFile) and skipped.reason is SkipReason.NOT_AN_IMAGE
    assert skipped.detail == "a SEG object (no SOP Class UID) is not an image"
    ct = copy_testfile("CT_small.dcm", tmp_path / "ct.dcm", SOPClassUID=None)
    assert not isinstance(summarize_file(ct), SkippedFile)


# ---------------------------------------------------------------------------------------------
# Siemens mosaics (issue 17): each file's slices, counted from its header


def _mosaic_files(shared_dicom: Path) -> list[Path]:
    root = shared_dicom / "mr-siemens-mosaic" / "In"
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_real_mosaics_count_36_slices_from_each_source(shared_dicom: Path) -> None:
    """The count is read from NumberOfImagesInMosaic, else the CSA header (parsed here), else the
    tile count of AcquisitionMatrix; all three agree on the real files."""
    files = _mosaic_files(shared_dicom)
    assert len(files) == 6
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert is_mosaic(ds) and mosaic_count(ds) == 36
        block = next(b for b in range(0x10, 0x100) if str(ds.get((0x0019, b), "") and ds[0x0019, b].value).strip() == "SIEMENS MR HEADER")
        del ds[0x00190000 | block << 8 | 0x0A]  # NumberOfImagesInMosaic gone: the CSA header tells
        assert mosaic_count(ds) == 36
        for tag in [t for t in ds.keys() if t.group == 0x0029]:
            del ds[tag]  # the CSA header gone too: AcquisitionMatrix's tiles (6 x 6 here)
        assert mosaic_count(ds) == 36
        tile = ds.Rows // 6
        assert mosaic_tile(pydicom.dcmread(path, stop_before_pixels=True)) == (tile, tile)


def test_mosaic_split_puts_tiles_in_order(shared_dicom: Path) -> None:
    path = _mosaic_files(shared_dicom)[0]
    ds = pydicom.dcmread(path)
    mosaic = ds.pixel_array.astype(np.float32)[np.newaxis]
    slices = split_mosaic(mosaic, 36)
    height, width = ds.Rows // 6, ds.Columns // 6
    assert slices.shape == (36, height, width)
    for i in (0, 7, 35):
        row, col = divmod(i, 6)
        np.testing.assert_array_equal(slices[i], mosaic[0, row * height : (row + 1) * height, col * width : (col + 1) * width])
    assert all(s.max() > 0 for s in slices)  # 36 slices of head, no empty tile
    with pytest.raises(ValueError, match="do not divide"):
        split_mosaic(mosaic, 37)


def test_mosaic_series_files_are_volumes_of_their_own(shared_dicom: Path) -> None:
    """Each mosaic file of a series is a 36-slice volume, a case of its own (two time points: two cases)."""
    folder = shared_dicom / "mr-siemens-mosaic" / "In" / "Orientation" / "ax" / "axasc36"
    result = scan(folder)
    assert [c.part for c in result.cases] == ["mf1", "mf2"]
    summaries = [summarize_file(f) for f in sorted(p for p in folder.iterdir() if p.is_file())]
    assert all(isinstance(s, HeaderSummary) and s.frames == 36 and s.geometry is None for s in summaries)


def test_a_damaged_csa_header_is_refused_not_trusted() -> None:
    assert _csa_field(b"SV10\x04\x03\x02\x01" + (10**6).to_bytes(4, "little") + b"\0" * 4, "NumberOfImagesInMosaic") is None
    assert _csa_field(b"not a CSA header", "NumberOfImagesInMosaic") is None
    assert _csa_field(b"SV10\x04\x03\x02\x01\x01\0\0\0\0\0\0\0" + b"x" * 20, "NumberOfImagesInMosaic") is None
