"""Small stores shared by the store tests: 16-d random vectors and a case table of CT cases."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medsearch.store import IndexStore

ENCODER = {"name": "test-encoder", "dim": 16, "weights_sha256": "ab" * 32}
PREPROCESS = {"size": 224, "slices": 5}


def _vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _rows(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"case_id": [f"c-{i:04d}" for i in range(start, start + n)], "modality": ["CT"] * n})


def _store(path, metric="cosine", n=50) -> IndexStore:
    store = IndexStore.create(path, dim=16, metric=metric, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(n), _rows(n))
    return store
