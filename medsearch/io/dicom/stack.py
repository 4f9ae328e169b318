"""Where the images of a case lie, and how they are ordered into one spatial stack.

:class:`SliceGeometry` is what a scan records of a file that holds one grayscale image, so that a
series can be ordered later without reading its files again. :func:`_images` lists the images of
one file (one per frame) with their position and orientation; :func:`_stack` sorts images along
the slice normal and keeps one image per position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medsearch.io.dicom.decode import _plain_gray
from medsearch.io.dicom.read import _get, _group_item, _int, _is_enhanced

__all__ = ["SliceGeometry"]


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


@dataclass
class _Image:
    """One decoded 2D image (a file, or one frame of a multi-frame file) and its geometry."""

    pixels: np.ndarray | None  # (H, W) or (H, W, 3) float32; None: not decoded (yet)
    position: np.ndarray | None
    orientation: np.ndarray | None
    order: tuple[float, float, int, int]  # InstanceNumber, AcquisitionNumber, file, frame


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


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


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
