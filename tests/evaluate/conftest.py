"""Fixtures of the evaluate tests: small MedMNIST-format files, random embeddings and a brute-force
reference to check scores against, the real MedMNIST files, and a labeled index of the sample archive."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE

from medsearch.config import Config
from medsearch.deid import SiteKey
from medsearch.indexing import build_index

# The exact encoder input does not matter for these tests: small images keep them quick.
SMALL = Config().replace(preprocess={"size": 32})


@pytest.fixture(scope="module")
def labeled_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-index")
    key = SiteKey.load(root / "k", create=True)
    build_index(SAMPLE / "tcga-luad-ct", root / "index", config=SMALL, labels=SAMPLE / "labels.csv", key=key)
    return root / "index", key


def _random_set(seed, n_gallery=60, n_queries=25, dim=8, n_labels=3):
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(n_gallery, dim)).astype(np.float32)
    queries = rng.normal(size=(n_queries, dim)).astype(np.float32)
    g_labels = rng.integers(0, n_labels, n_gallery)
    q_labels = rng.integers(0, n_labels, n_queries)
    return gallery, g_labels, queries, q_labels


def _cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float64) @ b.astype(np.float64).T


def _brute_force(gallery, g_labels, queries, q_labels, rows, g_groups, q_groups, k):
    """Per-query recall@k, map@k, MAP@R and reciprocal rank by sorting the full similarity matrix."""
    sims = _cosine(queries, gallery)
    out = {"recall": [], "map": [], "map@r": [], "rr": []}
    for i, q in enumerate(q_labels):
        keep = np.ones(len(gallery), bool)
        if rows[i] >= 0:
            keep[rows[i]] = False
        if q_groups is not None and q_groups[i]:
            keep &= g_groups != q_groups[i]
        order = [j for j in np.argsort(-sims[i], kind="stable") if keep[j]]
        rel = np.array([g_labels[j] == q for j in order], dtype=float)
        n_rel = rel.sum()
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        r = int(n_rel)
        out["recall"].append(rel[:k].sum() / n_rel if n_rel else 0.0)
        out["map"].append((precision[:k] * rel[:k]).sum() / min(k, n_rel) if n_rel else 0.0)
        out["map@r"].append((precision[:r] * rel[:r]).sum() / r if r else 0.0)
        out["rr"].append(1.0 / (rel.argmax() + 1) if n_rel else 0.0)
    return out


def _npz(path, shape, n_train=12, n_test=4, seed=0, label_shape=(-1,)):
    """Random images with test = copies of the first train images (each query has its twin)."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 255, (n_train, *shape), dtype=np.uint8)
    labels = np.arange(n_train) % 3
    np.savez(
        path,
        train_images=train,
        train_labels=labels.reshape(label_shape),
        val_images=train[:6],
        val_labels=labels[:6].reshape(label_shape),
        test_images=train[:n_test].copy(),
        test_labels=labels[:n_test].reshape(label_shape),
    )
    return path


@pytest.fixture()
def random_set():
    """:func:`_random_set`: a random gallery and query set with labels."""
    return _random_set


@pytest.fixture()
def cosine():
    """:func:`_cosine`: the full cosine similarity matrix, in float64."""
    return _cosine


@pytest.fixture()
def brute_force():
    """:func:`_brute_force`: reference per-query scores from the full similarity matrix."""
    return _brute_force


@pytest.fixture()
def make_npz():
    """:func:`_npz`: write a small MedMNIST-format file."""
    return _npz
