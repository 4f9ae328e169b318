"""What a case vector is: the one definition shared by indexing, querying, evaluation and training.

A volume goes through the configured preprocessing (:func:`encoder_array`: the selected slices, or
the resampled volume for a 3D encoder), the encoder embeds each slice, and :func:`pool_slices`
pools the slice vectors into one unit-length case vector. :func:`embed_volume` does the three steps
for one volume; the indexing engine does the same steps for many cases per encoder call.

:func:`embed_slices` keeps the slice vectors too, as a :class:`SliceSet` (which slices of the stack,
and how far apart in millimetres): the index stores them for late-interaction re-ranking
(:mod:`medsearch.rerank`). A :class:`Region` narrows a query to a slab of slices, or to a box on
them: :func:`region_array` gives what the encoder sees of it. An index built with ``crop_grid``
also keeps the vectors of tiles of each kept slice (:func:`crop_boxes`, :func:`crop_array`), cut and
preprocessed as a query's box is, for region queries with a box to match, and for matching a
slab's slices in layout (each slice compared whole and tile by tile at the same place of the grid:
:func:`in_layout`, :mod:`medsearch.rerank`).

:func:`study_array` gives what the encoder sees of a query study (the whole study, a region, and
with layout the tiles of its slices), and :func:`query_slices` splits the encoder's vectors into the
query's slice set; the query paths (:class:`~medsearch.search.Searcher`, the service) share both.

The 2D preprocessing runs in numpy (:mod:`medsearch.transforms.arrays`, the MONAI pipeline's output
bit for bit), so that a query with the ONNX runtime imports neither MONAI nor torch;
:func:`encoder_input` gives the same batch as a torch tensor, for training and evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medsearch.config import Config, SliceMode
from medsearch.encoders import Encoder, EncoderInfo
from medsearch.errors import ConfigError, InvalidStudyError
from medsearch.io import Volume
from medsearch.transforms import chosen_slices, encoder_batch

if TYPE_CHECKING:
    import torch

__all__ = [
    "Region",
    "SliceSet",
    "StudyInput",
    "crop_array",
    "crop_boxes",
    "embedded_box",
    "embed_crops",
    "embed_slices",
    "embed_volume",
    "encoder_array",
    "encoder_input",
    "in_layout",
    "is_box",
    "pool_slices",
    "query_slices",
    "region_array",
    "sees_slices",
    "slice_indices",
    "study_array",
]


@dataclass(frozen=True)
class SliceSet:
    """The slice vectors of one case or query: row ``i`` of ``vectors`` embeds slice ``indices[i]``
    of the stack (0 = the first slice in stack order); ``gap_mm`` is the distance between
    neighbouring slices of the stack, None where the headers do not say.

    A crop set (an index's crop vectors) has ``boxes``: row ``i`` embeds box ``boxes[i]`` (x0, y0,
    x1, y1 in pixels) of slice ``indices[i]``. ``cropped``: a query's rows embed a box of each
    slice (a region query with ``roi``), so re-ranking compares them with crop vectors too."""

    vectors: np.ndarray  # (S, dim) float32 (float16 when read back from an index), unit length
    indices: np.ndarray  # (S,) int32, increasing (non-decreasing for a crop set)
    gap_mm: float | None = None
    boxes: np.ndarray | None = None  # (S, 4) int32, a crop set only
    cropped: bool = False
    tiles: np.ndarray | None = None  # (S, grid * grid, dim) float32, a query matched in layout only

    def __len__(self) -> int:
        return int(len(self.indices))

    def position_mm(self, index: int) -> float | None:
        """Where slice ``index`` of the stack lies, in mm from the first slice; None when unknown."""
        return None if self.gap_mm is None else round(float(index) * self.gap_mm, 2)


@dataclass(frozen=True)
class Region:
    """A part of a query study: a slab of slices (``slices``: start, stop, as Python slices count,
    0 = the first slice in stack order), and a box on those slices (``roi``: x0, y0, x1, y1 in
    pixels of the stored image, x across, y down; x1 and y1 excluded). A box without a slab lies on
    the middle slice.

    Examples
    --------
    >>> Region.parse(slices="40:60", roi="10,20,110,140")
    Region(slices=(40, 60), roi=(10, 20, 110, 140))
    >>> Region.parse(slices="45").slices
    (45, 46)
    """

    slices: tuple[int, int] | None = None
    roi: tuple[int, int, int, int] | None = None

    @classmethod
    def parse(
        cls, *, slices: str | Sequence[int] | None = None, roi: str | Sequence[int] | None = None
    ) -> Region | None:
        """A region from ``"40:60"`` (or ``"45"``, or ``(40, 60)``) and ``"X0,Y0,X1,Y1"`` (or a 4-tuple); None for neither.

        Raises
        ------
        ConfigError
            A malformed slab or box.
        """
        if slices is None and roi is None:
            return None
        return cls(slices=None if slices is None else _parse_slab(slices), roi=None if roi is None else _parse_box(roi))

    def to_dict(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        if self.slices is not None:
            out["slices"] = list(self.slices)
        if self.roi is not None:
            out["roi"] = list(self.roi)
        return out

    def record(self, height: int, width: int, grid: int) -> dict[str, list[int]]:
        """What a query's answer records of this region on ``height`` x ``width`` slices, against an
        index with ``crop_grid = grid``: :meth:`to_dict`, and for a box ``embedded_box``, the box as
        the encoder saw it (:func:`embedded_box`)."""
        out = self.to_dict()
        if self.roi is not None:
            out["embedded_box"] = list(embedded_box(self.roi, height, width, grid))
        return out

    def slab(self, depth: int) -> tuple[int, int]:
        """The slab of a stack of ``depth``: the one given, else the middle slice (with a box) or all.

        Raises
        ------
        InvalidStudyError
            The slab lies outside the stack.
        """
        if self.slices is None:
            return (depth // 2, depth // 2 + 1) if self.roi is not None else (0, depth)
        start, stop = self.slices
        if stop > depth:
            raise InvalidStudyError(
                f"slices {start}:{stop} lie outside the study's {depth} slice(s); give a slab within 0:{depth}"
            )
        return start, stop


_SLAB = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


def _parse_slab(value: str | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, str):
        found = _SLAB.match(value)
        if found is None:
            raise ConfigError(f"slices must be START:STOP (e.g. 40:60) or one slice number, got {value!r}")
        start = int(found.group(1))
        stop = int(found.group(2)) if found.group(2) is not None else start + 1
    else:
        parts = [int(v) for v in value]
        if len(parts) not in (1, 2):
            raise ConfigError(f"slices must be (start, stop) or (slice,), got {tuple(value)!r}")
        start, stop = parts[0], parts[-1] if len(parts) == 2 else parts[0] + 1
    if not 0 <= start < stop:
        raise ConfigError(f"slices {start}:{stop} is empty or negative; give START:STOP with 0 <= START < STOP")
    return start, stop


def _parse_box(value: str | Sequence[int]) -> tuple[int, int, int, int]:
    try:
        parts = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise ConfigError(f"roi must be four whole pixel numbers X0,Y0,X1,Y1, got {value!r}") from None
    if len(parts) != 4:
        raise ConfigError(f"roi must be four whole pixel numbers X0,Y0,X1,Y1, got {value!r}")
    x0, y0, x1, y1 = parts
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ConfigError(f"roi {x0},{y0},{x1},{y1} must satisfy 0 <= X0 < X1 and 0 <= Y0 < Y1 (pixels; x across, y down)")
    return x0, y0, x1, y1


def is_box(region: Region | None) -> bool:
    """Whether a query of ``region`` is a box (``roi``): its slices are crops, matched against the
    index's tiles as well as its slices, never in layout."""
    return region is not None and region.roi is not None


def sees_slices(info: EncoderInfo, config: Config) -> bool:
    """Whether an index of this encoder and config keeps slice sets: a 2D encoder on axial slices
    (not a 3D encoder, not tri-planar images). Region queries and re-ranking need them."""
    return info.spatial_dims == 2 and config.preprocess.slice_mode is SliceMode.AXIAL


def slice_indices(volume: Volume, info: EncoderInfo, config: Config) -> list[int] | None:
    """The stack slices a 2D encoder sees of ``volume`` (axial mode), in order; None for tri-planar
    images and 3D encoders, which have no slice set."""
    if not sees_slices(info, config):
        return None
    return chosen_slices(int(volume.pixels.shape[0]), config.preprocess, gap_mm=volume.gap_mm)


def encoder_array(volume: Volume, info: EncoderInfo, config: Config) -> np.ndarray:
    """The batch an encoder sees for one volume, float32: ``(S, C, H, W)`` selected slices, or ``(1, 1, D, H, W)``."""
    return encoder_batch(
        volume.pixels,
        config=config.preprocess,
        modality=volume.modality,
        rgb=volume.rgb,
        spacing=volume.spacing,
        spatial_dims=info.spatial_dims,
        channels=info.in_channels,
        mean=info.mean,
        std=info.std,
        volume_shape=config.encoder.volume_shape,
        indices=slice_indices(volume, info, config),
    )


def region_array(volume: Volume, info: EncoderInfo, config: Config, region: Region) -> tuple[np.ndarray, list[int]]:
    """What a 2D encoder sees of a region of ``volume``, and the stack slices it comes from.

    A slab's slices are chosen as a whole volume's are (by density, or the configured count),
    within the slab; a box is cut from each chosen slice (widened to the index's tile size, see
    :func:`embedded_box`) and goes through the encoder's slice preprocessing as a whole image would
    (so the crop fills the encoder input, its aspect kept).
    A CT crop is windowed as the whole slice; other modalities are scaled to the crop's own
    percentiles.

    Raises
    ------
    InvalidStudyError
        The region lies outside the study, or the index's encoder sees no slices (a 3D encoder,
        tri-planar images).
    """
    if slice_indices(volume, info, config) is None:
        raise InvalidStudyError(
            "region queries need an index of axial slices from a 2D encoder; this index was built with "
            "a 3D encoder or tri-planar images: query the whole study"
        )
    depth = int(volume.pixels.shape[0])
    start, stop = region.slab(depth)
    inside = [start + i for i in chosen_slices(stop - start, config.preprocess, gap_mm=volume.gap_mm)]
    pixels = volume.pixels
    if region.roi is not None:
        x0, y0, x1, y1 = region.roi
        height, width = pixels.shape[1:3]
        if x1 > width or y1 > height:
            raise InvalidStudyError(
                f"roi {x0},{y0},{x1},{y1} lies outside the study's {width} x {height} pixel images; "
                "give a box within them (x across, y down)"
            )
        x0, y0, x1, y1 = embedded_box(region.roi, height, width, config.index.crop_grid)
        pixels = pixels[:, y0:y1, x0:x1]
    batch = encoder_batch(
        pixels, config=config.preprocess, modality=volume.modality, rgb=volume.rgb, spacing=volume.spacing,
        channels=info.in_channels, mean=info.mean, std=info.std, indices=inside,
    )
    return batch, inside


def in_layout(info: EncoderInfo, config: Config, region: Region | None = None, layout: bool | None = None) -> bool:
    """Whether a query's slices are matched in layout: each slice compared with a case's slice whole
    and tile by tile, each tile with the tile at the same place of the grid (:mod:`medsearch.rerank`).

    It needs an index that keeps tiles (``crop_grid``, and the config a searcher adapts to its index)
    and a query of whole slices (a box is one tile already). ``layout``: asked for or refused; None,
    the default, matches a slab (``Region.slices``) in layout and a whole study not: a slab is a few
    slices, a whole study many, and each slice in layout costs the encoder ``grid * grid`` more
    images (measured in docs/benchmarks/volumes.md, "Slabs in layout").
    """
    if config.index.crop_grid < 2 or not sees_slices(info, config) or is_box(region):
        return False
    return layout if layout is not None else region is not None


@dataclass(frozen=True)
class StudyInput:
    """What the encoder sees of a query study (:func:`study_array`): ``images``, the slices and then,
    matched in layout, ``tiles`` images of each slice (slice by slice, in the order of
    :func:`crop_boxes`); the stack slices they come from (None: no slice set, a 3D encoder or
    tri-planar images); and what the answer records of a region (:meth:`Region.record`)."""

    images: np.ndarray
    slice_indices: list[int] | None
    region: dict[str, list[int]] | None = None
    tiles: int = 0


def study_array(
    volume: Volume, info: EncoderInfo, config: Config, region: Region | None = None, layout: bool | None = None
) -> StudyInput:
    """What the encoder sees of a query study, or of its ``region``: :func:`encoder_array` or
    :func:`region_array`, and the tiles of those slices when they are matched in layout
    (:func:`in_layout`, ``layout`` as there).

    Raises
    ------
    InvalidStudyError
        As :func:`region_array`.
    """
    if region is None:
        batch, chosen, record = encoder_array(volume, info, config), slice_indices(volume, info, config), None
    else:
        batch, chosen = region_array(volume, info, config, region)
        record = region.record(int(volume.pixels.shape[1]), int(volume.pixels.shape[2]), config.index.crop_grid)
    if chosen is None or not in_layout(info, config, region, layout):
        return StudyInput(batch, chosen, record)
    tiles, _, _ = crop_array(volume, info, config, chosen)
    return StudyInput(np.concatenate([batch, tiles]), chosen, record, len(tiles) // max(len(chosen), 1))


def query_slices(
    vectors: np.ndarray, chosen: Sequence[int] | None, gap_mm: float | None, *, tiles: int = 0, cropped: bool = False
) -> tuple[np.ndarray, SliceSet | None]:
    """The encoder's ``vectors`` of a :class:`StudyInput` (its ``slice_indices`` and ``tiles``) as
    the query's slice vectors (to pool into its case vector) and its :class:`SliceSet` (with the
    tiles, matched in layout); None where the study has no slice set. ``cropped``: the slices are
    boxes (a region with ``roi``)."""
    vectors = np.asarray(vectors, np.float32)
    if chosen is None or not len(chosen) or len(vectors) != len(chosen) * (1 + tiles):
        return vectors, None
    head = vectors[: len(chosen)]
    tiled = vectors[len(chosen):].reshape(len(chosen), tiles, -1) if tiles else None
    return head, SliceSet(head, np.asarray(chosen, np.int32), gap_mm, cropped=cropped, tiles=tiled)


def crop_boxes(height: int, width: int, grid: int) -> list[tuple[int, int, int, int]]:
    """The tiles an index keeps of a ``height`` x ``width`` slice with ``crop_grid = grid``: a grid of
    ``grid`` x ``grid`` boxes (x0, y0, x1, y1; row by row), each ``2 / (grid + 1)`` of the image a
    side, neighbours overlapping by half a tile, so that any box up to half a tile a side lies
    wholly inside one of them. Empty for a grid below 2.

    >>> crop_boxes(90, 120, 2)
    [(0, 0, 80, 60), (40, 0, 120, 60), (0, 30, 80, 90), (40, 30, 120, 90)]
    """
    if grid < 2:
        return []
    xs = [round(i * width / (grid + 1)) for i in range(grid + 2)]
    ys = [round(i * height / (grid + 1)) for i in range(grid + 2)]
    return [(xs[i], ys[j], xs[i + 2], ys[j + 2]) for j in range(grid) for i in range(grid)]


def embedded_box(box: tuple[int, int, int, int], height: int, width: int, grid: int) -> tuple[int, int, int, int]:
    """What a query embeds of ``box`` on a ``height`` x ``width`` slice, against an index with
    ``crop_grid = grid``: the box widened, about its centre and within the image, to the size of the
    index's tiles (:func:`crop_boxes`), so that the query and the tiles show anatomy at one scale;
    a box as large or larger, or an index without tiles (``grid`` below 2), embeds as given.

    Measured on the real cases of ``../shared/data/dicom`` (docs/benchmarks/volumes.md, "Finding a
    box", a scratch run over every stored copy): a box a quarter of the image a side found its own
    case first in 12% of queries as drawn against tiles of two thirds, 55% widened to them, 31% as
    drawn against whole slices.

    >>> embedded_box((100, 100, 164, 164), 512, 512, 2)
    (0, 0, 341, 341)
    """
    if grid < 2:
        return box
    x0, y0, x1, y1 = box
    tile_w, tile_h = round(2 * width / (grid + 1)), round(2 * height / (grid + 1))

    def widen(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
        if hi - lo >= size:
            return lo, hi
        start = min(max(0, int(round((lo + hi) / 2 - size / 2))), limit - size)
        return start, start + size

    (x0, x1), (y0, y1) = widen(x0, x1, tile_w, width), widen(y0, y1, tile_h, height)
    return x0, y0, x1, y1


def crop_array(
    volume: Volume, info: EncoderInfo, config: Config, indices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the encoder sees of the tiles (:func:`crop_boxes`, ``config.index.crop_grid``) of the
    stack slices ``indices``: the batch, slice by slice with a slice's tiles together, and each
    row's slice index and box. Each tile is preprocessed as a query's box is (:func:`region_array`),
    so a box drawn on a query embeds as the tile around the same anatomy does."""
    height, width = (int(n) for n in volume.pixels.shape[1:3])
    boxes = crop_boxes(height, width, config.index.crop_grid)
    if not boxes or not len(indices):
        return np.zeros((0, info.in_channels, 1, 1), np.float32), np.zeros(0, np.int32), np.zeros((0, 4), np.int32)
    per_box = [
        encoder_batch(
            volume.pixels[:, y0:y1, x0:x1], config=config.preprocess, modality=volume.modality, rgb=volume.rgb,
            spacing=volume.spacing, channels=info.in_channels, mean=info.mean, std=info.std, indices=list(indices),
        )
        for x0, y0, x1, y1 in boxes
    ]
    # (boxes, S, C, H, W) -> (S * boxes, C, H, W): the tiles of a slice together, slices in order
    batch = np.stack(per_box, axis=1).reshape(-1, *per_box[0].shape[1:])
    rows = np.repeat(np.asarray(indices, np.int32), len(boxes))
    return np.ascontiguousarray(batch, np.float32), rows, np.tile(np.asarray(boxes, np.int32), (len(indices), 1))


def embed_crops(volume: Volume, encoder: Encoder, config: Config) -> SliceSet | None:
    """The crop vectors an index keeps of ``volume`` (:func:`crop_array` over the slices
    :func:`slice_indices` chooses); None without ``crop_grid`` or for an encoder that sees no slices."""
    chosen = slice_indices(volume, encoder.info, config)
    if chosen is None or config.index.crop_grid < 2:
        return None
    batch, indices, boxes = crop_array(volume, encoder.info, config, chosen)
    return SliceSet(np.asarray(encoder.embed(batch), np.float32), indices, volume.gap_mm, boxes)


def embed_slices(volume: Volume, encoder: Encoder, config: Config, region: Region | None = None) -> SliceSet | None:
    """The slice vectors of a volume (or of a region of it), with their stack indices; None where the
    encoder sees no slices (3D encoders, tri-planar images) and no region is asked for.

    Raises
    ------
    InvalidStudyError
        As :func:`region_array`.
    """
    if region is None and not sees_slices(encoder.info, config):
        return None
    seen = study_array(volume, encoder.info, config, region, layout=False)
    _, slices = query_slices(encoder.embed(seen.images), seen.slice_indices, volume.gap_mm, cropped=is_box(region))
    return slices


def encoder_input(volume: Volume, info: EncoderInfo, config: Config) -> torch.Tensor:
    """:func:`encoder_array` as a torch tensor (sharing its memory)."""
    import torch

    return torch.from_numpy(encoder_array(volume, info, config))


def pool_slices(vectors: np.ndarray, how: str = "mean") -> np.ndarray:
    """One case vector from its slice vectors (``mean`` or ``max``), of unit length, float32."""
    pooled = vectors.max(axis=0) if how == "max" else vectors.mean(axis=0)
    return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)


def embed_volume(volume: Volume, encoder: Encoder, config: Config) -> np.ndarray:
    """One case embedding: encode the selected slices (or the volume, for a 3D encoder), then pool.

    Returns a ``(dim,)`` float32 vector of unit length. ``build_index`` gives the same vectors (it
    encodes several cases per encoder call, with the same two steps).
    """
    vectors = encoder.embed(encoder_array(volume, encoder.info, config))
    return pool_slices(vectors, config.preprocess.pool)
