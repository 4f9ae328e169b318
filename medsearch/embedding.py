"""What a case vector is: the one definition shared by indexing, querying, evaluation and training.

A volume goes through the configured preprocessing (:func:`encoder_array`: the selected slices, or
the resampled volume for a 3D encoder), the encoder embeds each slice, and :func:`pool_slices`
pools the slice vectors into one unit-length case vector. :func:`embed_volume` does the three steps
for one volume; the indexing engine does the same steps for many cases per encoder call.

The 2D preprocessing runs in numpy (:mod:`medsearch.transforms.arrays`, the MONAI pipeline's output
bit for bit), so that a query with the ONNX runtime imports neither MONAI nor torch;
:func:`encoder_input` gives the same batch as a torch tensor, for training and evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medsearch.config import Config
from medsearch.encoders import Encoder, EncoderInfo
from medsearch.io import Volume
from medsearch.transforms import encoder_batch

if TYPE_CHECKING:
    import torch

__all__ = ["embed_volume", "encoder_array", "encoder_input", "pool_slices"]


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
    )


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
