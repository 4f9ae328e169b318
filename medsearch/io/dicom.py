"""DICOM loading: discovery, header scan, grouping into cases, pixel decoding into volumes.

INTERFACE CONTRACT (filled in by the io implementation; other layers depend on exactly these names).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medsearch.errors import InvalidStudyError


class SkipReason(str, enum.Enum):
    """Why a file found in an archive is not part of an indexed case."""

    NOT_DICOM = "not_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    TRUNCATED = "truncated"
    DECODE_ERROR = "decode_error"
    DUPLICATE = "duplicate"
    INCONSISTENT_SERIES = "inconsistent_series"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class SkippedFile:
    """A file left out, with a reason code and a one-line detail that names no patient."""

    path: Path
    reason: SkipReason
    detail: str = ""


@dataclass
class CaseRef:
    """The files of one case, found by reading headers only (no pixel decoding)."""

    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    instance_uids: tuple[str, ...]
    header: pydicom.Dataset = field(repr=False)
    part: str = ""  # set when one series is split into several cases (e.g. several multi-frame objects)


@dataclass
class Volume:
    """Decoded pixels of one case: float32, (Z, H, W) gray or (Z, H, W, 3) RGB."""

    pixels: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    rgb: bool


@dataclass
class ScanResult:
    cases: list[CaseRef]
    skipped: list[SkippedFile]
    n_files: int


class LoadFailure(InvalidStudyError):
    """No file of a case could be decoded; ``skipped`` says why for each file."""

    def __init__(self, message: str, skipped: list[SkippedFile]) -> None:
        super().__init__(message)
        self.skipped = skipped


def find_files(root: Path | str) -> Iterator[Path]:
    raise NotImplementedError


def scan(paths: Path | str | Iterable[Path]) -> ScanResult:
    raise NotImplementedError


def load_volume(case: CaseRef) -> tuple[Volume, list[SkippedFile]]:
    raise NotImplementedError


def load_study(path: Path | str) -> tuple[CaseRef, Volume]:
    raise NotImplementedError
