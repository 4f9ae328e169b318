"""Tests of medsearch.io.dicom.scan: finding files, and grouping their headers into cases.

Real files first (pydicom's and pydicom-data's test files); synthetic DICOMs in tmp_path only for
what no real file shows.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom import (
    ScanResult,
    SkipReason,
    find_files,
    scan,
)

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
        SkipReason.NO_PIXEL_DATA: 1,
        SkipReason.NOT_DICOM: 1,
    }
