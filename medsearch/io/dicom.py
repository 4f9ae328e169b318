"""DICOM loading: discovery, header scan, grouping into cases, pixel decoding into volumes.

Three steps, each usable alone:

1. :func:`find_files` lists the files under a path (any name: ``.dcm``, none, GE ``i12.MRDC.3``).
2. :func:`scan` reads headers only, sorts each file into a :class:`CaseRef` (one series, or one
   multi-frame object) or into ``skipped`` with a :class:`SkipReason`.
3. :func:`load_volume` decodes the pixels of one case into a float32 :class:`Volume`.

:func:`load_study` chains the three for a single query study and turns every problem into one
:class:`~medsearch.errors.InvalidStudyError` line that says what to do.

No message or log line carries a header value that could identify a patient (names, IDs, dates,
UIDs): they name the file path, the SOP class name, the transfer syntax, or the decoder's message.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medsearch.errors import InvalidStudyError

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


@dataclass
class CaseRef:
    """The files of one case, found by reading headers only (no pixel decoding)."""

    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    instance_uids: tuple[str, ...]
    header: pydicom.Dataset = field(repr=False)
    part: str = (
        ""  # set when one series is split into several cases (e.g. several multi-frame objects)
    )
    # The slice geometry of each file, from the scan (see SliceGeometry); () when not known.
    geometry: tuple[SliceGeometry | None, ...] = field(default=(), repr=False)
    header_index: int = 0  # which of ``files`` ``header`` was read from


@dataclass
class Volume:
    """Decoded pixels of one case: float32, (Z, H, W) gray or (Z, H, W, 3) RGB.

    ``decoded`` is None when every slice was decoded. A volume loaded with ``load_volume(case,
    select=...)`` has the full shape, but only the slices listed in ``decoded`` hold pixels; the
    others are zero.
    """

    pixels: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    rgb: bool
    decoded: tuple[int, ...] | None = None


@dataclass
class ScanResult:
    """What :func:`scan` found: the cases, the files left out, and how many files it looked at.

    Every file looked at is in exactly one case or in ``skipped``.
    """

    cases: list[CaseRef]
    skipped: list[SkippedFile]
    n_files: int


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


def _decoder_problem(tsyntax: UID) -> str | None:
    """Why pixel data in ``tsyntax`` cannot be decoded here, or None when it can."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return f"transfer syntax {tsyntax} ({tsyntax.name}) has no pixel data decoder in pydicom"
    if not decoder.is_available:
        return (
            f"transfer syntax {tsyntax} ({tsyntax.name}) needs a decoder plugin that is not "
            "installed (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle or pyjpegls)"
        )
    return None


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


# --------------------------------------------------------------------------------------------
# Discovery and scan


def find_files(root: Path | str) -> Iterator[Path]:
    """Yield the files at ``root``: the file itself, or every regular file below a folder.

    Files and folders whose name starts with '.' are skipped; the names of DICOM files are not
    checked (archives hold ``.dcm``, extension-less and ``i123.MRDC.4`` files alike).

    Parameters
    ----------
    root : Path or str
        A file or a folder.

    Yields
    ------
    Path
        Paths in sorted order.

    Raises
    ------
    InvalidStudyError
        If ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise InvalidStudyError(f"{root} does not exist; check the path")
    if not root.is_dir():
        yield root
        return
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            found.append(path)
    yield from sorted(found)


@dataclass(frozen=True)
class SliceGeometry:
    """Where a file's one grayscale image lies, as its header says: enough to order a series.

    :func:`load_volume` orders a series by these, then reads only the slices it was asked for,
    so a file the encoder does not see is read once, at the scan, and never again.
    """

    rows: int
    columns: int
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6)
    instance: float  # InstanceNumber; inf when missing
    acquisition: float  # AcquisitionNumber; inf when missing

    def to_list(self) -> list[Any]:
        """A JSON-ready form (``inf`` as None), for :meth:`from_list`."""
        ranks = [None if math.isinf(v) else v for v in (self.instance, self.acquisition)]
        return [self.rows, self.columns, self.position and list(self.position),
                self.orientation and list(self.orientation), *ranks]

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> SliceGeometry:
        rows, columns, position, orientation, instance, acquisition = values
        return cls(
            int(rows), int(columns),
            None if position is None else tuple(float(v) for v in position),  # type: ignore[arg-type]
            None if orientation is None else tuple(float(v) for v in orientation),
            math.inf if instance is None else float(instance),
            math.inf if acquisition is None else float(acquisition),
        )


@dataclass(frozen=True)
class HeaderSummary:
    """The facts :func:`group_headers` needs from one file's header, and nothing else.

    Small and picklable, so that an archive of any size can keep one per file and worker processes
    can send them back; the UIDs identify a study, so a summary stays on the machine that read it.
    ``geometry`` is set for a file holding one grayscale image (see :class:`SliceGeometry`).
    """

    path: Path
    study_uid: str  # "" when the header has none
    series_uid: str
    sop_uid: str
    frames: int
    geometry: SliceGeometry | None = None


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case as :func:`group_headers` finds them, without a header in memory."""

    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    instance_uids: tuple[str, ...]
    part: str = ""
    geometry: tuple[SliceGeometry | None, ...] = field(default=(), repr=False)  # per file, or ()

    def open(self) -> CaseRef:
        """This case as a :class:`CaseRef`, with the header of its first file read now (no pixels).

        The header is the one :func:`scan` would give: that of the first file in path order.

        Raises
        ------
        LoadFailure
            No file of the case has a readable header any more (changed since it was scanned).
        """
        skipped = []
        for index, path in enumerate(self.files):
            try:
                ds = _read_header(path).ds
            except _Skip as skip:
                skipped.append(SkippedFile(path, skip.reason, skip.detail))
                continue
            except Exception as exc:  # noqa: BLE001 - as in scan: an odd header is a skip
                skipped.append(SkippedFile(path, SkipReason.UNREADABLE, f"the header cannot be used: {_one_line(exc)}"))
                continue
            return CaseRef(
                study_uid=self.study_uid,
                series_uid=self.series_uid,
                files=self.files,
                instance_uids=self.instance_uids,
                header=ds,
                part=self.part,
                geometry=self.geometry,
                header_index=index,
            )
        first = skipped[0]
        raise LoadFailure(
            f"no file of the case at {self.files[0]} has a readable header; {first.path}: "
            f"{first.reason.value}: {first.detail}",
            skipped,
        )


def summarize_file(path: Path | str) -> HeaderSummary | SkippedFile:
    """Read one file's header (never its pixels) and say how it would be grouped, or why it is left out.

    This is the per-file half of :func:`scan`, for callers that read headers in parallel or keep
    the result between runs; :func:`group_headers` is the other half. It never raises: a file that
    cannot be used is a :class:`SkippedFile` (NOT_DICOM, UNREADABLE, TRUNCATED, NO_PIXEL_DATA,
    UNSUPPORTED_TRANSFER_SYNTAX). Duplicates are found by :func:`group_headers`, which sees all files.

    Parameters
    ----------
    path : Path or str
        A file.

    Returns
    -------
    HeaderSummary or SkippedFile
    """
    found = _summarize(Path(path))
    return found if isinstance(found, SkippedFile) else found[0]


def group_headers(items: Iterable[HeaderSummary | SkippedFile]) -> tuple[list[CaseFiles], list[SkippedFile]]:
    """Group file summaries into cases, as :func:`scan` does, and find duplicates.

    Parameters
    ----------
    items : iterable of HeaderSummary or SkippedFile
        What :func:`summarize_file` gave for each file, in any order. Skipped files are passed
        through; a second file with the SOP Instance UID of an earlier one (in path order) is
        skipped as DUPLICATE.

    Returns
    -------
    list of CaseFiles
        Sorted by first file, then part (see :func:`scan` for the grouping rules).
    list of SkippedFile
        In path order.
    """
    ordered = sorted(items, key=lambda item: item.path)
    skipped: list[SkippedFile] = []
    seen: dict[str, Path] = {}
    groups: dict[tuple[str, str], list[HeaderSummary]] = {}
    for item in ordered:
        if isinstance(item, SkippedFile):
            skipped.append(item)
            continue
        if item.sop_uid and item.sop_uid in seen:
            detail = f"same SOP instance as {seen[item.sop_uid]}"
            logger.debug("skip %s: %s (%s)", item.path, SkipReason.DUPLICATE.value, detail)
            skipped.append(SkippedFile(item.path, SkipReason.DUPLICATE, detail))
            continue
        if item.sop_uid:
            seen[item.sop_uid] = item.path
        groups.setdefault(_case_key(item), []).append(item)
    cases = [case for key, entries in groups.items() for case in _split(key, entries)]
    cases.sort(key=lambda c: (str(c.files[0]), c.part))
    return cases, skipped


def scan(paths: Path | str | Iterable[Path]) -> ScanResult:
    """Read the headers of files and group the images into cases.

    Only headers are read (``stop_before_pixels``); pixel data is never decoded here. Each case
    keeps the header of its first file; for archives too large to keep those, use
    :func:`summarize_file` and :func:`group_headers`, then :meth:`CaseFiles.open` per case.

    Parameters
    ----------
    paths : Path, str or iterable of Path
        A root (file or folder, walked with :func:`find_files`) or an explicit list of files.

    Returns
    -------
    ScanResult
        Cases, one per (StudyInstanceUID, SeriesInstanceUID), sorted by their first file; a
        multi-frame object that shares its series with other files is a case of its own, with
        ``part`` set to ``"mf1"``, ``"mf2"``... A file without those UIDs is a case of its own,
        keyed by a hash of its path. Files left out are in ``skipped`` with a reason:
        NOT_DICOM, UNREADABLE, TRUNCATED, NO_PIXEL_DATA (detail names the SOP class),
        UNSUPPORTED_TRANSFER_SYNTAX (detail names the UID) or DUPLICATE (a second file with the
        same SOP Instance UID).

    Raises
    ------
    InvalidStudyError
        If ``paths`` is a root that does not exist.
    """
    if isinstance(paths, (str, Path)):
        files = list(find_files(paths))
    else:
        listed: list[Path] = []
        for item in paths:
            item = Path(item)
            listed.extend(find_files(item) if item.is_dir() else [item])
        files = sorted(dict.fromkeys(listed))
    headers: dict[Path, Dataset] = {}
    items: list[HeaderSummary | SkippedFile] = []
    for path in files:
        found = _summarize(path)
        if isinstance(found, SkippedFile):
            items.append(found)
        else:
            items.append(found[0])
            headers[path] = found[1]
    groups, skipped = group_headers(items)
    cases = [
        CaseRef(
            study_uid=g.study_uid,
            series_uid=g.series_uid,
            files=g.files,
            instance_uids=g.instance_uids,
            header=headers[g.files[0]],
            part=g.part,
            geometry=g.geometry,
        )
        for g in groups
    ]
    logger.info("scanned %d files: %d cases, %d skipped", len(files), len(cases), len(skipped))
    return ScanResult(cases=cases, skipped=skipped, n_files=len(files))


def _summarize(path: Path) -> tuple[HeaderSummary, Dataset] | SkippedFile:
    try:
        ds = _usable_header(path)
    except _Skip as skip:
        logger.debug("skip %s: %s (%s)", path, skip.reason.value, skip.detail)
        return SkippedFile(path, skip.reason, skip.detail)
    except Exception as exc:  # noqa: BLE001 - an odd header must not stop an archive scan
        detail = f"the header cannot be used: {_one_line(exc)}"
        logger.debug("skip %s: %s (%s)", path, SkipReason.UNREADABLE.value, detail)
        return SkippedFile(path, SkipReason.UNREADABLE, detail)
    return _summary(path, ds), ds


def _usable_header(path: Path) -> Dataset:
    """The header of a file that holds decodable pixel data.

    Raises
    ------
    _Skip
        As :func:`_read_header`, or NO_PIXEL_DATA, or UNSUPPORTED_TRANSFER_SYNTAX.
    """
    header = _read_header(path)
    ds = header.ds
    if header.pixel_tag is None:
        raise _Skip(SkipReason.NO_PIXEL_DATA, f"{_sop_class_name(ds)} has no pixel data")
    problem = _decoder_problem(_transfer_syntax(ds))
    if problem:
        raise _Skip(SkipReason.UNSUPPORTED_TRANSFER_SYNTAX, problem)
    return ds


def _summary(path: Path, ds: Dataset) -> HeaderSummary:
    return HeaderSummary(
        path=path,
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        sop_uid=_str(ds, "SOPInstanceUID"),
        frames=_int(_get(ds, "NumberOfFrames"), 1),
        geometry=_geometry(ds),
    )


def _geometry(ds: Dataset) -> SliceGeometry | None:
    """The slice geometry of a file of one grayscale image, as :func:`_images` reads it; else None."""
    try:
        if not _plain_gray(ds):
            return None
        (image,) = _images(ds, None, 0)
    except Exception:  # noqa: BLE001 - an odd header: the case is then read and ordered the long way
        return None
    return SliceGeometry(
        rows=_int(_get(ds, "Rows"), 0),
        columns=_int(_get(ds, "Columns"), 0),
        position=None if image.position is None else tuple(float(v) for v in image.position),  # type: ignore[arg-type]
        orientation=None if image.orientation is None else tuple(float(v) for v in image.orientation),
        instance=image.order[0],
        acquisition=image.order[1],
    )


def _case_key(entry: HeaderSummary) -> tuple[str, str]:
    study, series = entry.study_uid, entry.series_uid
    if study and series:
        return study, series
    # No UIDs to group by: the file is a case of its own, under a key that stays the same
    # from run to run for the same path.
    digest = hashlib.sha1(str(entry.path.resolve()).encode()).hexdigest()[:16]
    return study or f"nouid-{digest}", f"nouid-{digest}"


def _split(key: tuple[str, str], entries: list[HeaderSummary]) -> list[CaseFiles]:
    entries = sorted(entries, key=lambda e: e.path)

    def make(members: list[HeaderSummary], part: str = "") -> CaseFiles:
        return CaseFiles(
            study_uid=key[0],
            series_uid=key[1],
            files=tuple(e.path for e in members),
            instance_uids=tuple(e.sop_uid for e in members),
            part=part,
            geometry=tuple(e.geometry for e in members),
        )

    multi = [e for e in entries if e.frames > 1]
    if len(entries) == 1 or not multi:
        return [make(entries)]
    # A multi-frame object is a volume of its own; stacking it with its siblings would mix
    # several volumes (Siemens XA writes one object per repetition into one series).
    cases = [make([e], f"mf{i}") for i, e in enumerate(multi, start=1)]
    single = [e for e in entries if e.frames <= 1]
    if single:
        cases.append(make(single))
    return cases


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Image:
    """One decoded 2D image (a file, or one frame of a multi-frame file) and its geometry."""

    pixels: np.ndarray | None  # (H, W) or (H, W, 3) float32; None: not decoded (yet)
    position: np.ndarray | None
    orientation: np.ndarray | None
    order: tuple[float, float, int, int]  # InstanceNumber, AcquisitionNumber, file, frame


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


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


def _stored_range(ds: Dataset) -> tuple[float, float] | None:
    bits = _int(_get(ds, "BitsStored"), _int(_get(ds, "BitsAllocated"), 0))
    if not 0 < bits <= 32 or "PixelData" not in ds:
        return None
    if _int(_get(ds, "PixelRepresentation"), 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _gray(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the modality LUT (per frame for Enhanced objects); invert MONOCHROME1.

    The output is float32 with higher = brighter. MONOCHROME1 is inverted within the range the
    stored values can take after rescale (so CR values stay in their usual range), or within the
    image's own min and max when a Modality LUT Sequence maps them.
    """
    exact = _gray_in_float32(arr, ds)
    if exact is not None:
        return exact
    out = np.empty(arr.shape, dtype=np.float64)
    ranges: list[tuple[float, float] | None] = []
    stored = _stored_range(ds)
    enhanced = _is_enhanced(ds)
    for i in range(arr.shape[0]):
        item = _group_item(ds, i, "PixelValueTransformationSequence") if enhanced else None
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            slope, intercept = float(item.RescaleSlope), float(item.RescaleIntercept)
            out[i] = arr[i] * slope + intercept
        elif _get(ds, "ModalityLUTSequence"):
            out[i] = apply_modality_lut(arr[i], ds)
            ranges.append(None)
            continue
        else:
            slope = float(_get(ds, "RescaleSlope") or 1.0)
            intercept = float(_get(ds, "RescaleIntercept") or 0.0)
            out[i] = arr[i] * slope + intercept if (slope, intercept) != (1.0, 0.0) else arr[i]
        if stored is None:
            ranges.append(None)
        else:
            lo, hi = sorted((stored[0] * slope + intercept, stored[1] * slope + intercept))
            ranges.append((lo, hi))
    if _str(ds, "PhotometricInterpretation") == "MONOCHROME1":
        for i, rng in enumerate(ranges):
            lo, hi = rng if rng is not None else (float(out[i].min()), float(out[i].max()))
            out[i] = (lo + hi) - out[i]
    return out.astype(np.float32)


def _gray_in_float32(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """What :func:`_gray` gives, computed in float32 where that is exact; None elsewhere.

    With integer pixels, an integer rescale slope and intercept, and every value on the way below
    2**24 in magnitude, each float32 operation is exact, so the result equals the float64 path's
    bit for bit, at a fraction of the cost (most CT, MR and CR files).
    """
    if arr.dtype.kind not in "iu" or arr.size == 0 or _is_enhanced(ds) or _get(ds, "ModalityLUTSequence"):
        return None
    try:
        slope = float(_get(ds, "RescaleSlope") or 1.0)
        intercept = float(_get(ds, "RescaleIntercept") or 0.0)
    except (TypeError, ValueError):
        return None
    if not (slope.is_integer() and intercept.is_integer()):
        return None
    low, high = float(arr.min()), float(arr.max())
    bounds = [low * slope + intercept, high * slope + intercept, low, high]
    monochrome1 = _str(ds, "PhotometricInterpretation") == "MONOCHROME1"
    stored = _stored_range(ds)
    flip: tuple[float, float] | None = None
    if monochrome1 and stored is not None:
        flip = (stored[0] * slope + intercept, stored[1] * slope + intercept)
        bounds += [flip[0], flip[1], flip[0] + flip[1]]
    if max(abs(b) for b in bounds) * 2 >= 2**24:
        return None
    out = arr.astype(np.float32)
    if (slope, intercept) != (1.0, 0.0):
        out *= np.float32(slope)
        out += np.float32(intercept)
    if monochrome1:
        for i in range(out.shape[0]):
            lo, hi = flip if flip is not None else (float(out[i].min()), float(out[i].max()))
            np.subtract(np.float32(lo + hi), out[i], out=out[i])
    return out


_MAX_PIXEL_BYTES = 2**30  # decoded bytes one file may declare (a 2,000-frame 512 x 512 16-bit volume is 1 GiB)


def _declared_pixel_bytes(ds: Dataset) -> int:
    """Bytes of decoded pixel data the header declares (rows x columns x frames x samples x bytes)."""
    rows, columns = _int(_get(ds, "Rows"), 0), _int(_get(ds, "Columns"), 0)
    frames = max(_int(_get(ds, "NumberOfFrames"), 1), 1)
    samples = max(_int(_get(ds, "SamplesPerPixel"), 1), 1)
    allocated = max(_int(_get(ds, "BitsAllocated"), 8), 1)
    return max(rows, 0) * max(columns, 0) * frames * samples * ((allocated + 7) // 8)


def _decode(ds: Dataset) -> np.ndarray:
    """Decode a dataset's pixels to (F, H, W) or (F, H, W, 3) float32.

    Raises
    ------
    _Skip
        TRUNCATED for short pixel data, DECODE_ERROR for anything else the decoder rejects.
    """
    declared = _declared_pixel_bytes(ds)
    if declared > _MAX_PIXEL_BYTES:
        # A damaged header (or a hostile file) must not make the decoder allocate gigabytes.
        raise _Skip(
            SkipReason.DECODE_ERROR,
            f"the header declares {declared / 2**30:.1f} GiB of pixel data, more than the "
            f"{_MAX_PIXEL_BYTES / 2**30:.0f} GiB one file may hold here",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array  # pydicom 3 converts YBR to RGB by default
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Rust decoders (pylibjpeg-rle) panic with a BaseException
        text = _one_line(exc, ds)
        if _mentions_truncation(text):
            raise _Skip(SkipReason.TRUNCATED, text) from exc
        raise _Skip(SkipReason.DECODE_ERROR, text) from exc
    samples = _int(_get(ds, "SamplesPerPixel"), 1)
    if arr.ndim == (3 if samples > 1 else 2):
        arr = arr[np.newaxis]
    photometric = _str(ds, "PhotometricInterpretation")
    if samples == 1 and photometric == "PALETTE COLOR":
        try:
            return apply_color_lut(arr, ds).astype(np.float32)
        except Exception as exc:
            raise _Skip(SkipReason.DECODE_ERROR, f"palette: {_one_line(exc, ds)}") from exc
    if samples == 1:
        return _gray(arr, ds)
    if samples != 3 or arr.ndim != 4:
        raise _Skip(SkipReason.DECODE_ERROR, f"unsupported samples per pixel: {samples}")
    return arr.astype(np.float32)


def _images(ds: Dataset, pixels: np.ndarray | None, file_index: int) -> list[_Image]:
    """The images of one file, with their geometry; ``pixels`` None: one image, not decoded."""
    instance = _int(_get(ds, "InstanceNumber"), -1)
    acquisition = _int(_get(ds, "AcquisitionNumber"), -1)
    rank = (
        float(instance) if instance >= 0 else math.inf,
        float(acquisition) if acquisition >= 0 else math.inf,
    )
    n = 1 if pixels is None else pixels.shape[0]
    images = []
    for i in range(n):
        position = orientation = None
        if _is_enhanced(ds):
            plane = _group_item(ds, i, "PlanePositionSequence")
            orient = _group_item(ds, i, "PlaneOrientationSequence")
            if plane is not None:
                position = _floats(_get(plane, "ImagePositionPatient"), 3)
            if orient is not None:
                orientation = _floats(_get(orient, "ImageOrientationPatient"), 6)
        elif n == 1:
            # A classic multi-frame file has one position for all its frames: not per frame.
            position = _floats(_get(ds, "ImagePositionPatient"), 3)
            orientation = _floats(_get(ds, "ImageOrientationPatient"), 6)
        images.append(_Image(None if pixels is None else pixels[i], position, orientation, (*rank, file_index, i)))
    return images


def _spacing_attr(ds: Dataset, keyword: str) -> Any:
    """A spacing attribute at top level, else in the Pixel Measures functional group."""
    value = _get(ds, keyword)
    if value in (None, "") and _is_enhanced(ds):
        item = _group_item(ds, 0, "PixelMeasuresSequence")
        value = _get(item, keyword) if item is not None else None
    return value


def _positive(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _stack(images: list[_Image]) -> tuple[list[_Image], float | None]:
    """Order images into one spatial stack; return them and the median slice gap (if known).

    With a position and orientation on every image, images are sorted by their position along
    the slice normal (row x column direction cosines), which also holds for a tilted gantry.
    Several images at one position (time points, b-values, echoes) keep only the first by
    InstanceNumber, then AcquisitionNumber. Without geometry, InstanceNumber (then file and
    frame order) decides and nothing is dropped.
    """
    first = images[0]
    normal = None
    if all(im.position is not None and im.orientation is not None for im in images):
        orientation = first.orientation if first.orientation is not None else np.zeros(6)
        normal = np.cross(orientation[:3], orientation[3:])
        if np.linalg.norm(normal) < 1e-6:
            normal = None
    if normal is None or len(images) == 1:
        return sorted(images, key=lambda im: im.order), None
    projected = sorted(
        ((float(np.dot(im.position, normal)), im) for im in images),  # type: ignore[arg-type]
        key=lambda pair: (pair[0], pair[1].order),
    )
    tolerance = 0.01  # mm: positions written by one scanner agree far better than this
    clusters: list[list[tuple[float, _Image]]] = []
    for pair in projected:
        if clusters and pair[0] - clusters[-1][0][0] < tolerance:
            clusters[-1].append(pair)
        else:
            clusters.append([pair])
    kept = [min(cluster, key=lambda pair: pair[1].order) for cluster in clusters]
    gaps = np.diff([pair[0] for pair in kept])
    gap = float(np.median(gaps)) if gaps.size else None
    return [pair[1] for pair in kept], gap


def load_volume(
    case: CaseRef, *, select: Callable[[int], Iterable[int]] | None = None
) -> tuple[Volume, list[SkippedFile]]:
    """Decode the pixels of every file of ``case`` (or of the slices ``select`` picks) into one volume.

    Each image is decoded with pydicom (YBR becomes RGB), the modality LUT or rescale is applied
    (per frame for Enhanced objects, from the Pixel Value Transformation functional group),
    PALETTE COLOR becomes RGB, and MONOCHROME1 is inverted so that higher is brighter.
    A multi-frame object gives one image per frame. Images are stacked along Z as described in
    :func:`_stack`: sorted by position on the slice normal, one image kept per position (the first
    by InstanceNumber, AcquisitionNumber) so the volume is one spatial stack.

    Parameters
    ----------
    case : CaseRef
        A case from :func:`scan`.
    select : callable, optional
        Given the depth of the stack, the indices of the slices that will be used (a 2D encoder
        sees a few of a CT series). The stack is ordered from the headers, and only those slices
        are decoded; the volume lists them in ``decoded``. When the case carries the slice
        geometry its scan recorded (``case.geometry``), only the selected files are read again;
        otherwise every file is read. This applies to series of single-frame grayscale files;
        other cases are decoded whole, as is a case where a selected slice fails to decode or its
        file changed since the scan (so that the skip report names that file and the stack is the
        one a full decode gives).

    Returns
    -------
    Volume
        ``pixels`` (Z, H, W) or (Z, H, W, 3) float32; ``spacing`` (z, y, x) in mm: z is the median
        gap between positions, else Spacing Between Slices, else Slice Thickness; y and x are
        Pixel Spacing (else Imager Pixel Spacing); 1.0 where unknown.
    list of SkippedFile
        Files left out: TRUNCATED, DECODE_ERROR, or INCONSISTENT_SERIES for files whose image
        shape or channel count differs from that of most files of the case.

    Raises
    ------
    LoadFailure
        If no file of the case decodes.
    """
    if select is not None:
        fast = _load_by_geometry(case, select)
        if fast is not None:
            return fast
    failed: list[tuple[int, SkippedFile]] = []
    read: list[tuple[int, Path, Dataset]] = []
    for index, path in enumerate(case.files):
        try:
            read.append((index, path, _read_full(path)))
        except _Skip as skip:
            logger.info("skip %s: %s (%s)", path, skip.reason.value, skip.detail)
            failed.append((index, SkippedFile(path, skip.reason, skip.detail)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop its series
            detail = _one_line(exc)
            logger.info("skip %s: %s (%s)", path, SkipReason.DECODE_ERROR.value, detail)
            failed.append((index, SkippedFile(path, SkipReason.DECODE_ERROR, detail)))
    if select is not None and read:
        # A file whose header reads but whose pixels would not decode is found only if its slice
        # is selected (then everything is decoded, below). Otherwise it stays part of the case,
        # as it is part of the series and its geometry was used to order the stack; its pixels,
        # which nothing uses, are not checked. Files that cannot be read at all, are cut short,
        # have no pixel data or an unsupported transfer syntax are still caught, by the header
        # scan and by reading every file here.
        partial = _load_selected(case, read, select)
        if partial is not None:
            volume, inconsistent = partial
            return volume, sorted([s for _, s in failed] + inconsistent, key=lambda s: s.path)
    decoded: list[tuple[Path, Dataset, np.ndarray, list[_Image]]] = []
    for index, path, ds in read:
        try:
            pixels = _decode(ds)
            decoded.append((path, ds, pixels, _images(ds, pixels, index)))
        except _Skip as skip:
            logger.info("skip %s: %s (%s)", path, skip.reason.value, skip.detail)
            failed.append((index, SkippedFile(path, skip.reason, skip.detail)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop its series
            detail = _one_line(exc, ds)
            logger.info("skip %s: %s (%s)", path, SkipReason.DECODE_ERROR.value, detail)
            failed.append((index, SkippedFile(path, SkipReason.DECODE_ERROR, detail)))
    skipped = [s for _, s in sorted(failed, key=lambda pair: pair[0])]
    if not decoded:
        first = skipped[0]
        raise LoadFailure(
            f"no file of the case at {case.files[0]} could be decoded ({len(skipped)} tried); "
            f"{first.path}: {first.reason.value}: {first.detail}",
            skipped,
        )
    shapes = Counter(pixels.shape[1:] for _, _, pixels, _ in decoded)
    majority = shapes.most_common(1)[0][0]
    images: list[_Image] = []
    kept_ds: list[Dataset] = []
    for path, ds, pixels, file_images in decoded:
        if pixels.shape[1:] != majority:
            skipped.append(_inconsistent(path, pixels.shape[1:], majority))
            continue
        images.extend(file_images)
        kept_ds.append(ds)
    stacked, gap = _stack(images)
    pixels = np.stack([im.pixels for im in stacked]).astype(np.float32, copy=False)  # type: ignore[misc]
    volume = _volume(case, pixels, kept_ds[0], gap)
    skipped.sort(key=lambda s: s.path)
    return volume, skipped


def _plain_gray(ds: Dataset) -> bool:
    """Whether a file holds one grayscale image whose decoded shape is (Rows, Columns)."""
    return (
        _int(_get(ds, "NumberOfFrames"), 1) <= 1
        and _int(_get(ds, "SamplesPerPixel"), 1) == 1
        and _str(ds, "PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
        and _int(_get(ds, "Rows"), 0) > 0
        and _int(_get(ds, "Columns"), 0) > 0
        and _declared_pixel_bytes(ds) <= _MAX_PIXEL_BYTES
    )


def _load_selected(
    case: CaseRef, read: list[tuple[int, Path, Dataset]], select: Callable[[int], Iterable[int]]
) -> tuple[Volume, list[SkippedFile]] | None:
    """The volume of single-frame grayscale files read in full, with only the selected slices decoded.

    The stack is built as :func:`load_volume` builds it from decoded files, from the same headers
    (shape from Rows and Columns). Returns None where a full decode must decide: a file that is not
    one grayscale image, geometry that does not parse, or a selected slice that does not decode to
    its header's shape.
    """
    geometry = {index: _geometry(ds) for index, _, ds in read}
    known = {index: g for index, g in geometry.items() if g is not None}
    if len(known) < len(geometry):
        return None
    return _selected_volume(case, known, select, {index: ds for index, _, ds in read})


def _load_by_geometry(case: CaseRef, select: Callable[[int], Iterable[int]]) -> tuple[Volume, list[SkippedFile]] | None:
    """As :func:`_load_selected`, from the geometry the scan recorded: only the selected files are read."""
    if len(case.geometry) != len(case.files) or any(g is None for g in case.geometry):
        return None
    return _selected_volume(case, dict(enumerate(case.geometry)), select, {})  # type: ignore[arg-type]


def _selected_volume(
    case: CaseRef,
    geometry: dict[int, SliceGeometry],
    select: Callable[[int], Iterable[int]],
    read: dict[int, Dataset],
) -> tuple[Volume, list[SkippedFile]] | None:
    """Order files by ``geometry`` (file index -> geometry), then read and decode the selected slices.

    ``read`` holds the datasets already read in full, by file index; a file not in it is read now,
    and must still have the geometry it was scanned with. None: a full decode must decide.
    """
    shapes = Counter((g.rows, g.columns) for g in geometry.values())
    majority = shapes.most_common(1)[0][0]
    inconsistent: list[SkippedFile] = []
    images: list[_Image] = []
    kept: list[int] = []
    for index, g in geometry.items():
        if (g.rows, g.columns) != majority:
            inconsistent.append(_inconsistent(case.files[index], (g.rows, g.columns), majority))
            continue
        position = None if g.position is None else np.array(g.position, dtype=np.float64)
        orientation = None if g.orientation is None else np.array(g.orientation, dtype=np.float64)
        images.append(_Image(None, position, orientation, (g.instance, g.acquisition, index, 0)))
        kept.append(index)
    stacked, gap = _stack(images)
    depth = len(stacked)
    wanted = sorted({int(i) for i in select(depth)})
    if any(not 0 <= i < depth for i in wanted):
        raise ValueError(f"select gave slice indices {wanted} for a stack of {depth}")
    pixels = np.zeros((depth, *majority), dtype=np.float32)  # untouched pages cost no memory
    for i in wanted:
        index = stacked[i].order[2]
        try:
            ds = read.get(index)
            if ds is None:
                ds = _read_full(case.files[index])
                if _geometry(ds) != geometry[index]:  # the file changed since it was scanned
                    return None
                read[index] = ds
            decoded = _decode(ds)
        except Exception:  # noqa: BLE001 - decode everything: the full path skips the file with the reason
            return None
        if decoded.shape != (1, *majority):
            return None
        pixels[i] = decoded[0]
    ref = read.get(kept[0])
    if ref is None and kept[0] == case.header_index:
        ref = case.header
    if ref is None:
        try:
            ref = _read_header(case.files[kept[0]]).ds
        except Exception:  # noqa: BLE001 - as above
            return None
    volume = _volume(case, pixels, ref, gap, decoded=tuple(wanted))
    return volume, inconsistent


def _inconsistent(path: Path, shape: tuple[int, ...], majority: tuple[int, ...]) -> SkippedFile:
    detail = f"image shape {shape} differs from the case's {majority}"
    logger.info("skip %s: %s", path, detail)
    return SkippedFile(path, SkipReason.INCONSISTENT_SERIES, detail)


def _volume(
    case: CaseRef, pixels: np.ndarray, ref: Dataset, gap: float | None, decoded: tuple[int, ...] | None = None
) -> Volume:
    """The volume of stacked ``pixels``, its spacing from the stack's ``gap`` and the header ``ref``."""
    z = gap if gap is not None and gap > 0 else None
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        z = z or _positive(_spacing_attr(ref, keyword))
    in_plane = _spacing_attr(ref, "PixelSpacing") or _get(ref, "ImagerPixelSpacing")
    y = x = None
    if isinstance(in_plane, (list, tuple, pydicom.multival.MultiValue)) and len(in_plane) == 2:
        y, x = _positive(in_plane[0]), _positive(in_plane[1])
    return Volume(
        pixels=pixels,
        spacing=(z or 1.0, y or 1.0, x or 1.0),
        modality=_str(case.header, "Modality") or "OT",
        rgb=pixels.ndim == 4,
        decoded=decoded,
    )


# --------------------------------------------------------------------------------------------
# A query study

_ADVICE = {
    SkipReason.NOT_DICOM: "give a DICOM file or a series folder",
    SkipReason.NO_PIXEL_DATA: "give a DICOM image (CT, MR, CR, US...), not a report or RT object",
    SkipReason.TRUNCATED: "copy the file again from its archive or PACS",
    SkipReason.UNREADABLE: "check that the file is readable and is DICOM",
    SkipReason.UNSUPPORTED_TRANSFER_SYNTAX: (
        "install the decoder plugin or convert the file to Explicit VR Little Endian"
    ),
    SkipReason.DECODE_ERROR: "convert the file to Explicit VR Little Endian or give another study",
    SkipReason.DUPLICATE: "remove the copy",
    SkipReason.INCONSISTENT_SERIES: "give one series folder",
}


def _skip_message(skip: SkippedFile) -> str:
    if skip.reason is SkipReason.NOT_DICOM:
        return (
            f"{skip.path} is not a DICOM file (no 'DICM' marker and no readable header); "
            f"{_ADVICE[skip.reason]}"
        )
    what = {
        SkipReason.NO_PIXEL_DATA: "holds no image",
        SkipReason.TRUNCATED: "is truncated",
        SkipReason.UNREADABLE: "cannot be read",
        SkipReason.UNSUPPORTED_TRANSFER_SYNTAX: "cannot be decoded here",
    }.get(skip.reason, f"was skipped ({skip.reason.value})")
    return f"{skip.path} {what}: {skip.detail}; {_ADVICE[skip.reason]}"


def load_study(path: Path | str) -> tuple[CaseRef, Volume]:
    """Load one query study: a DICOM file or a folder that holds one series.

    Parameters
    ----------
    path : Path or str
        A DICOM file, or a folder with the files of one series (other files, such as a
        LICENSE or a report, are skipped).

    Returns
    -------
    CaseRef
        The case found by :func:`scan`.
    Volume
        Its pixels, from :func:`load_volume`.

    Raises
    ------
    InvalidStudyError
        If the path does not exist, holds no file, holds no DICOM image (the message gives the
        reason for the first file: not DICOM, no pixel data with its SOP class, truncated,
        unsupported transfer syntax), or holds several series.
    LoadFailure
        If no file of the series decodes (a subclass of InvalidStudyError).
    """
    path = Path(path)
    files = list(find_files(path))
    if not files:
        raise InvalidStudyError(f"{path} holds no files; give a DICOM file or a series folder")
    result = scan(files)
    if not result.cases:
        if len(result.skipped) == 1:
            raise InvalidStudyError(_skip_message(result.skipped[0]))
        counts = Counter(s.reason.value for s in result.skipped)
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        raise InvalidStudyError(
            f"{path} holds no loadable DICOM image ({len(files)} files: {summary}); "
            f"first: {_skip_message(result.skipped[0])}"
        )
    if len(result.cases) > 1:
        raise InvalidStudyError(
            f"{path} holds {len(result.cases)} series; give one series folder or one file"
        )
    case = result.cases[0]
    volume, skipped = load_volume(case)
    for skip in result.skipped + skipped:
        logger.info("%s left out of the study: %s (%s)", skip.path, skip.reason.value, skip.detail)
    return case, volume
