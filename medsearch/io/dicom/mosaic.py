"""Siemens mosaics: one stored image that tiles the slices of a volume, and how to split it.

Siemens MR scanners store an EPI volume (fMRI, diffusion) as one image whose Image Type holds
``MOSAIC``: its slices lie in a square grid of tiles, row by row. :func:`mosaic_count` reads how
many slices a header's mosaic holds: from the private element NumberOfImagesInMosaic (0019,xx0A)
of the ``SIEMENS MR HEADER`` block, else from the CSA Image Header (0029,xx10, whose binary
``SV10`` layout pydicom does not parse), else the tile count from AcquisitionMatrix (which may
count a few empty tiles at the end). :func:`split_mosaic` turns the decoded ``(1, H, W)`` image
into ``(N, H / grid, W / grid)`` slices, where ``grid = ceil(sqrt(N))``.

Every value read here is bounded and checked: a damaged count falls back to the next source, and a
count that does not fit the image is refused.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medsearch.io.dicom.read import _get, _int

__all__ = ["MAX_MOSAIC_SLICES", "is_mosaic", "mosaic_count", "mosaic_tile", "split_mosaic"]

#: The most slices a mosaic may claim (Siemens writes up to a few hundred).
MAX_MOSAIC_SLICES = 4096
_CREATOR_MR = "SIEMENS MR HEADER"
_CREATOR_CSA = "SIEMENS CSA HEADER"
_CSA_FIELD = "NumberOfImagesInMosaic"
_CSA_MAX_TAGS = 1024


def is_mosaic(ds: Dataset) -> bool:
    """Whether a header's image is a Siemens mosaic (Image Type holds MOSAIC; one gray frame)."""
    value = _get(ds, "ImageType")
    if isinstance(value, str):
        values: list[object] = list(value.split("\\"))
    elif isinstance(value, (list, tuple, MultiValue)):
        values = list(value)
    else:
        return False
    named = any(str(v).strip().upper() == "MOSAIC" for v in values)
    return named and _int(_get(ds, "NumberOfFrames"), 1) <= 1 and _int(_get(ds, "SamplesPerPixel"), 1) == 1


def mosaic_count(ds: Dataset) -> int | None:
    """How many slices a mosaic holds, or None when the header is not a mosaic or no count fits its image.

    The sources, in order: NumberOfImagesInMosaic (0019,xx0A), the CSA Image Header's field of the
    same name (0029,xx10), the tile count from AcquisitionMatrix. A count is kept only when its
    grid divides the image into whole tiles.
    """
    if not is_mosaic(ds):
        return None
    rows, columns = _int(_get(ds, "Rows"), 0), _int(_get(ds, "Columns"), 0)
    for count in (_private_count(ds), _csa_count(ds), _matrix_count(ds, rows, columns)):
        if count is not None and _fits(count, rows, columns):
            return count
    return None


def mosaic_tile(ds: Dataset) -> tuple[int, int] | None:
    """``(rows, columns)`` of one slice of a mosaic header, or None when it is not one."""
    count = mosaic_count(ds)
    if count is None:
        return None
    grid = _grid(count)
    return _int(_get(ds, "Rows"), 0) // grid, _int(_get(ds, "Columns"), 0) // grid


def split_mosaic(pixels: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` slices of a decoded mosaic ``(1, H, W)``, as ``(count, H / grid, W / grid)`` float32.

    Raises
    ------
    ValueError
        ``pixels`` is not one gray image, or ``count`` tiles do not divide it.
    """
    if pixels.ndim != 3 or pixels.shape[0] != 1:
        raise ValueError(f"a mosaic is one gray image (1, H, W), got shape {pixels.shape}")
    rows, columns = pixels.shape[1:]
    if not _fits(count, rows, columns):
        raise ValueError(f"{count} tiles do not divide a {rows} x {columns} mosaic")
    grid = _grid(count)
    height, width = rows // grid, columns // grid
    # (grid, height, grid, width) -> (grid, grid, height, width): tiles row by row
    tiles = pixels[0].reshape(grid, height, grid, width).transpose(0, 2, 1, 3).reshape(grid * grid, height, width)
    return np.ascontiguousarray(tiles[:count], dtype=np.float32)


def _grid(count: int) -> int:
    return math.ceil(math.sqrt(count))


def _fits(count: int, rows: int, columns: int) -> bool:
    if not 1 < count <= MAX_MOSAIC_SLICES:
        return False
    grid = _grid(count)
    return rows > 0 and columns > 0 and rows % grid == 0 and columns % grid == 0


def _private_block(ds: Dataset, group: int, creator: str) -> int | None:
    """The element block (0x10..0xFF) a private creator reserved in ``group``, or None."""
    for block in range(0x10, 0x100):
        tag = (group << 16) | block
        if tag not in ds:
            continue
        try:
            value = ds[tag].value
        except Exception:  # noqa: BLE001 - a creator that does not parse reserves nothing we can read
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if str(value).strip(" \0").upper() == creator:
            return block
    return None


def _private_count(ds: Dataset) -> int | None:
    block = _private_block(ds, 0x0019, _CREATOR_MR)
    if block is None:
        return None
    tag = 0x00190000 | (block << 8) | 0x0A
    if tag not in ds:
        return None
    try:
        value = ds[tag].value
    except Exception:  # noqa: BLE001 - as above
        return None
    return _as_count(value)


def _as_count(value: object) -> int | None:
    """A count from a private value as pydicom gives it: a number, raw bytes (US, little endian), or text."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        if len(value) == 2:
            return int(struct.unpack("<H", value)[0])
        if len(value) == 4:
            return int(struct.unpack("<I", value)[0])
        value = value.decode("latin-1").strip(" \0")
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        return None


def _csa_count(ds: Dataset) -> int | None:
    block = _private_block(ds, 0x0029, _CREATOR_CSA)
    if block is None:
        return None
    tag = 0x00290000 | (block << 8) | 0x10
    if tag not in ds:
        return None
    try:
        data = ds[tag].value
    except Exception:  # noqa: BLE001 - as above
        return None
    if not isinstance(data, bytes):
        return None
    text = _csa_field(data, _CSA_FIELD)
    return _as_count(text) if text else None


def _csa_field(data: bytes, name: str) -> str | None:
    """The first item of a field of a CSA2 (``SV10``) header, as text; None when absent or malformed.

    Layout: ``SV10``, 4 bytes, the number of fields and 4 bytes (little endian); each field: a name
    of 64 bytes, VM, VR (4 bytes), SyngoDT, the number of items and 4 bytes; each item: four int32
    (the first and second give its length), then its bytes padded to a multiple of 4.
    """
    if data[:4] != b"SV10" or len(data) < 16:
        return None
    (n_fields,) = struct.unpack_from("<I", data, 8)
    if not 0 < n_fields <= _CSA_MAX_TAGS:
        return None
    at = 16
    for _ in range(n_fields):
        if at + 84 > len(data):
            return None
        field = data[at : at + 64].split(b"\0", 1)[0].decode("latin-1")
        (n_items,) = struct.unpack_from("<i", data, at + 76)
        at += 84
        if not 0 <= n_items <= _CSA_MAX_TAGS:
            return None
        first: str | None = None
        for i in range(n_items):
            if at + 16 > len(data):
                return None
            length = struct.unpack_from("<i", data, at + 4)[0]
            at += 16
            if not 0 <= length <= len(data) - at:
                return None
            if i == 0 and length:
                first = data[at : at + length].split(b"\0", 1)[0].decode("latin-1").strip()
            at += (length + 3) // 4 * 4
        if field == name:
            return first or None
    return None


def _matrix_count(ds: Dataset, rows: int, columns: int) -> int | None:
    """The tiles of a mosaic from its AcquisitionMatrix (frequency rows, frequency columns, phase
    rows, phase columns): the side of one tile is its largest value."""
    matrix = _get(ds, "AcquisitionMatrix")
    try:
        side = max(int(v) for v in matrix) if matrix else 0
    except (TypeError, ValueError):
        return None
    if side <= 0 or rows % side or columns % side or rows // side != columns // side:
        return None
    grid = rows // side
    return grid * grid if grid > 1 else None

