"""A generator of hostile DICOM files: each is small on disk but claims, or holds, far more than it should.

Each function writes one file and returns its path. The kinds:

- **codestream bombs** (:func:`codestream_bomb`): a real compressed file whose JPEG 2000 SIZ marker, JPEG
  SOF marker or JPEG-LS SOF55 marker claims a 60000 x 60000 image under a header that keeps its real size
  (64 x 64; 1024 x 256 for the JPEG);
- **a sparse multi-frame** (:func:`sparse_multiframe`): a valid header whose pixels decode to just under
  the limit one file may hold, the pixel data a hole in the file (zeros, no disk used);
- **zero padding** (:func:`zero_padded`): a valid file followed by megabytes (or gigabytes) of zeros,
  sparse on disk;
- **an oversized pixel element** (:func:`oversized_pixel_element`): a small image whose Pixel Data
  element declares gigabytes (sparse);
- **deep sequences** (:func:`deep_sequences`): sequences nested thousands deep;
- **a deflate bomb** (:func:`deflate_bomb`): a Deflated Explicit VR file whose data set inflates to
  gigabytes of zeros;
- **a seeded header value** (:func:`seeded_value`): a value such as ``SLOPEZQX`` in RescaleSlope, which a
  parser's message would quote.

:func:`write_corpus` writes them all into one folder, as an archive to index. Nothing here needs
more than a few megabytes of disk or memory.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from medsearch.io.dicom.read import _MAX_DECODED_BYTES

__all__ = [
    "SEEDED",
    "Hostile",
    "codestream_bomb",
    "deep_sequences",
    "deflate_bomb",
    "oversized_pixel_element",
    "seeded_value",
    "sparse_multiframe",
    "write_corpus",
    "zero_padded",
]

CLAIM = 60000  # what a codestream bomb claims, in pixels each way
SEEDED = "SLOPEZQX"  # a header value that no message may quote
# The real compressed file each bomb starts from.
_BOMB_SOURCES = {
    "j2k": "MR_small_jp2klossless.dcm",  # 64 x 64, JPEG 2000 lossless
    "jpeg": "JPEG-LL.dcm",  # 1024 x 256, JPEG lossless (SOF3)
    "jpegls": "MR_small_jpeg_ls_lossless.dcm",  # 64 x 64, JPEG-LS (SOF55)
}


@dataclass(frozen=True)
class Hostile:
    """A hostile file and what indexing it should give: the skip reasons allowed, or None: indexed."""

    path: Path
    reasons: frozenset[str] | None


def _source(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (pip install pydicom-data)")
    return pydicom.dcmread(path)


def _new_uids(ds: Dataset, seed: str) -> Dataset:
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


def _sparse_tail(path: Path, extra: int) -> Path:
    """Make ``path`` ``extra`` bytes longer, the new bytes zeros that take no disk (a hole)."""
    with path.open("r+b") as f:
        f.truncate(f.seek(0, 2) + extra)
    return path


def _claim(frame: bytes, kind: str, size: int) -> bytes:
    """``frame`` with its codestream's image size set to ``size`` x ``size``."""
    out = bytearray(frame)
    if kind == "j2k":
        at = out.find(b"\xff\x4f\xff\x51")  # SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz
        struct.pack_into(">IIIIII", out, at + 8, size, size, 0, 0, size, size)
        return bytes(out)
    marker = b"\xff\xf7" if kind == "jpegls" else b"\xff\xc3"  # SOF55 / SOF3: Lf P Y X Nf
    at = out.find(marker)
    struct.pack_into(">HH", out, at + 5, size, size)
    return bytes(out)


def codestream_bomb(path: Path, kind: str, *, size: int = CLAIM) -> Path:
    """A real JPEG 2000 (``"j2k"``), JPEG (``"jpeg"``) or JPEG-LS (``"jpegls"``) file whose compressed
    image claims ``size`` x ``size`` pixels; its header keeps the real Rows and Columns."""
    ds = _new_uids(_source(_BOMB_SOURCES[kind]), f"bomb-{kind}-{size}")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([_claim(frame, kind, size)])
    ds["PixelData"].VR = "OB"
    return _save(ds, path)


def _pixel_header(tag_vr_length: tuple[int, str, int]) -> bytes:
    tag, vr, length = tag_vr_length
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)


def _image_header(rows: int, columns: int, frames: int, seed: str) -> Dataset:
    """A small CT header of a 16-bit multi-frame image, without pixel data."""
    ds = _new_uids(_source("CT_small.dcm"), seed)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def sparse_multiframe(path: Path, *, rows: int = 512, columns: int = 512) -> Path:
    """A 16-bit multi-frame file whose pixels decode to just under the limit one file may hold.

    The pixel data is a hole in the file: it reads as zeros and uses no disk.
    """
    frames = _MAX_DECODED_BYTES // (rows * columns * 4)  # float32 frames that fit, the last one left out
    frames -= 1
    length = rows * columns * frames * 2
    _save(_image_header(rows, columns, frames, "sparse-multiframe"), path)
    with path.open("ab") as f:
        f.write(_pixel_header((0x7FE00010, "OW", length)))
    return _sparse_tail(path, length)


def oversized_pixel_element(path: Path, *, length: int = 3 * 2**30) -> Path:
    """A 64 x 64 image whose Pixel Data element declares ``length`` bytes (3 GiB by default, sparse)."""
    _save(_image_header(64, 64, 1, "oversized-element"), path)
    with path.open("ab") as f:
        f.write(_pixel_header((0x7FE00010, "OW", length)))
    return _sparse_tail(path, length)


def zero_padded(path: Path, *, padding: int = 100 * 2**20, source: str = "CT_small.dcm") -> Path:
    """A valid file followed by ``padding`` bytes of zeros (sparse on disk)."""
    _save(_new_uids(_source(source), f"padded-{padding}"), path)
    return _sparse_tail(path, padding)


def deep_sequences(path: Path, *, depth: int = 5000) -> Path:
    """A valid image with a private sequence nested ``depth`` deep (undefined lengths) before its pixels."""
    ds = _new_uids(_source("CT_small.dcm"), f"deep-{depth}")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _save(ds, path)
    data = path.read_bytes()
    at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    seq = struct.pack("<HH2sHI", 0x0029, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end_item = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    end_seq = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", 8) + b"HOSTILE "
    nested = (seq + item) * depth + (end_item + end_seq) * depth
    path.write_bytes(data[:at] + creator + nested + data[at:])
    return path


def deflate_bomb(path: Path, *, inflated: int = 3 * 2**30) -> Path:
    """A Deflated Explicit VR Little Endian file: a small image, then zeros, ``inflated`` bytes in all.

    Each 16 MiB of zeros is compressed once and repeated (a full flush resets the compressor, so
    the repeats are valid deflate blocks): the file is about 3 MB and takes a second to write.
    """
    ds = _new_uids(_source("CT_small.dcm"), "deflate-bomb")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = BytesIO()
    ds.save_as(plain, enforce_file_format=True)
    body = plain.getvalue()[_meta_end(plain.getvalue()):]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = BytesIO()
    ds.save_as(deflated, enforce_file_format=True)
    meta = deflated.getvalue()[: _meta_end(deflated.getvalue())]
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(2**24)
    head = deflate.compress(body) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(meta + head)
        for _ in range(max(0, inflated - len(body)) // len(chunk)):
            f.write(block)
        f.write(deflate.flush())
    return path


def _meta_end(data: bytes) -> int:
    """Where the file meta group of a file written with a preamble ends."""
    return 144 + int.from_bytes(data[140:144], "little")


def seeded_value(path: Path, *, keyword: str = "RescaleSlope", value: str = SEEDED) -> Path:
    """A valid image whose ``keyword`` (a number in DICOM) holds the text ``value`` (8 characters).

    A parser that meets it says ``could not convert string to float: 'SLOPEZQX'``; no message or
    report may quote it. pydicom refuses to write such a value, so a placeholder is replaced in
    the written bytes.
    """
    placeholder = "9.876543"
    if len(value) != len(placeholder):
        raise ValueError(f"the seeded value must have {len(placeholder)} characters")
    ds = _new_uids(_source("CT_small.dcm"), f"seeded-{keyword}")
    setattr(ds, keyword, placeholder)
    _save(ds, path)
    path.write_bytes(path.read_bytes().replace(placeholder.encode(), value.encode(), 1))
    return path


# name -> (writer, the skip reasons allowed; None: the file must be indexed)
CORPUS: dict[str, tuple[Callable[[Path], Path], frozenset[str] | None]] = {
    "bomb-j2k.dcm": (lambda p: codestream_bomb(p, "j2k"), frozenset({"too_large"})),
    "bomb-jpeg.dcm": (lambda p: codestream_bomb(p, "jpeg"), frozenset({"too_large"})),
    "bomb-jpegls.dcm": (lambda p: codestream_bomb(p, "jpegls"), frozenset({"too_large"})),
    "mismatch-j2k.dcm": (lambda p: codestream_bomb(p, "j2k", size=96), frozenset({"codestream_mismatch"})),
    "sparse-multiframe.dcm": (sparse_multiframe, None),
    "oversized-element.dcm": (oversized_pixel_element, None),
    "padded-100mb.dcm": (zero_padded, None),
    "padded-3gb.dcm": (lambda p: zero_padded(p, padding=3 * 2**30, source="MR_small.dcm"), None),
    "deep-sequences.dcm": (deep_sequences, frozenset({"unreadable"})),  # nested deeper than Python recurses
    "deflate-bomb.dcm": (deflate_bomb, frozenset({"too_large"})),  # inflates past a worker's memory cap
    "seeded-slope.dcm": (seeded_value, frozenset({"decode_error"})),
}


def write_corpus(folder: Path, names: list[str] | None = None) -> dict[str, Hostile]:
    """Write the hostile files (all, or those ``names``) into ``folder``, one series each."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names or list(CORPUS):
        writer, reasons = CORPUS[name]
        out[name] = Hostile(writer(folder / name), reasons)
    return out
