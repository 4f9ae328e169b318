"""Fixtures of the training tests: tiny npz files (train, val and test splits) of synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train.tiny import _shapes, _stripes


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "shapes.npz"
    train_x, train_y = _shapes(24, rng)
    val_x, val_y = _shapes(12, rng)
    test_x, test_y = _shapes(6, rng)
    np.savez(path, train_images=train_x, train_labels=train_y, val_images=val_x, val_labels=val_y,
             test_images=test_x, test_labels=test_y)
    return path


def _save(path: Path, make, sizes=(40, 20, 12), *, shuffle: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        images, labels = make(n, rng)
        if shuffle and split != "test":
            labels = rng.permutation(labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def stripes_npz(tmp_path_factory) -> Path:
    """Faint stripes (the label) under bright random shapes: an adapter beats the frozen encoder."""
    return _save(tmp_path_factory.mktemp("npz") / "stripes.npz", _stripes)


@pytest.fixture(scope="module")
def shuffled_npz(tmp_path_factory) -> Path:
    """The stripes with their train and val labels shuffled: nothing to learn."""
    return _save(tmp_path_factory.mktemp("npz") / "shuffled.npz", _stripes, sizes=(60, 30, 12), shuffle=True)
