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


def _stripes(n: int, rng: np.random.Generator, amplitude: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """28-px gray images whose label is a faint texture under a bright shape that varies at random.

    A bright square, ring or cross (at a random place and size) dominates each image; the label is
    a faint stripe pattern, vertical (0) or horizontal (1). The frozen encoder's neighbours follow
    the shapes more than the stripes; a projection trained on the labels finds the stripes.
    """
    yy, xx = np.mgrid[:28, :28]
    images, labels = [], []
    for i in range(n):
        cy, cx = rng.integers(9, 19, size=2)
        r = rng.integers(4, 10)
        shape = rng.integers(0, 3)
        if shape == 0:
            img = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        elif shape == 1:
            d = np.hypot(yy - cy, xx - cx)
            img = (d < r) & (d > r - 2.5)
        else:
            img = (np.abs(yy - cy) < 2) | (np.abs(xx - cx) < 2)
        label = i % 2
        stripes = (yy // 2) % 2 if label else (xx // 2) % 2
        noisy = img * 200.0 + amplitude * stripes + rng.normal(0, 8, size=img.shape)
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        labels.append(label)
    return np.stack(images), np.asarray(labels)
