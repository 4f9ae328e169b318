"""Fixtures of the DICOM tests: pydicom's test files, changed copies of them, and a check on scan totals.

Each fixture hands a test the function it calls, as often as it needs (tests/io is not importable
as a package: ``io`` is the standard library's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from medsearch.io.dicom import ScanResult


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


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


def _corrupt_j2k(path: Path) -> Path:
    """A real JPEG 2000 file whose codestream keeps its main header (its size is the header's) and
    loses its image data to zeros."""
    ds = pydicom.dcmread(_testfile("MR_small_jp2klossless.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:100] + b"\x00" * 200])
    ds["PixelData"].VR = "OB"
    return _write(ds, path)


def _totals_add_up(result: ScanResult) -> None:
    in_cases = [f for case in result.cases for f in case.files]
    skipped = [s.path for s in result.skipped]
    assert len(in_cases) + len(skipped) == result.n_files
    assert len(set(in_cases) | set(skipped)) == result.n_files  # each file in exactly one place


@pytest.fixture
def testfile() -> Callable[[str], Path]:
    """The path of a pydicom test file by name; the test is skipped where it is not installed."""
    return _testfile


@pytest.fixture
def write_dicom() -> Callable[[pydicom.Dataset, Path], Path]:
    """Save a dataset at a path (folders created), as it is: no file meta is added."""
    return _write


@pytest.fixture
def copy_testfile() -> Callable[..., Path]:
    """Write a copy of a pydicom test file with header changes: ``copy_testfile(name, path, **changes)``."""
    return _copy


@pytest.fixture
def as_mpeg2() -> Callable[[pydicom.Dataset], pydicom.Dataset]:
    """Relabel a dataset as MPEG2 video, a transfer syntax pydicom has no decoder for."""
    return _as_mpeg2


@pytest.fixture
def corrupt_j2k() -> Callable[[Path], Path]:
    """Write at a path a JPEG 2000 file whose header reads and whose pixel data does not decode."""
    return _corrupt_j2k


@pytest.fixture
def totals_add_up() -> Callable[[ScanResult], None]:
    """Check that every file a scan looked at is in exactly one case or in ``skipped``."""
    return _totals_add_up
