"""Decoding one file's pixel data into float32 frames, within a size limit.

:func:`_decode` turns a dataset read in full into (F, H, W) gray or (F, H, W, 3) RGB float32, one
frame at a time into one array: the modality LUT or rescale is applied (per frame for Enhanced
objects), MONOCHROME1 is inverted so that higher is brighter, and PALETTE COLOR and YBR become RGB.
Nothing is decoded unless the header's image fits in
:data:`~medsearch.io.dicom.read._MAX_DECODED_BYTES` and, for compressed pixel data, each frame's
own image size (the JPEG 2000 SIZ marker, the JPEG SOF marker, the JPEG-LS SOF55 marker) is the
header's (:func:`_check_codestreams`): a decoder allocates what its codestream claims, not what the
header says. Decoding thus holds at most the stored pixels and the float32 result, plus one frame.
:func:`_decoder_problem` says from the header alone whether a transfer syntax can be decoded here.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, iter_pixels
from pydicom.uid import UID

from medsearch.io.dicom.read import (
    _MAX_DECODED_BYTES,
    SkipReason,
    _check_declared,
    _decoded_pixel_bytes,
    _frames,
    _get,
    _group_item,
    _int,
    _is_enhanced,
    _mentions_truncation,
    _one_line,
    _Skip,
    _str,
)

# JPEG start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15) and JPEG-LS's SOF55: Lf P Y X Nf follow.
_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz ... Csiz
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_HEAD_BYTES = 2**20  # how much of a frame's codestream is searched for its size


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


def _decode(ds: Dataset) -> np.ndarray:
    """Decode a dataset's pixels to (F, H, W) or (F, H, W, 3) float32, one frame at a time.

    Raises
    ------
    _Skip
        TOO_LARGE when the image would decode to more than the limit (from the header, or from a
        frame's codestream) or decoding runs out of the memory this process may use;
        CODESTREAM_MISMATCH when a frame's compressed image is not the size the header declares;
        TRUNCATED for short pixel data; DECODE_ERROR for anything else the decoder rejects.
    """
    _check_declared(ds)
    if UID(ds.file_meta.TransferSyntaxUID).is_encapsulated:
        _check_codestreams(ds)
    samples = _int(_get(ds, "SamplesPerPixel"), 1)
    if samples not in (1, 3):
        raise _Skip(SkipReason.DECODE_ERROR, f"unsupported samples per pixel: {samples}")
    out: np.ndarray | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, frame in enumerate(_frames_of(ds)):
                pixels = _to_float(frame, ds, i, samples)
                if out is None:
                    out = np.empty((_frames(ds), *pixels.shape), dtype=np.float32)
                out[i] = pixels
    except (KeyboardInterrupt, SystemExit, _Skip):
        raise
    except MemoryError as exc:
        raise _Skip(SkipReason.TOO_LARGE, "decoding it needs more memory than this process may use") from exc
    except BaseException as exc:  # Rust decoders (pylibjpeg-rle) panic with a BaseException
        text = _one_line(exc, ds)
        if _mentions_truncation(text):
            raise _Skip(SkipReason.TRUNCATED, text) from exc
        raise _Skip(SkipReason.DECODE_ERROR, text) from exc
    if out is None:
        raise _Skip(SkipReason.DECODE_ERROR, "the pixel data holds no frame")
    return out


def _frames_of(ds: Dataset) -> Iterator[np.ndarray]:
    """The decoded frames of ``ds``, as pydicom gives them (YBR converted to RGB)."""
    return iter_pixels(ds)


def _to_float(frame: np.ndarray, ds: Dataset, index: int, samples: int) -> np.ndarray:
    """One decoded frame as float32: (H, W) gray, or (H, W, 3) RGB."""
    if samples == 1 and _str(ds, "PhotometricInterpretation") == "PALETTE COLOR":
        try:
            return apply_color_lut(frame, ds).astype(np.float32)
        except Exception as exc:
            raise _Skip(SkipReason.DECODE_ERROR, f"palette: {_one_line(exc, ds)}") from exc
    if samples == 1:
        return _gray(frame[np.newaxis], ds, first=index)[0]
    if frame.ndim != 3:
        raise _Skip(SkipReason.DECODE_ERROR, f"unsupported samples per pixel: {samples}")
    return frame.astype(np.float32)


def _check_codestreams(ds: Dataset) -> None:
    """Refuse compressed pixel data whose frames claim another image than the header's, before decoding.

    Each frame's JPEG 2000 SIZ marker, JPEG SOF marker or JPEG-LS SOF55 marker gives its columns,
    rows and components; they must be the header's Columns, Rows and Samples per Pixel. Frames
    in other formats (RLE, whose size comes from the header) and frames whose markers cannot be
    found are left to the decoder.

    Raises
    ------
    _Skip
        TOO_LARGE when a frame claims more pixels than one file may hold, CODESTREAM_MISMATCH when
        it claims another size. The detail names the format and the frame, never a header value.
    """
    expected = (_int(_get(ds, "Columns"), 0), _int(_get(ds, "Rows"), 0), _int(_get(ds, "SamplesPerPixel"), 1))
    n = _frames(ds)
    try:
        frames = generate_fragmented_frames(ds.PixelData, number_of_frames=n)
        for index, fragments in enumerate(frames):
            found = _codestream_size(_head(fragments))
            if found is None or found[1:] == expected:
                continue
            kind, width, height, components = found
            if width * height * components * 4 * n > _MAX_DECODED_BYTES:
                raise _Skip(
                    SkipReason.TOO_LARGE,
                    f"the {kind} image of frame {index + 1} claims more pixels than the "
                    f"{_MAX_DECODED_BYTES / 2**30:.0f} GiB one file may hold here",
                )
            raise _Skip(
                SkipReason.CODESTREAM_MISMATCH,
                f"the {kind} image of frame {index + 1} is not the size the header declares (Rows, "
                "Columns, Samples per Pixel); the file is damaged",
            )
    except _Skip:
        raise
    except Exception:  # noqa: BLE001, S110 - fragments that do not parse are the decoder's to reject
        pass


def _head(fragments: tuple[bytes, ...]) -> bytes:
    """The first bytes of a frame's codestream (fragments joined up to :data:`_HEAD_BYTES`)."""
    head = b""
    for fragment in fragments:
        head += fragment[: _HEAD_BYTES - len(head)]
        if len(head) >= _HEAD_BYTES:
            break
    return head


def _codestream_size(data: bytes) -> tuple[str, int, int, int] | None:
    """``(format, columns, rows, components)`` from a codestream's markers; None when not found."""
    if data[:4] == _J2K_SIZ or data[:12] == _JP2_SIGNATURE:
        at = data.find(_J2K_SIZ)
        if at < 0 or at + 42 > len(data):
            return None
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, at + 8)
        (components,) = struct.unpack_from(">H", data, at + 40)
        return "JPEG 2000", xsiz - xo, ysiz - yo, components
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 10 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, i + 5)
            return ("JPEG-LS" if marker == 0xF7 else "JPEG"), width, height, data[i + 9]
        if marker == 0xDA:  # a scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _stored_range(ds: Dataset) -> tuple[float, float] | None:
    bits = _int(_get(ds, "BitsStored"), _int(_get(ds, "BitsAllocated"), 0))
    if not 0 < bits <= 32 or "PixelData" not in ds:
        return None
    if _int(_get(ds, "PixelRepresentation"), 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _gray(arr: np.ndarray, ds: Dataset, *, first: int = 0) -> np.ndarray:
    """Apply the modality LUT (per frame for Enhanced objects); invert MONOCHROME1.

    ``arr`` holds frames ``first``, ``first + 1``... of the file. The output is float32 with
    higher = brighter. MONOCHROME1 is inverted within the range the
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
        item = _group_item(ds, first + i, "PixelValueTransformationSequence") if enhanced else None
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            slope, intercept = _rescale(item, default=False)
            out[i] = arr[i] * slope + intercept
        elif _get(ds, "ModalityLUTSequence"):
            out[i] = apply_modality_lut(arr[i], ds)
            ranges.append(None)
            continue
        else:
            slope, intercept = _rescale(ds)
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


def _rescale(ds: Dataset, *, default: bool = True) -> tuple[float, float]:
    """Rescale Slope and Intercept as numbers (1 and 0 where absent, with ``default``).

    Raises
    ------
    _Skip
        DECODE_ERROR when either is not a number (the message never quotes it).
    """
    try:
        if default:
            return float(_get(ds, "RescaleSlope") or 1.0), float(_get(ds, "RescaleIntercept") or 0.0)
        return float(ds.RescaleSlope), float(ds.RescaleIntercept)
    except (TypeError, ValueError) as exc:
        raise _Skip(
            SkipReason.DECODE_ERROR, "the Rescale Slope or Rescale Intercept is not a number; the header is damaged"
        ) from exc


def _gray_in_float32(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """What :func:`_gray` gives, computed in float32 where that is exact; None elsewhere.

    With integer pixels, an integer rescale slope and intercept, and every value on the way below
    2**24 in magnitude, each float32 operation is exact, so the result equals the float64 path's
    bit for bit, at a fraction of the cost (most CT, MR and CR files).
    """
    if arr.dtype.kind not in "iu" or arr.size == 0 or _is_enhanced(ds) or _get(ds, "ModalityLUTSequence"):
        return None
    try:
        slope, intercept = _rescale(ds)
    except _Skip:
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


def _plain_gray(ds: Dataset) -> bool:
    """Whether a file holds one grayscale image whose decoded shape is (Rows, Columns)."""
    return (
        _int(_get(ds, "NumberOfFrames"), 1) <= 1
        and _int(_get(ds, "SamplesPerPixel"), 1) == 1
        and _str(ds, "PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
        and _int(_get(ds, "Rows"), 0) > 0
        and _int(_get(ds, "Columns"), 0) > 0
        and _decoded_pixel_bytes(ds) <= _MAX_DECODED_BYTES
    )
