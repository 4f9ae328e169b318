"""Augmentations for training: MONAI transforms fit for medical images, on one ``(c, H, W)`` image.

Small rotations, zoom and shift, contrast (gamma), intensity scaling and shift, gaussian noise; no
flips unless asked for, because laterality carries meaning in medical images. ``strength`` scales
them all::

    augment = Augmentation(flips=False, strength=1.0)
    augment.set_random_state(seed=3)
    view = augment(image)        # a plain float32 tensor in [0, 1]
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Augmentation"]


class Augmentation:
    """MONAI augmentations for one ``(c, H, W)`` image in [0, 1]; ``strength`` scales them."""

    def __init__(self, flips: bool, strength: float) -> None:
        from monai.transforms import (
            Compose,
            RandAdjustContrast,
            RandAffine,
            RandFlip,
            RandGaussianNoise,
            RandScaleIntensity,
            RandShiftIntensity,
        )

        s = float(strength)
        steps: list[Any] = [
            # small rotations, zoom in and out, shifts: position and size vary between acquisitions,
            # orientation barely does
            RandAffine(
                prob=0.9,
                rotate_range=(math.radians(12) * s,),
                scale_range=(0.2 * s, 0.2 * s),
                translate_range=(0.1 * s, 0.1 * s),
                padding_mode="border",
                mode="bilinear",
            ),
            RandAdjustContrast(prob=0.5, gamma=(1 - 0.3 * s, 1 + 0.5 * s)),
            RandScaleIntensity(prob=0.5, factors=0.15 * s),
            RandShiftIntensity(prob=0.5, offsets=0.1 * s),
            RandGaussianNoise(prob=0.3, std=0.03 * s),
        ]
        if flips:
            steps.append(RandFlip(prob=0.5, spatial_axis=1))
        self._compose = Compose(steps)
        self._compose.set_random_state(seed=0)

    def set_random_state(self, seed: int) -> None:
        """Seed every random transform (a run re-seeds at each epoch)."""
        self._compose.set_random_state(seed=seed)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from monai.data import MetaTensor

        out = self._compose(image)
        # A plain tensor: a MetaTensor would route every op of the network through its
        # __torch_function__ and slow training several times over.
        plain = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
        return plain.to(torch.float32).clamp_(0.0, 1.0)
