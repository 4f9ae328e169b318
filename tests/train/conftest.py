"""Fixtures of the training tests: a tiny npz of squares and rings, with train, val and test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train.tiny import _shapes


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
