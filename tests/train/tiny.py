"""A tiny synthetic set and settings that train on it in seconds, shared by the training tests."""

from __future__ import annotations

import numpy as np

# Small and quick: 32 px input, 8 images a step, 3 steps an epoch.
FAST = {"size": 32, "batch_size": 8, "steps_per_epoch": 3, "lr": 1e-3, "progress": False}


def _shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """28-px gray images: bright squares (label 0) and bright rings (label 1), with noise."""
    yy, xx = np.mgrid[:28, :28]
    images, labels = [], []
    for i in range(n):
        cy, cx = rng.integers(10, 18, size=2)
        r = rng.integers(5, 8)
        if i % 2 == 0:
            img = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        else:
            d = np.hypot(yy - cy, xx - cx)
            img = (d < r) & (d > r - 2.5)
        noisy = img * 200 + rng.normal(30, 12, size=img.shape)
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        labels.append(i % 2)
    return np.stack(images), np.asarray(labels)
