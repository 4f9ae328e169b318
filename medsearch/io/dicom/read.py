"""Reading one DICOM file: its header without the pixels, or the whole file, and why a file is left out.

A file is read as DICOM, then without preamble or file meta, then as headerless explicit big
endian (:func:`_parse`). A file that cannot be used raises :class:`_Skip` inside this package and
becomes a :class:`SkippedFile`, with a :class:`SkipReason` and a one-line detail, at the public
functions. The helpers at the end read header values that may be absent or fail to parse.

What is read is bounded by what the header declares, whatever the file holds: reading stops at the
pixel data (a header) or just after it (a whole file), so trailing padding and elements after the
pixels are never read; zero bytes where an element should start end the data set; a pixel data
value is read only as far as its image needs, and a file whose image would decode to more than
:data:`_MAX_DECODED_BYTES` is refused before its pixel data is read (:func:`_read_pixel_value`).

No message or log line carries a header value: :func:`_one_line` shortens a library's message,
removes what it quotes and any text value of the header it repeats.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import BaseTag, SequenceDelimiterTag
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
    TOO_LARGE = "too_large"  # claims (or needs) more memory than one file may take here
    CODESTREAM_MISMATCH = "codestream_mismatch"  # the compressed image's own size is not the header's
    NOT_A_FILE = "not_a_file"  # a FIFO, socket or device: never opened
    BROKEN_LINK = "broken_link"  # a symbolic link whose target does not exist
    SYMLINK_LOOP = "symlink_loop"  # a link that leads back to itself or to a folder above it
    NOT_AN_IMAGE = "not_an_image"  # not an image storage SOP Class (SEG, RT, SR, KO, PR...), or too small
    FETCH_ERROR = "fetch_error"  # a DICOMweb server did not send it (the detail gives the HTTP status)


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
# The float32 pixels one file may decode to (268 million values: a 1,024-frame 512 x 512 volume).
# Decoding holds these and the stored pixels, so a worker's memory stays bounded whatever a file claims.
_MAX_DECODED_BYTES = 2**30
# Walking the items of an encapsulated value (only where the file is far larger than its image).
_MAX_FRAGMENTS = 2**20
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
    """A library's message on one line, shortened, quoting nothing read from a file.

    Whatever the message quotes (``could not convert string to float: 'SLOPEZQX'``) becomes
    ``<value>``, and with ``ds`` any text value of its header that the message repeats becomes
    ``<redacted>``: a decoder's or a parser's message may repeat any header value.
    """
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    text = _QUOTED.sub("<value>", text)
    if ds is not None:
        text = _redact(text, ds)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A quoted span: 'x', "x", b'x' (an apostrophe inside a word, as in "doesn't", opens none).
_QUOTED = re.compile(r"""(?<![\w'"])b?(?:'[^'\n]*'|"[^"\n]*")(?!\w)""")
# Text value representations: what a header value a message could repeat is written in.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})


def _redact(text: str, ds: Dataset) -> str:
    for value in sorted(_header_texts(ds), key=len, reverse=True):
        if value in text:
            text = text.replace(value, "<redacted>")
    return text


def _header_texts(ds: Dataset) -> set[str]:
    """The text values (3 characters or more) of the top level of ``ds``, and of the identifying keywords."""
    found: set[str] = set()
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001, S112 - a value that does not parse cannot leak
            continue
        values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        found.update(str(item or "").strip() for item in values)
    for dataset in (getattr(ds, "file_meta", None) or Dataset(), ds):
        for tag in list(dataset.keys()):
            try:
                elem = dataset.get_item(tag)
            except Exception:  # noqa: BLE001, S112 - as above
                continue
            if elem is None or (elem.VR or _dictionary_vr(int(tag))) not in _TEXT_VRS:
                continue
            raw = elem.value
            if isinstance(raw, bytes):
                raw = raw.decode("latin-1")
            values = raw if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else str(raw or "").split("\\")
            found.update(str(item).strip(" \0") for item in values)
    return {value for value in found if len(value) >= 3}


def _dictionary_vr(tag: int) -> str:
    try:
        return str(pydicom.datadict.dictionary_VR(tag))
    except KeyError:  # a private element: its VR is unknown
        return ""


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


class _StopReading:
    """Where pydicom stops reading the top level of a data set (its ``stop_when``).

    Always before an element of group 0000: command elements never belong in a stored file, and
    zero bytes there are padding, which pydicom would otherwise parse 8 bytes at a time. Then
    either before the pixel data (``before_pixels``), or just after it, so that trailing padding
    is never read.
    """

    def __init__(self, *, before_pixels: bool) -> None:
        self.before_pixels = before_pixels
        self.after_pixels = False

    def __call__(self, tag: Any, vr: str | None, length: int) -> bool:
        if self.after_pixels:
            return True
        if int(tag) >> 16 == 0:
            return True
        if int(tag) in _PIXEL_TAGS:
            if self.before_pixels:
                return True
            self.after_pixels = True
        return False


def _parse(fp: BinaryIO, path: Path) -> Dataset:
    """Read a header from ``fp``: normally, then without preamble, then as headerless big endian.

    Reading stops before the pixel data, or at zero bytes where an element should start; the file
    is left at that element.

    Raises
    ------
    _Skip
        NOT_DICOM when nothing readable was found.
    """
    head = fp.read(132)
    fp.seek(0)
    has_marker = head[128:132] == b"DICM"
    try:
        return read_partial(fp, stop_when=_StopReading(before_pixels=True))
    except InvalidDicomError:
        if has_marker:
            raise
    # No preamble or file meta (older archives): let pydicom guess implicit/explicit little endian.
    try:
        fp.seek(0)
        forced = read_partial(fp, stop_when=_StopReading(before_pixels=True), force=True)
        if _looks_like_dataset(forced):
            return forced
    except Exception as exc:  # noqa: BLE001 - noise fails the parser in many ways; not DICOM
        logger.debug("forced read of %s failed: %s", path, _one_line(exc))
    # pydicom does not guess big endian; headerless explicit big endian files exist.
    try:
        fp.seek(0)
        ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=False, stop_when=_StopReading(before_pixels=True))
        if _looks_like_dataset(ds):
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            return ds
    except Exception as exc:  # noqa: BLE001 - as above
        logger.debug("big endian read of %s failed: %s", path, _one_line(exc))
    raise _Skip(SkipReason.NOT_DICOM, "not a DICOM file (no 'DICM' marker and no readable header)")


def _read_deflated(fp: BinaryIO) -> Dataset:
    """A whole Deflated Explicit VR file (pydicom inflates it in memory), up to its pixel data's end."""
    fp.seek(0)
    return read_partial(fp, stop_when=_StopReading(before_pixels=False), force=True)


def _read_errors(path: Path, exc: BaseException, caught: list[warnings.WarningMessage]) -> _Skip:
    """Classify an exception raised while reading a file that claims to be DICOM."""
    if isinstance(exc, _Skip):
        return exc
    if isinstance(exc, MemoryError):
        return _Skip(SkipReason.TOO_LARGE, "reading it needs more memory than this process may use")
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
            with path.open("rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                ds = _parse(fp, path)
                tsyntax = _transfer_syntax(ds)
                if tsyntax == DeflatedExplicitVRLittleEndian:
                    # The stream position is inside the inflated copy: read it all to know.
                    full = _read_deflated(fp)
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
    """Read a whole file: its header, then its pixel data element (:func:`_read_pixel_value`).

    Nothing after the pixel data is read (trailing padding, signatures).

    Raises
    ------
    _Skip
        When the file cannot be read or ends early; TOO_LARGE when its image would decode to more
        than :data:`_MAX_DECODED_BYTES`, or its compressed pixel data is far larger than its image.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with path.open("rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                ds = _parse(fp, path)
                if _transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
                    full = _read_deflated(fp)
                    full.file_meta = ds.file_meta
                    _check_declared(full)
                    ds = full
                else:
                    _read_pixel_value(fp, ds, size)
        except Exception as exc:
            raise _read_errors(path, exc, caught) from exc
    if any("end of file" in str(w.message).lower() for w in caught):
        raise _Skip(
            SkipReason.TRUNCATED, "the file ends inside its pixel data (end of file reached)"
        )
    return ds


def _check_declared(ds: Dataset) -> None:
    """Refuse a header whose image would decode to more than :data:`_MAX_DECODED_BYTES`.

    Raises
    ------
    _Skip
        TOO_LARGE.
    """
    declared = _decoded_pixel_bytes(ds)
    if declared > _MAX_DECODED_BYTES:
        # A damaged header (or a hostile file) must not make the decoder allocate gigabytes.
        raise _Skip(
            SkipReason.TOO_LARGE,
            f"the header declares {declared / 2**30:.1f} GiB of decoded pixels (as float32), more than "
            f"the {_MAX_DECODED_BYTES / 2**30:.0f} GiB one file may hold here",
        )


def _read_pixel_value(fp: BinaryIO, ds: Dataset, size: int) -> None:
    """Read the pixel data element at the file's position into ``ds``, and nothing after it.

    A defined-length value is read only as far as the header's image needs (pydicom ignores bytes
    beyond it; a file may declare gigabytes there). An undefined-length (encapsulated) value is read
    up to its sequence delimiter; where the file is far larger than the image, its item headers are
    walked first, so that neither a huge value nor the padding after it is read.

    Raises
    ------
    _Skip
        TOO_LARGE (see :func:`_read_full`); DECODE_ERROR when the items of a huge encapsulated value
        are malformed.
    """
    start = fp.tell()
    raw = fp.read(12)
    if len(raw) < 8:
        return
    little = ds.original_encoding[1] in (True, None)
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", raw[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return
    _check_declared(ds)
    implicit = not raw[4:6].isalpha()  # the bytes decide (some files say explicit and are not)
    if implicit:
        vr, (length,), value_tell = None, struct.unpack(end + "L", raw[4:8]), start + 8
    else:
        if len(raw) < 12:
            raise _Skip(SkipReason.TRUNCATED, "the file ends inside its pixel data element")
        vr, (length,), value_tell = raw[4:6].decode("ascii"), struct.unpack(end + "L", raw[8:12]), start + 12
    fp.seek(value_tell)
    if length != 0xFFFFFFFF:
        needed = _stored_pixel_bytes(ds)
        if 0 < needed < length:
            length = needed + needed % 2
        value = fp.read(length)
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, value_tell, implicit, little)
        return
    limit = 2 * _stored_pixel_bytes(ds) + 4096 * _frames(ds) + 2**20
    if size - value_tell > limit:
        _check_encapsulated(fp, little, limit)
        fp.seek(value_tell)
    try:
        items = read_undefined_length_value(fp, little, SequenceDelimiterTag)
    except EOFError as exc:
        raise _Skip(SkipReason.TRUNCATED, "the file ends inside its pixel data (end of file reached)") from exc
    ds[tag] = RawDataElement(BaseTag(tag), vr, 0xFFFFFFFF, items, value_tell, implicit, little)


def _check_encapsulated(fp: BinaryIO, little: bool, limit: int) -> None:
    """Walk the item headers of an encapsulated value (seeking, not reading) up to its delimiter.

    Raises
    ------
    _Skip
        TOO_LARGE when the items hold more than ``limit`` bytes, or there are more than
        :data:`_MAX_FRAGMENTS` of them; DECODE_ERROR when something else than an item is found.
    """
    fmt = "<HHL" if little else ">HHL"
    total = 0
    for _ in range(_MAX_FRAGMENTS):
        head = fp.read(8)
        if len(head) < 8:
            return  # the file ends first: the reader says it is truncated
        group, elem, length = struct.unpack(fmt, head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise _Skip(SkipReason.DECODE_ERROR, "the encapsulated pixel data is malformed (an item header is missing)")
        total += 8 + length
        if total > limit:
            raise _Skip(
                SkipReason.TOO_LARGE,
                "the compressed pixel data is far larger than the image its header declares",
            )
        fp.seek(length, os.SEEK_CUR)
    raise _Skip(SkipReason.TOO_LARGE, f"the compressed pixel data has more than {_MAX_FRAGMENTS} fragments")


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


def _frames(ds: Dataset) -> int:
    return max(_int(_get(ds, "NumberOfFrames"), 1), 1)


def _stored_pixel_bytes(ds: Dataset) -> int:
    """Bytes of pixel data the header declares (rows x columns x frames x samples x bytes per sample)."""
    rows, columns = _int(_get(ds, "Rows"), 0), _int(_get(ds, "Columns"), 0)
    samples = max(_int(_get(ds, "SamplesPerPixel"), 1), 1)
    allocated = max(_int(_get(ds, "BitsAllocated"), 8), 1)
    return max(rows, 0) * max(columns, 0) * _frames(ds) * samples * ((allocated + 7) // 8)


def _decoded_pixel_bytes(ds: Dataset) -> int:
    """Bytes of the float32 pixels the header's image decodes to (palette colour gives three channels)."""
    rows, columns = _int(_get(ds, "Rows"), 0), _int(_get(ds, "Columns"), 0)
    samples = max(_int(_get(ds, "SamplesPerPixel"), 1), 1)
    if _str(ds, "PhotometricInterpretation") == "PALETTE COLOR":
        samples = 3
    return max(rows, 0) * max(columns, 0) * _frames(ds) * samples * 4


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
