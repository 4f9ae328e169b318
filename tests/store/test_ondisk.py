"""The on-disk IVF-PQ index (medsearch/store/ondisk.py): the same top-k as the in-memory index built from
the same vectors and quantizers, recall against exact search with re-ranking, memory-mapped files, a
folder that is never half-written, and the store's ``ivfpq-disk`` type built on it."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws

from medsearch._files import sha256_file
from medsearch.config import IndexType, Metric
from medsearch.errors import IndexCorruptError
from medsearch.store import IndexStore, SearchHits, read_manifest
from medsearch.store import faiss_index as fx
from medsearch.store.ondisk import ONDISK_META, OnDiskIVFPQ, build_ondisk, ondisk_params

pytestmark = pytest.mark.slow

DIM, N, K = 32, 6_000, 10
PARAMS = {"nlist": 32, "m": 8, "nbits": 8, "opq_dim": 32, "train_size": 3_000, "rerank": 8}
METRICS = [Metric.COSINE, Metric.L2]


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    """Vectors around 40 centres (a Gaussian mixture), like embeddings of a few kinds of images."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM)).astype(np.float32)
    return (centres[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


def _chunks(x: np.ndarray, size: int = 1_700):
    return (x[start:start + size] for start in range(0, len(x), size))


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered(N)


@functools.cache
def _trained(metric: Metric) -> faiss.Index:
    """One trained empty index per metric for the module (OPQ training is the slow part)."""
    index = fx.empty_index(IndexType.IVFPQ, PARAMS, DIM, metric)
    index.train(fx.normalized(_clustered(N)[:PARAMS["train_size"]], metric))
    return index


@pytest.mark.parametrize("metric", METRICS)
def test_same_top_k_as_the_in_memory_index(vectors, metric, tmp_path):
    trained = _trained(metric)
    # several shards, chunks that straddle them: the merged lists hold every vector once, under its row
    ondisk = build_ondisk(tmp_path / "od", _chunks(vectors), n=N, dim=DIM, metric=metric, trained=trained,
                          params=PARAMS, shard_vectors=2_500)
    memory = faiss.clone_index(trained)
    memory.add(fx.normalized(vectors, metric))
    faiss.extract_index_ivf(memory).nprobe = 8
    queries = fx.normalized(_clustered(50, seed=1), metric)
    want_scores, want_ids = memory.search(queries, K)
    got_scores, got_ids = ondisk.search(queries, K, nprobe=8, rerank=0)
    check_ref_knn_with_draws(want_scores, want_ids, got_scores, got_ids)
    # one query at a time (its lists scanned on every core) finds what the batch found
    for i in range(0, len(queries), 7):
        one_scores, one_ids = ondisk.search(queries[i : i + 1], K, nprobe=8, rerank=0)
        check_ref_knn_with_draws(got_scores[i : i + 1], got_ids[i : i + 1], one_scores, one_ids)


@pytest.mark.parametrize("metric", METRICS)
def test_recall_against_exact_search_with_reranking(vectors, metric, tmp_path):
    ondisk = build_ondisk(tmp_path / "od", _chunks(vectors), n=N, dim=DIM, metric=metric, trained=_trained(metric),
                          params=PARAMS)
    queries = fx.normalized(_clustered(100, seed=2), metric)
    stored = fx.normalized(vectors, metric)
    exact = faiss.IndexFlatIP(DIM) if metric is Metric.COSINE else faiss.IndexFlatL2(DIM)
    exact.add(stored)
    _, truth = exact.search(queries, K)
    _, found = ondisk.search(queries, K, nprobe=8)
    recall = np.mean([len(set(t) & set(f)) / K for t, f in zip(truth, found)])
    assert recall >= 0.95, recall
    _, coded = ondisk.search(queries, K, nprobe=8, rerank=0)
    assert recall >= np.mean([len(set(t) & set(f)) / K for t, f in zip(truth, coded)])


def test_files_are_memory_mapped_and_found_after_a_move(vectors, tmp_path):
    built = build_ondisk(tmp_path / "od", _chunks(vectors), n=N, dim=DIM, trained=_trained(Metric.COSINE), params=PARAMS)
    queries = fx.normalized(vectors[:20], Metric.COSINE)
    before = built.search(queries, K)
    del built
    (tmp_path / "od").rename(tmp_path / "moved")
    opened = OnDiskIVFPQ.open(tmp_path / "moved")
    assert isinstance(opened.exact, np.memmap) and opened.exact.dtype == np.float16
    lists = faiss.extract_index_ivf(opened.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert len(opened) == N
    after = opened.search(queries, K)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])


def test_a_rebuild_replaces_the_folder_whole(vectors, tmp_path):
    path = tmp_path / "od"
    trained = _trained(Metric.COSINE)
    build_ondisk(path, _chunks(vectors[:3_000]), n=3_000, dim=DIM, trained=trained, params=PARAMS)
    with pytest.raises(ValueError, match="held 3000 vectors where n = 4000"):
        build_ondisk(path, _chunks(vectors[:3_000]), n=4_000, dim=DIM, trained=trained, params=PARAMS)
    assert len(OnDiskIVFPQ.open(path)) == 3_000  # the failed build left the old folder as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["od"]  # and no temporary folder
    build_ondisk(path, _chunks(vectors), n=N, dim=DIM, trained=trained, params=PARAMS)
    assert len(OnDiskIVFPQ.open(path)) == N
    assert sorted(p.name for p in tmp_path.iterdir()) == ["od"]


def test_a_damaged_folder_is_refused(vectors, tmp_path):
    path = tmp_path / "od"
    build_ondisk(path, _chunks(vectors), n=N, dim=DIM, trained=_trained(Metric.COSINE), params=PARAMS)
    meta = (path / ONDISK_META).read_text()
    (path / ONDISK_META).write_text(meta.replace(f'"n": {N}', '"n": 5'))
    with pytest.raises(IndexCorruptError, match="build it again"):
        OnDiskIVFPQ.open(path)
    (path / "exact.npy").unlink()
    with pytest.raises(IndexCorruptError, match="not a complete on-disk index"):
        OnDiskIVFPQ.open(path)


def test_training_on_a_sample(tmp_path):
    x = _clustered(1_000)
    small = {**PARAMS, "nlist": 4, "m": 4, "opq_dim": 16, "train_size": 1_000}
    ondisk = build_ondisk(tmp_path / "od", [x], n=len(x), dim=DIM, train=x, params=small)
    assert ondisk.params == small and len(ondisk) == len(x)
    with pytest.raises(ValueError, match="give train"):
        build_ondisk(tmp_path / "other", [x], n=len(x), dim=DIM, params=small)


def test_default_parameters_follow_the_ivfpq_rule():
    params = ondisk_params(10_000_000, 1280)
    assert params["nlist"] == 4096 and params["m"] == 64 and params["opq_dim"] == 512
    assert params["rerank"] == fx.DISK_RERANK == 32


# -- the store's ivfpq-disk type --------------------------------------------------------------------

STORE_N = 12_000  # enough to train (IVFPQ_MIN_VECTORS)


def _rows(start: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"case_id": [f"c-{i:05d}" for i in range(start, start + n)], "modality": ["CT"] * n})


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory) -> tuple[Path, np.ndarray, SearchHits]:
    """An ivfpq-disk store, committed; the hits of its queries before the commit (codes in memory)."""
    path = tmp_path_factory.mktemp("disk") / "index"
    store = IndexStore.create(path, dim=DIM, encoder={}, preprocess={}, index_type="ivfpq-disk", nprobe=8)
    store.add(_clustered(STORE_N, seed=3), _rows(0, STORE_N))
    queries = _clustered(30, seed=4)
    before = store.search(queries, K)
    store.commit()
    return path, queries, before


def test_a_store_keeps_an_ivfpq_disk_index_in_memory_mapped_files(disk_store):
    path, queries, before = disk_store
    manifest = read_manifest(path)
    assert manifest.index.requested is IndexType.IVFPQ_DISK and manifest.index.kind is IndexType.IVFPQ
    assert {"vectors", "lists", "raw"} <= set(manifest.files)
    opened = IndexStore.open(path, verify=True)
    lists = faiss.extract_index_ivf(opened.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert np.load(path / manifest.files["raw"].name, mmap_mode="r").dtype == np.float16
    after = opened.search(queries, K)
    # the same candidates from the same codes; re-ranked with float16 exact vectors instead of float32
    overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(before.ids, after.ids)])
    assert overlap >= 0.95, overlap
    assert np.allclose(before.distances, after.distances, atol=2e-3)


def test_adding_to_an_ivfpq_disk_store_leaves_the_committed_files_alone(disk_store, tmp_path):
    path, queries, _ = disk_store
    copy = tmp_path / "index"
    shutil.copytree(path, copy)
    committed = read_manifest(copy).files["lists"]
    store = IndexStore.open(copy)
    new = _clustered(200, seed=5)
    store.add(new, _rows(STORE_N, 200))
    assert sha256_file(copy / committed.name) == committed.sha256  # the lists were copied into memory first
    store.commit()
    reopened = IndexStore.open(copy, verify=True)
    assert len(reopened) == STORE_N + 200
    hits = reopened.search(new[:5], 1)
    assert hits.ids[:, 0].tolist() == list(range(STORE_N, STORE_N + 5))  # each new vector finds itself
    assert np.allclose(reopened.vectors()[STORE_N:], fx.normalized(new, Metric.COSINE), atol=2e-3)


def test_auto_keeps_ivfpq_on_disk_beyond_the_memory_budget():
    assert fx.choose_index_type(10**6, 1280, memory_budget_mb=100) is IndexType.IVFPQ  # 72 B a vector: 69 MB
    assert fx.choose_index_type(10**6, 1280, memory_budget_mb=50) is IndexType.IVFPQ_DISK
    kind, params, _ = fx.plan(IndexType.IVFPQ_DISK, 10**6, 1280, memory_budget_mb=50)
    assert kind is IndexType.IVFPQ and params["m"] == fx.DISK_PQ_BYTES  # codes not shrunk to the budget
