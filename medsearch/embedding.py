"""What a case vector is: the one definition shared by indexing, querying, evaluation and training.

A volume goes through the configured preprocessing (:func:`encoder_input`: the selected slices, or the
resampled volume for a 3D encoder), the encoder embeds each slice, and :func:`pool_slices` pools the
slice vectors into one unit-length case vector. :func:`embed_volume` does the three steps for one
volume; the indexing engine does the same steps for many cases per encoder call.
"""

from __future__ import annotations

import numpy as np
import torch

from medsearch.config import Config
from medsearch.encoders import Encoder, EncoderInfo
from medsearch.io import Volume
from medsearch.transforms import preprocess_volume

__all__ = ["embed_volume", "encoder_input", "pool_slices"]


def encoder_input(volume: Volume, info: EncoderInfo, config: Config) -> torch.Tensor:
    """The batch an encoder sees for one volume: ``(S, C, H, W)`` selected slices, or ``(1, 1, D, H, W)``."""
    return preprocess_volume(
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


def pool_slices(vectors: np.ndarray, how: str = "mean") -> np.ndarray:
    """One case vector from its slice vectors (``mean`` or ``max``), of unit length, float32."""
    pooled = vectors.max(axis=0) if how == "max" else vectors.mean(axis=0)
    return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)


def embed_volume(volume: Volume, encoder: Encoder, config: Config) -> np.ndarray:
    """One case embedding: encode the selected slices (or the volume, for a 3D encoder), then pool.

    Returns a ``(dim,)`` float32 vector of unit length. ``build_index`` gives the same vectors (it
    encodes several cases per encoder call, with the same two steps).
    """
    vectors = encoder.embed(encoder_input(volume, encoder.info, config))
    return pool_slices(vectors, config.preprocess.pool)
