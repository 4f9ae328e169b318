"""A decoded volume as an encoder batch: :func:`encoder_batch` (numpy) and :func:`preprocess_volume` (torch).

A 2D encoder sees the selected slices (:func:`~medsearch.transforms.select_slices`), each through
:func:`~medsearch.transforms.slice_input` (the MONAI slice pipeline's output, computed in numpy); a
3D encoder sees the resampled volume, through the MONAI volume pipeline (which imports MONAI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from medsearch.config import PreprocessConfig, SliceMode
from medsearch.transforms.arrays import chosen_slices, select_slices, slice_input

if TYPE_CHECKING:
    import torch

__all__ = ["encoder_batch", "preprocess_volume"]

_F32 = np.float32


def encoder_batch(
    pixels: np.ndarray,
    *,
    config: PreprocessConfig,
    modality: str,
    rgb: bool,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    spatial_dims: int = 2,
    channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    volume_shape: Sequence[int] = (64, 128, 128),
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """A decoded volume as an encoder batch, float32: what :func:`~medsearch.transforms.preprocess_volume` gives.

    ``(S, channels, size, size)`` for a 2D encoder (``S`` selected slices, each through
    :func:`slice_input`), ``(1, 1, *volume_shape)`` for a 3D encoder (the MONAI volume pipeline,
    which imports MONAI). Axial slices: ``indices`` where given, else :func:`chosen_slices` with
    ``spacing[0]`` as the slice gap.
    """
    if spatial_dims == 3:
        from medsearch.transforms.pipeline import build_volume_transform  # MONAI: imported for 3D encoders only

        gray = pixels.mean(axis=-1) if rgb else pixels
        transform = build_volume_transform(config, modality=modality, shape=volume_shape, mean=float(mean[0]), std=float(std[0]))
        return np.asarray(transform(gray.astype(_F32, copy=False)).unsqueeze(0).numpy())
    if indices is None and config.slice_mode is SliceMode.AXIAL:
        indices = chosen_slices(pixels.shape[0], config, gap_mm=float(spacing[0]))
    slices = select_slices(pixels, spacing=spacing, mode=config.slice_mode, count=config.slices, indices=indices)
    return np.stack([slice_input(s, config, modality=modality, rgb=rgb, channels=channels, mean=mean, std=std) for s in slices])


def preprocess_volume(
    pixels: np.ndarray,
    *,
    config: PreprocessConfig,
    modality: str,
    rgb: bool,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    spatial_dims: int = 2,
    channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    volume_shape: Sequence[int] = (64, 128, 128),
) -> torch.Tensor:
    """Turn a decoded volume into a batch for an encoder, as a torch tensor.

    Returns ``(S, channels, size, size)`` for a 2D encoder (``S`` selected slices, see
    :func:`~medsearch.transforms.select_slices`; each slice as :func:`build_slice_transform` makes
    it) or ``(1, 1, *volume_shape)`` for a 3D encoder (:func:`build_volume_transform`). The numpy
    form, without torch, is :func:`~medsearch.transforms.encoder_batch`.
    """
    import torch

    return torch.from_numpy(
        encoder_batch(
            pixels, config=config, modality=modality, rgb=rgb, spacing=spacing, spatial_dims=spatial_dims,
            channels=channels, mean=mean, std=std, volume_shape=volume_shape,
        )
    )
