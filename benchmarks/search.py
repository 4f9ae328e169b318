"""Vector search at scale: build time, memory, throughput, latency and recall of each index type.

For each dimension and collection size, one run:

1. Synthetic embeddings: a Gaussian mixture (``n / 1000`` clusters, at least 16) with a decaying
   variance spectrum, like CNN features, L2-normalized; queries drawn from the same mixture.
   (Uniform noise would make every neighbour equally far and every index look bad.)
2. The exact top 10 of each query (``faiss.knn``, inner product): the reference for recall.
3. For each index type, a medsearch :class:`~medsearch.store.IndexStore` built from the vectors
   (``build_s``: ``IndexStore.add`` on an empty store, training included), then for each search
   setting (hnsw ``ef_search``, ivfpq ``nprobe``) one record:

   * ``bytes_per_vector``: memory of the faiss index (vectors, graph links, codes, ids, centroids);
     an ivfpq index also keeps the exact vectors on disk (``disk_bytes_per_vector``);
   * ``qps_batch``: queries per second, all queries in one ``IndexStore.search`` call;
   * ``p50_ms``, ``p99_ms``: latency of one query at a time through ``IndexStore.search``;
   * ``recall_at_10``: the share of the exact top 10 found in the top 10 returned;
   * ``overhead_vs_faiss``: median latency of ``IndexStore.search`` / median latency of the bare
     faiss call on the same index object with the same settings (for ivfpq the bare call fetches
     the same ``k * rerank`` candidates; the exact re-ranking is part of medsearch's side);
   * ``filtered_*``: the same with ``where="group=3"`` (10 % of the cases), against the exact
     top 10 of that subset; ``filtered_full_k`` says whether every query got 10 results.

Single-query timings interleave medsearch and bare faiss, alternating which goes first, so that the
load of a shared machine falls on both alike; each configuration gets at most ``--single-seconds``
of single queries (at least 20). faiss uses every core (``--threads`` to change).

With ``--ondisk``, the on-disk IVF-PQ index (``ivfpq-disk``) is measured instead, at sizes beyond
memory: see ``benchmarks/search_ondisk.py``.

Usage::

    nice .venv/bin/python benchmarks/search.py --sizes 100000,1000000 --dims 1280 --json search.json
    nice -n 10 .venv/bin/python benchmarks/search.py --ondisk --sizes 100000,1000000 --json ondisk.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from medsearch.config import IndexType
from medsearch.store import IndexStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_ondisk  # noqa: E402 - beside this script

K = 10


def synthetic(n: int, dim: int, *, seed: int, clusters: int, chunk: int = 65_536) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors from a Gaussian mixture with a decaying spectrum."""
    spectrum = (1.0 + np.arange(dim, dtype=np.float32)) ** -0.5
    centres = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32) * spectrum
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = out[start:stop]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= 0.8 * spectrum
        block += centres[rng.integers(0, clusters, stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def index_bytes(index: faiss.Index) -> int:
    """Memory held by a flat, HNSW or OPQ+IVF-PQ faiss index (its arrays; not allocator slack)."""
    if isinstance(index, faiss.IndexHNSW):
        hnsw = index.hnsw
        links = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        return index_bytes(faiss.downcast_index(index.storage)) + links
    if isinstance(index, faiss.IndexFlat):
        return index.ntotal * index.d * 4
    total = 0
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            total += vt.d_in * vt.d_out * 4
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    total += sum(invlists.list_size(i) for i in range(ivf.nlist)) * (invlists.code_size + 8)
    total += index_bytes(faiss.downcast_index(ivf.quantizer))
    pq = faiss.downcast_index(ivf).pq
    total += pq.M * pq.ksub * pq.dsub * 4
    return total


def recall(ids: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / reference.shape[1] for a, b in zip(ids, reference)]))


def time_single(store: IndexStore, queries: np.ndarray, seconds: float, *, where: str | None = None) -> dict[str, Any]:
    """Latency of one query at a time through medsearch and through bare faiss, interleaved."""
    index = store.index
    fetch = K * max(store._rerank_factor(), 1)  # what medsearch asks the faiss index for
    mine: list[float] = []
    bare: list[float] = []
    full = True
    for q in queries[:3]:  # warm up (first touches of graph and lists)
        store.search(q, K, where=where)
    started = time.perf_counter()
    for i, q in enumerate(queries):
        one = q[None, :]
        for turn in ((0, 1) if i % 2 else (1, 0)):
            if turn == 0:
                t = time.perf_counter()
                hits = store.search(one, K, where=where)
                mine.append(time.perf_counter() - t)
                full &= bool((hits.ids >= 0).sum() == K)
            elif where is None:
                t = time.perf_counter()
                index.search(one, fetch)
                bare.append(time.perf_counter() - t)
        if i + 1 >= 20 and time.perf_counter() - started > seconds:
            break
    ms = np.array(mine) * 1e3
    out = {"n_single": len(mine), "p50_ms": round(float(np.percentile(ms, 50)), 3),
           "p99_ms": round(float(np.percentile(ms, 99)), 3), "full_k": full}
    if bare:
        out["faiss_p50_ms"] = round(float(np.median(bare)) * 1e3, 3)
        out["overhead_vs_faiss"] = round(float(np.median(mine) / np.median(bare)), 3)
    return out


def settings_of(kind: IndexType, args: argparse.Namespace) -> list[dict[str, int]]:
    if kind is IndexType.HNSW:
        return [{"ef_search": ef} for ef in args.ef]
    if kind is IndexType.IVFPQ:
        return [{"nprobe": p} for p in args.nprobe]
    return [{}]


def run_size(n: int, dim: int, args: argparse.Namespace, emit) -> None:
    clusters = max(16, n // 1000)
    t = time.perf_counter()
    data = synthetic(n, dim, seed=1, clusters=clusters)
    queries = synthetic(args.queries, dim, seed=2, clusters=clusters)
    print(f"[n={n} dim={dim}] data in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    t = time.perf_counter()
    _, truth = faiss.knn(queries, data, K, metric=faiss.METRIC_INNER_PRODUCT)
    group = np.arange(n) % 10
    subset = np.flatnonzero(group == 3)
    _, sub_truth = faiss.knn(queries, data[subset], K, metric=faiss.METRIC_INNER_PRODUCT)
    sub_truth = subset[sub_truth]
    print(f"[n={n} dim={dim}] exact reference in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows = pd.DataFrame({"case_id": np.char.add("c", np.arange(n).astype(str)).astype(object), "group": group})
    for kind in args.types:
        gc.collect()
        with tempfile.TemporaryDirectory() as tmp:
            store = IndexStore.create(Path(tmp) / "ix", dim=dim, encoder={}, preprocess={}, index_type=kind)
            t = time.perf_counter()
            store.add(data, rows)
            build_s = time.perf_counter() - t
            if store.index_type is not kind:
                print(f"[n={n}] {kind.value} fell back to {store.index_type.value}: {store.manifest.index.note}",
                      file=sys.stderr, flush=True)
            params = dict(store.manifest.index.params)
            memory = index_bytes(store.index) / n
            print(f"[n={n} dim={dim}] {kind.value} built in {build_s:.1f} s {params}", file=sys.stderr, flush=True)
            for setting in settings_of(kind, args):
                store.configure(**setting)
                nq = min(args.queries, args.batch_queries if kind is IndexType.FLAT else args.queries)
                t = time.perf_counter()
                hits = store.search(queries[:nq], K)
                qps = nq / (time.perf_counter() - t)
                single = time_single(store, queries, args.single_seconds)
                filtered_hits = store.search(queries, K, where="group=3")
                filtered = time_single(store, queries, args.single_seconds / 4, where="group=3")
                record = {
                    "index_type": kind.value, "n": n, "dim": dim, "build_s": round(build_s, 2),
                    "bytes_per_vector": round(memory, 1), "qps_batch": round(qps, 1),
                    "p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"],
                    "recall_at_10": round(recall(hits.ids, truth[:nq]), 4),
                    "overhead_vs_faiss": single.get("overhead_vs_faiss"),
                    "faiss_p50_ms": single.get("faiss_p50_ms"),
                    **setting, "params": params,
                    "disk_bytes_per_vector": 4 * dim if kind is IndexType.IVFPQ else 0,
                    "n_queries": args.queries, "n_batch": nq, "n_single": single["n_single"],
                    "filtered_fraction": 0.1, "filtered_recall_at_10": round(recall(filtered_hits.ids, sub_truth), 4),
                    "filtered_p50_ms": filtered["p50_ms"], "filtered_p99_ms": filtered["p99_ms"],
                    "filtered_full_k": filtered["full_k"] and bool((filtered_hits.ids >= 0).all()),
                    "threads": faiss.omp_get_max_threads(), "nproc": os.cpu_count(),
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
                emit(record)
            del store, hits, filtered_hits
    del data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="collection sizes, comma-separated")
    parser.add_argument("--dims", default="1280", help="vector dimensions, comma-separated (e.g. 512,1024,1280)")
    parser.add_argument("--types", default="flat,hnsw,ivfpq", help="index types, comma-separated")
    parser.add_argument("--ef", default="64,128,256", help="hnsw ef_search values")
    parser.add_argument("--nprobe", default="16,32,64", help="ivfpq nprobe values")
    parser.add_argument("--queries", type=int, default=500, help="queries (batch, recall and single timings)")
    parser.add_argument("--batch-queries", type=int, default=100, help="batch size for flat (an exact scan per query)")
    parser.add_argument("--single-seconds", type=float, default=20.0, help="time spent on single queries per configuration")
    parser.add_argument("--threads", type=int, default=None, help="faiss threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the records here (rewritten after each one)")
    parser.add_argument("--ondisk", action="store_true",
                        help="measure the on-disk IVF-PQ index instead (benchmarks/search_ondisk.py: vectors in chunks)")
    search_ondisk.add_arguments(parser)
    args = parser.parse_args(argv)
    args.ef = [int(v) for v in args.ef.split(",")]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    args.types = [IndexType(t.strip()) for t in args.types.split(",")]
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    records: list[dict[str, Any]] = []
    print(f"# {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", file=sys.stderr, flush=True)

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            args.json.write_text(json.dumps(records, indent=1) + "\n")

    for dim in (int(d) for d in args.dims.split(",")):
        for n in (int(s) for s in args.sizes.split(",")):
            if args.ondisk:
                with tempfile.TemporaryDirectory(dir=args.workdir) as work:
                    search_ondisk.run_ondisk(n, dim, args, emit, workdir=Path(work))
            else:
                run_size(n, dim, args, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
