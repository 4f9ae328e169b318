"""Decoding one file's pixel data into float32 frames, within a size limit.

:func:`_decode` turns a dataset read in full into (F, H, W) gray or (F, H, W, 3) RGB float32: the
modality LUT or rescale is applied (per frame for Enhanced objects), MONOCHROME1 is inverted so
that higher is brighter, and PALETTE COLOR and YBR become RGB. A header that declares more than
:data:`_MAX_PIXEL_BYTES` of pixels is refused before the decoder allocates them.
:func:`_decoder_problem` says from the header alone whether a transfer syntax can be decoded here.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import UID

from medsearch.io.dicom.read import (
    SkipReason,
    _get,
    _group_item,
    _int,
    _is_enhanced,
    _mentions_truncation,
    _one_line,
    _Skip,
    _str,
)

_MAX_PIXEL_BYTES = 2**30  # decoded bytes one file may declare (a 2,000-frame 512 x 512 16-bit volume is 1 GiB)


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
