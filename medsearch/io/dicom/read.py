"""Reading one DICOM file: its header without the pixels, or the whole file, and why a file is left out.

A file is read as DICOM, then without preamble or file meta, then as headerless explicit big
endian (:func:`_parse`). A file that cannot be used raises :class:`_Skip` inside this package and
becomes a :class:`SkippedFile`, with a :class:`SkipReason` and a one-line detail, at the public
functions. The helpers at the end read header values that may be absent or fail to parse.

No message or log line carries a header value that could identify a patient (names, IDs, dates,
UIDs): :func:`_one_line` shortens a library's message and removes such values from it.
"""

from __future__ import annotations

import enum
import logging
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medsearch.errors import InvalidStudyError

__all__ = ["LoadFailure", "SkipReason", "SkippedFile"]

logger = logging.getLogger(__name__)


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


class LoadFailure(InvalidStudyError):
    """No file of a case could be decoded; ``skipped`` says why for each file."""

    def __init__(self, message: str, skipped: list[SkippedFile]) -> None:
        super().__init__(message)
        self.skipped = skipped


# --------------------------------------------------------------------------------------------
# Reading one file

_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data
_TRUNCATION_HINTS = ("end of file", "less than expected", "too short", "truncated")
# Header values that identify a patient or a visit; scrubbed from library messages we pass on.
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


class _Skip(Exception):
    """Internal: a file must be skipped for ``reason``."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Header:
    """A header read by :func:`_read_header`, with where its pixel data element starts."""

    ds: Dataset
    pixel_tag: int | None  # None: the file holds no top-level pixel data element


def _one_line(exc: BaseException | str, ds: Dataset | None = None, limit: int = 200) -> str:
    """First line of a library message, shortened, with identifying header values removed."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    if ds is not None:
        text = _redact(text, ds)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redact(text: str, ds: Dataset) -> str:
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001, S112 - a value that does not parse cannot leak
            continue
        values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        for item in values:
            s = str(item or "").strip()
            if len(s) >= 3 and s in text:
                text = text.replace(s, "<redacted>")
    return text


def _looks_like_dataset(ds: Dataset) -> bool:
    """Whether a dataset read with ``force=True`` is real DICOM rather than parsed noise."""
    try:
        return (
            0x00080016 in ds  # SOPClassUID
            or 0x00080060 in ds  # Modality
            or (0x00280010 in ds and 0x00280011 in ds)  # Rows and Columns
        )
    except Exception:  # noqa: BLE001 - parsed noise may hold elements that do not convert
        return False


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for files without file meta, from how it was read.

    The guessed syntax is written into ``ds.file_meta`` so that pydicom can decode the pixels.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    if implicit:
        tsyntax = ImplicitVRLittleEndian
    else:
        tsyntax = ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _stop_at_pixels(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _parse(fp: BinaryIO, path: Path, *, header_only: bool) -> Dataset:
    """Read a dataset from ``fp``: normally, then without preamble, then as headerless big endian.

    Raises
    ------
    _Skip
        NOT_DICOM when nothing readable was found.
    """
    head = fp.read(132)
    fp.seek(0)
    has_marker = head[128:132] == b"DICM"
    try:
        return pydicom.dcmread(fp, stop_before_pixels=header_only)
    except InvalidDicomError:
        if has_marker:
            raise
    # No preamble or file meta (older archives): let pydicom guess implicit/explicit little endian.
    try:
        fp.seek(0)
        forced = pydicom.dcmread(fp, force=True, stop_before_pixels=header_only)
        if _looks_like_dataset(forced):
            return forced
    except Exception as exc:  # noqa: BLE001 - noise fails the parser in many ways; not DICOM
        logger.debug("forced read of %s failed: %s", path, _one_line(exc))
    # pydicom does not guess big endian; headerless explicit big endian files exist.
    try:
        fp.seek(0)
        ds = read_dataset(
            fp,
            is_implicit_VR=False,
            is_little_endian=False,
            stop_when=_stop_at_pixels if header_only else None,
        )
        if _looks_like_dataset(ds):
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            return ds
    except Exception as exc:  # noqa: BLE001 - as above
        logger.debug("big endian read of %s failed: %s", path, _one_line(exc))
    raise _Skip(SkipReason.NOT_DICOM, "not a DICOM file (no 'DICM' marker and no readable header)")


def _read_errors(path: Path, exc: BaseException, caught: list[warnings.WarningMessage]) -> _Skip:
    """Classify an exception raised while reading a file that claims to be DICOM."""
    if isinstance(exc, _Skip):
        return exc
    if isinstance(exc, OSError):
        return _Skip(SkipReason.UNREADABLE, f"cannot open the file: {exc.strerror or exc}")
    text = _one_line(exc)
    if isinstance(exc, (EOFError, struct.error)) or _mentions_truncation(text, caught):
        return _Skip(SkipReason.TRUNCATED, f"the header ends early: {text}")
    return _Skip(SkipReason.UNREADABLE, f"the header cannot be parsed: {text}")


def _mentions_truncation(text: str, caught: Iterable[warnings.WarningMessage] = ()) -> bool:
    texts = [text.lower()] + [str(w.message).lower() for w in caught]
    return any(hint in t for t in texts for hint in _TRUNCATION_HINTS)


def _read_header(path: Path) -> _Header:
    """Read the header of ``path`` (no pixel data) and locate its pixel data element.

    Raises
    ------
    _Skip
        When the file is not DICOM, cannot be read, or its header or pixel data is cut short.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            size = path.stat().st_size
            with path.open("rb") as fp:
                ds = _parse(fp, path, header_only=True)
                tsyntax = _transfer_syntax(ds)
                if tsyntax == DeflatedExplicitVRLittleEndian:
                    # The stream position is inside the inflated copy: read it all to know.
                    fp.seek(0)
                    full = pydicom.dcmread(fp, force=True)
                    tag = next((t for t in _PIXEL_TAGS if t in full), None)
                    return _Header(ds, tag)
                tag, missing = _locate_pixels(fp, ds, size)
        except Exception as exc:
            raise _read_errors(path, exc, caught) from exc
    if any("end of file" in str(w.message).lower() for w in caught):
        raise _Skip(SkipReason.TRUNCATED, "the header ends early (end of file reached)")
    if tag is None and (len(ds) == 0 or _cut_short(ds, size)):
        raise _Skip(SkipReason.TRUNCATED, "the file ends inside its header")
    if missing > 0:
        raise _Skip(SkipReason.TRUNCATED, f"pixel data is {missing} bytes shorter than declared")
    return _Header(ds, tag)


def _cut_short(ds: Dataset, size: int) -> bool:
    """Whether an element read from the file claims more bytes than the file holds.

    pydicom reads a value cut by the end of the file without complaint; the raw elements still
    know where their value started and how long it should be.
    """
    meta = getattr(ds, "file_meta", None)
    last_start, last_end = -1, None
    for dataset in (meta, ds):
        if dataset is None:
            continue
        for tag in list(dataset.keys()):
            raw = dataset.get_item(tag)
            start, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
            if start is None or length is None:
                continue
            end = None if length == 0xFFFFFFFF else start + length
            if end is not None and end > size:
                return True
            if start > last_start:
                last_start, last_end = start, end
    # A few bytes after the last element: the file ends inside the next element's tag or length.
    return last_end is not None and 0 < size - last_end < 12


def _locate_pixels(fp: BinaryIO, ds: Dataset, size: int) -> tuple[int | None, int]:
    """Peek at the element where a header-only read stopped.

    Returns the pixel data tag (or None when reading stopped at the end of the file) and how many
    bytes of a defined-length pixel data value lie beyond the end of the file (0 when complete or
    when the length is undefined, as for compressed data: that is checked when decoding).
    """
    start = fp.tell()
    raw = fp.read(12)
    if len(raw) < 8:
        return None, 0
    _, little = ds.original_encoding
    end = "<" if little in (True, None) else ">"
    group, elem = struct.unpack(end + "HH", raw[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return None, 0
    # Some files say explicit VR and are written implicit (pydicom copes): trust the bytes.
    if not raw[4:6].isalpha():
        (length,) = struct.unpack(end + "L", raw[4:8])
        header_len = 8
    else:
        if len(raw) < 12:
            return tag, 1
        (length,) = struct.unpack(end + "L", raw[8:12])
        header_len = 12
    if length == 0xFFFFFFFF:
        return tag, 0
    return tag, max(0, start + header_len + length - size)


def _read_full(path: Path) -> Dataset:
    """Read a whole file, pixel data included.

    Raises
    ------
    _Skip
        When the file cannot be read or ends early.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with path.open("rb") as fp:
                ds = _parse(fp, path, header_only=False)
            _transfer_syntax(ds)
        except Exception as exc:
            raise _read_errors(path, exc, caught) from exc
    if any("end of file" in str(w.message).lower() for w in caught):
        raise _Skip(
            SkipReason.TRUNCATED, "the file ends inside its pixel data (end of file reached)"
        )
    return ds


def _sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return UID(str(uid)).name if uid else "DICOM object of unknown SOP class"


# --------------------------------------------------------------------------------------------
# Header values that may be absent or malformed

def _str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - an element whose value does not parse counts as absent
        return ""
    return str(value).strip() if value is not None else ""


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - an element whose value does not parse counts as absent
        return None


def _group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """First item of ``sequence`` in the frame's functional groups, else in the shared groups."""
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        seq = _get(per_frame[frame], sequence)
        if seq:
            return seq[0]
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        seq = _get(shared[0], sequence)
        if seq:
            return seq[0]
    return None


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
