"""The on-disk IVF-PQ index (medsearch.store.ondisk) at scale: build time, disk, resident memory, recall, latency.

Run through ``benchmarks/search.py --ondisk`` (or directly). For each collection size:

1. Synthetic embeddings from the Gaussian mixture of ``search.py`` (``n / 1000`` clusters, a
   decaying spectrum, L2-normalized; not uniform noise, so that recall means something), generated
   in chunks and never held whole: the build streams them, and so does the exact search.
2. ``train_s``: OPQ + IVF + PQ trained on a sample drawn from the same mixture (``train_size``).
3. ``build_s``: generating the vectors, encoding them in shards of ``--shard-vectors`` and the
   merge into one lists file, the float16 exact vectors written beside; ``disk_bytes`` of the folder.
4. The exact top 10 of each query (inner product over every chunk, computed as the chunks pass to
   the build, its time left out of ``build_s``): the reference for recall.
5. For each ``nprobe``: ``recall_at_10`` (re-ranked with the exact vectors, as medsearch searches)
   and ``recall_at_10_codes`` (the codes' own ranking), ``p50_ms``/``p99_ms`` of one query at a
   time with a warm page cache, and ``cold_p50_ms`` right after the index's files were dropped
   from the page cache (``posix_fadvise DONTNEED``: a first query after a restart).
6. ``rss_anon_mb`` / ``rss_file_mb``: the process's anonymous and file-backed resident memory
   after the queries (``/proc/self/status``); mapped pages of the lists and exact vectors are
   file-backed: the kernel drops them under pressure.

Usage::

    nice -n 10 .venv/bin/python benchmarks/search.py --ondisk --sizes 100000,1000000 --json ondisk.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from medsearch.config import IndexType, Metric
from medsearch.store import faiss_index as fx
from medsearch.store.ondisk import OnDiskIVFPQ, build_ondisk, ondisk_params

K = 10
CHUNK = 65_536


def chunks(n: int, dim: int, *, seed: int, clusters: int) -> Iterator[np.ndarray]:
    """The mixture of ``search.synthetic``, chunk by chunk (the same vectors for the same arguments)."""
    spectrum = (1.0 + np.arange(dim, dtype=np.float32)) ** -0.5
    centres = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32) * spectrum
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        block = rng.standard_normal((min(n, start + CHUNK) - start, dim), dtype=np.float32)
        block *= 0.8 * spectrum
        block += centres[rng.integers(0, clusters, len(block))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield block


class ExactTopK:
    """The exact top ``K`` ids of each query by inner product, gathered from the chunks as they pass
    on their way to the build (so that the vectors are generated once); ``seconds`` spent here."""

    def __init__(self, queries: np.ndarray) -> None:
        self.queries = queries
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)
        self.seconds = 0.0

    def watch(self, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        start = 0
        for block in blocks:
            t = time.perf_counter()
            scores, ids = faiss.knn(self.queries, block, K, metric=faiss.METRIC_INNER_PRODUCT)
            self.scores, self.ids = fx.top_k(np.hstack([self.scores, scores]), np.hstack([self.ids, ids + start]), K,
                                             Metric.COSINE)
            start += len(block)
            self.seconds += time.perf_counter() - t
            yield block


def recall(ids: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / reference.shape[1] for a, b in zip(ids, reference)]))


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields.get("VmRSS", 0.0), "rss_anon_mb": fields.get("RssAnon", 0.0),
            "rss_file_mb": fields.get("RssFile", 0.0), "peak_rss_mb": fields.get("VmHWM", 0.0)}


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def single_ms(index: OnDiskIVFPQ, queries: np.ndarray, *, nprobe: int, rerank: int | None = None) -> np.ndarray:
    out = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], K, nprobe=nprobe, rerank=rerank)
        out.append(time.perf_counter() - t)
    return np.array(out) * 1e3


def run_ondisk(n: int, dim: int, args: argparse.Namespace, emit, *, workdir: Path) -> None:
    clusters = max(16, n // 1000)
    folder = workdir / f"ondisk-{n}-{dim}"
    params = ondisk_params(n, dim)
    started = time.perf_counter()
    train = np.concatenate(list(chunks(int(params["train_size"]), dim, seed=7, clusters=clusters)))
    trained = fx.empty_index(IndexType.IVFPQ, params, dim, Metric.COSINE)
    trained.train(train)
    train_s = time.perf_counter() - started
    del train
    queries = np.concatenate(list(chunks(args.queries, dim, seed=1, clusters=clusters)))
    exact = ExactTopK(queries)
    started = time.perf_counter()
    index = build_ondisk(folder, exact.watch(chunks(n, dim, seed=0, clusters=clusters)), n=n, dim=dim, trained=trained,
                         params=params, shard_vectors=args.shard_vectors)
    build_s = time.perf_counter() - started - exact.seconds  # (the exact search rode along)
    reference, exact_s = exact.ids, exact.seconds
    del trained
    disk = sum(p.stat().st_size for p in folder.iterdir())
    del index
    drop_from_page_cache(folder)
    index = OnDiskIVFPQ.open(folder)
    cold = single_ms(index, queries[:args.cold_queries], nprobe=args.nprobe[0])
    base: dict[str, Any] = {
        "mode": "ivfpq-disk", "n": n, "dim": dim, "params": params, "train_s": round(train_s, 1),
        "build_s": round(build_s, 1), "build_per_million_s": round(build_s / n * 1e6, 1), "disk_bytes": disk,
        "disk_bytes_per_vector": round(disk / n, 1), "exact_search_s": round(exact_s, 1), "queries": len(queries),
        "cold_nprobe": args.nprobe[0], "cold_p50_ms": round(float(np.percentile(cold, 50)), 2),
        "cold_p99_ms": round(float(np.percentile(cold, 99)), 2), "threads": faiss.omp_get_max_threads(),
    }
    for nprobe in args.nprobe:
        _, coded = index.search(queries, K, nprobe=nprobe, rerank=0)
        for rerank in args.rerank or [int(params["rerank"])]:
            _, found = index.search(queries, K, nprobe=nprobe, rerank=rerank)
            single_ms(index, queries[:5], nprobe=nprobe, rerank=rerank)  # warm
            ms = single_ms(index, queries, nprobe=nprobe, rerank=rerank)
            emit({**base, "nprobe": nprobe, "rerank": rerank, "recall_at_10": round(recall(found, reference), 4),
                  "recall_at_10_codes": round(recall(coded, reference), 4), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                  "p99_ms": round(float(np.percentile(ms, 99)), 2), **memory_mb()})
    del index
    shutil.rmtree(folder, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="where the on-disk index is built (default: a temporary folder)")
    parser.add_argument("--shard-vectors", type=int, default=1_000_000, help="vectors per shard before the merge")
    parser.add_argument("--rerank", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="re-ranking depths to measure, comma-separated (k * depth candidates; default: the index's own)")
    parser.add_argument("--cold-queries", type=int, default=50, help="queries timed right after dropping the page cache")
