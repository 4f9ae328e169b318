"""The query studies the page has sent: their case vector and a preview of their pixels, kept a while.

A study dropped on the page is decoded and encoded once. What the service keeps of it is a
:class:`QueryStudy` under a random token: the case vector (so a change of filters or ``k``, a reload
of the page or a shared link searches again without another upload) and a :class:`Preview` of its
pixels for the page's viewer. The upload's files themselves are deleted as soon as it is read.

The preview is the study at full resolution, as 16-bit integers (``value = stored * scale +
offset``, exact for CT in HU) or 8-bit RGB, so that the page windows it in the browser: a preset or
a slice change costs no round trip. A preview holds at most :data:`PREVIEW_BYTES` (evenly spaced
slices of a longer series), and :class:`StudyCache` keeps at most :data:`CACHE_STUDIES` studies and
:data:`CACHE_BYTES` of previews, the least recently used dropped first; the cache lives in memory
and is empty after a restart.

The window the page opens with comes from the study's own header (Window Center / Window Width,
the first pair; not for MONOCHROME1, whose pixels medsearch inverts), else from the middle slice's
0.5th and 99.5th percentiles. :data:`CT_WINDOWS` are the presets offered for CT, in HU.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsearch.io import CaseRef, Volume

__all__ = [
    "CACHE_BYTES",
    "CACHE_STUDIES",
    "CT_WINDOWS",
    "PREVIEW_BYTES",
    "Preview",
    "QueryStudy",
    "StudyCache",
    "make_preview",
    "preview_slices",
]

#: Window presets for CT, in HU: name -> (center, width).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
#: The largest preview of one study, in bytes.
PREVIEW_BYTES = 256 * 2**20
#: How many studies the service keeps, and how many bytes of previews in all.
CACHE_STUDIES = 32
CACHE_BYTES = 1024 * 2**20
_INT16 = (-32768, 32767)


@dataclass(frozen=True)
class Preview:
    """A study's pixels for the page's viewer.

    Attributes
    ----------
    pixels
        ``(S, H, W)`` int16 gray (``value = stored * scale + offset``) or ``(S, H, W, 3)`` uint8 RGB.
    slices
        Which slice of the study (from 0) each of the ``S`` preview slices is.
    n_slices
        The study's slices in all.
    window
        ``(center, width)`` to open with, in the study's values.
    window_source
        ``"header"`` (the file's Window Center / Width) or ``"image"`` (percentiles).
    """

    pixels: np.ndarray
    slices: tuple[int, ...]
    n_slices: int
    scale: float
    offset: float
    window: tuple[float, float]
    window_source: str
    spacing: tuple[float, float, float]
    modality: str
    rgb: bool

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def describe(self) -> dict[str, Any]:
        """What the page needs to draw a slice (the pixels come from :meth:`slice_bytes`)."""
        return {
            "slices": list(self.slices),
            "n_slices": self.n_slices,
            "rows": int(self.pixels.shape[1]),
            "columns": int(self.pixels.shape[2]),
            "format": "rgb8" if self.rgb else "int16",
            "scale": self.scale,
            "offset": self.offset,
            "window": {"center": self.window[0], "width": self.window[1], "source": self.window_source},
            "presets": {name: {"center": c, "width": w} for name, (c, w) in CT_WINDOWS.items()} if self.modality == "CT" else {},
            "spacing": list(self.spacing),
            "modality": self.modality,
        }

    def slice_bytes(self, index: int) -> bytes:
        """Preview slice ``index`` (0 <= index < S) as little-endian bytes, row after row.

        Raises
        ------
        IndexError
            No such preview slice.
        """
        if not 0 <= index < len(self.pixels):
            raise IndexError(index)
        data = self.pixels[index]
        return data.astype("<i2", copy=False).tobytes() if not self.rgb else np.ascontiguousarray(data).tobytes()


def preview_slices(depth: int, rows: int, columns: int, *, rgb: bool = False, budget: int = PREVIEW_BYTES) -> list[int]:
    """The slices of a ``depth``-slice study that a preview keeps: all, or evenly spaced within ``budget`` bytes."""
    per_slice = max(1, rows * columns * (3 if rgb else 2))
    room = max(1, budget // per_slice)
    if depth <= room:
        return list(range(depth))
    return sorted({int(round(i)) for i in np.linspace(0, depth - 1, room)})


def make_preview(case: CaseRef, volume: Volume, *, budget: int = PREVIEW_BYTES) -> Preview:
    """The preview of a loaded study: its decoded slices within ``budget`` bytes, and the window to open with."""
    depth = int(volume.pixels.shape[0])
    held = range(depth) if volume.decoded is None else volume.decoded
    keep = [i for i in held if 0 <= i < depth]
    rows, columns = int(volume.pixels.shape[1]), int(volume.pixels.shape[2])
    chosen = [keep[i] for i in preview_slices(len(keep), rows, columns, rgb=volume.rgb, budget=budget)]
    spacing = tuple(float(s) for s in volume.spacing)
    if volume.rgb:
        pixels = np.clip(np.rint(volume.pixels[chosen]), 0, 255).astype(np.uint8)
        return Preview(pixels, tuple(chosen), depth, 1.0, 0.0, (127.5, 255.0), "image", _spacing3(spacing), volume.modality, True)
    values = volume.pixels[chosen]
    scale, offset, stored = _quantize(values)
    middle = values[len(values) // 2]
    window, source = _header_window(case), "header"
    if window is None:
        window, source = _image_window(middle), "image"
    return Preview(stored, tuple(chosen), depth, scale, offset, window, source, _spacing3(spacing), volume.modality, False)


def _spacing3(spacing: Iterable[float]) -> tuple[float, float, float]:
    values = [float(s) if s and math.isfinite(float(s)) and float(s) > 0 else 1.0 for s in spacing]
    values += [1.0] * (3 - len(values))
    return values[0], values[1], values[2]


def _quantize(values: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``values`` as int16 with ``value = stored * scale + offset``; exact for integers in the int16 range."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0, 0.0, np.zeros(values.shape, np.int16)
    low, high = float(finite.min()), float(finite.max())
    clean = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if low >= _INT16[0] and high <= _INT16[1] and np.array_equal(clean, np.rint(clean)):
        return 1.0, 0.0, clean.astype(np.int16)
    scale = (high - low) / 65535.0 or 1.0
    offset = low + 32768.0 * scale
    stored = np.clip(np.rint((clean - offset) / scale), *_INT16).astype(np.int16)
    return scale, offset, stored


def _header_window(case: CaseRef) -> tuple[float, float] | None:
    """The first Window Center / Width pair of the header (or of an Enhanced object's first frame)."""
    ds = case.header
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return None
    candidates = [ds]
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            groups = ds.get(sequence)
            if groups:
                voi = groups[0].get("FrameVOILUTSequence")
                if voi:
                    candidates.append(voi[0])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            continue
    for item in candidates:
        try:
            center, width = _first_number(item.get("WindowCenter")), _first_number(item.get("WindowWidth"))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        if center is not None and width is not None and width >= 1:
            return center, width
    return None


def _first_number(element: Any) -> float | None:
    if element is None:
        return None
    value = element.value if hasattr(element, "value") else element
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _image_window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    width = max(high - low, 1.0)
    return low + width / 2, width


@dataclass
class QueryStudy:
    """A study the page has sent: its case vector, what the results show of it, its preview."""

    token: str
    vector: np.ndarray
    query: dict[str, Any]
    preview: Preview | None
    extra: dict[str, Any] = field(default_factory=dict)  # what a search option needs of the query (its patient)
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return self.preview.nbytes if self.preview is not None else 0


class StudyCache:
    """The last query studies, by token: at most ``studies`` of them and ``max_bytes`` of previews."""

    def __init__(self, *, studies: int = CACHE_STUDIES, max_bytes: int = CACHE_BYTES) -> None:
        self.studies = studies
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, QueryStudy] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, vector: np.ndarray, query: dict[str, Any], preview: Preview | None, extra: dict[str, Any] | None = None) -> QueryStudy:
        study = QueryStudy(secrets.token_urlsafe(18), np.asarray(vector, np.float32), dict(query), preview, dict(extra or {}))
        with self._lock:
            self._items[study.token] = study
            while len(self._items) > 1 and (
                len(self._items) > self.studies or sum(s.nbytes for s in self._items.values()) > self.max_bytes
            ):
                self._items.popitem(last=False)
        return study

    def get(self, token: str) -> QueryStudy | None:
        with self._lock:
            study = self._items.get(token)
            if study is not None:
                self._items.move_to_end(token)
            return study

    def __len__(self) -> int:
        return len(self._items)
