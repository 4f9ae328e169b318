"""Preprocessing: from decoded pixels to what an encoder sees, defined with MONAI.

    pipeline.py   the MONAI transforms: build_slice_transform (one 2D image), build_volume_transform
                  (3D encoders), make_thumbnail, and the faster forms of two MONAI transforms
                  (PercentileScale, AntiAliasedResize)
    arrays.py     the same 2D pipeline in numpy, bit for bit (slice_input), and the slice selection
                  (select_slices, axial_indices): what a query runs, so that it imports neither
                  MONAI nor torch
    batch.py      a volume as an encoder batch: encoder_batch (numpy), preprocess_volume (torch)

Two steps, kept apart so each is easy to test: :func:`select_slices` picks the 2D images a 2D
encoder sees from a volume (evenly spaced axial slices, or the three central planes) and resamples
them to square pixels; :func:`build_slice_transform` (or :func:`slice_input`) turns one into the
encoder's input: intensity windowing per modality, aspect-keeping resize and pad, channel handling,
and the normalization the encoder was trained with. This layer takes numpy arrays and plain numbers;
it knows nothing of DICOM headers or of encoders.

The names of ``pipeline`` are loaded on first use (they import MONAI and torch), those of
``arrays`` at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medsearch.transforms.arrays import (
    axial_indices,
    chosen_slices,
    middle_picture,
    picture_box,
    scale_intensity,
    select_slices,
    slice_input,
    spaced_indices,
)
from medsearch.transforms.batch import encoder_batch, preprocess_volume

if TYPE_CHECKING:  # for type checkers only: at run time, __getattr__ (below) loads them on first use
    from medsearch.transforms.pipeline import AntiAliasedResize as AntiAliasedResize
    from medsearch.transforms.pipeline import ChannelAffine as ChannelAffine
    from medsearch.transforms.pipeline import PercentileScale as PercentileScale
    from medsearch.transforms.pipeline import build_slice_transform as build_slice_transform
    from medsearch.transforms.pipeline import build_volume_transform as build_volume_transform
    from medsearch.transforms.pipeline import intensity_transform as intensity_transform
    from medsearch.transforms.pipeline import make_thumbnail as make_thumbnail

__all__ = [
    "AntiAliasedResize",
    "ChannelAffine",
    "PercentileScale",
    "axial_indices",
    "build_slice_transform",
    "chosen_slices",
    "build_volume_transform",
    "encoder_batch",
    "intensity_transform",
    "make_thumbnail",
    "middle_picture",
    "picture_box",
    "preprocess_volume",
    "scale_intensity",
    "select_slices",
    "slice_input",
    "spaced_indices",
]

_PIPELINE = frozenset(
    {"AntiAliasedResize", "ChannelAffine", "PercentileScale", "build_slice_transform", "build_volume_transform",
     "intensity_transform", "make_thumbnail"}
)


def __getattr__(name: str) -> Any:
    """The MONAI transforms of :mod:`medsearch.transforms.pipeline`, imported only when asked for."""
    if name in _PIPELINE:
        from medsearch.transforms import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
