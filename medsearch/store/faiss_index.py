"""The faiss side of the store: which index type, how to build it, how to search it.

Index types: ``flat`` searches exactly; ``hnsw`` (HNSW32 over the exact vectors) and ``ivfpq`` (an
OPQ rotation, inverted lists and product-quantized codes, trained on a sample) search approximately.
``auto`` picks one from the collection size and a memory budget (:func:`choose_index_type`);
:func:`plan` adds the fallback of an ivfpq index with too few vectors to train on, and
:func:`rebuild_due` says when an index must be converted or trained again.

Scores follow faiss's convention here: inner products of normalized vectors (cosine, higher is
closer) or squared Euclidean distances (l2, lower is closer); :class:`~medsearch.store.IndexStore`
turns them into distances. :func:`search_filtered` searches the cases a metadata filter keeps
through a faiss ID selector, widening the approximate search, or comparing with each case exactly
when few match; :func:`rerank` rescores an ivfpq index's candidates with the exact vectors.

Nothing here reads or writes files; every function takes float32 arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import faiss
import numpy as np

from medsearch.config import IndexConfig, IndexType, Metric

__all__ = [
    "DISK_PQ_BYTES",
    "DISK_RERANK",
    "FAISS_METRIC",
    "FLAT_MAX_MB",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "IVFPQ_MIN_VECTORS",
    "IVFPQ_RERANK",
    "RETRAIN_GROWTH",
    "apply_search_params",
    "build_params",
    "choose_index_type",
    "empty_index",
    "exact_search",
    "flat_storage",
    "index_bytes_per_vector",
    "kind_of",
    "new_flat",
    "normalized",
    "opq_dim",
    "plan",
    "rebuild_due",
    "rerank",
    "search_filtered",
    "single_query_on_all_cores",
    "top_k",
]

#: ``auto`` searches exactly while the vectors take at most this much memory: a flat query reads
#: every vector once, tens of milliseconds for this many MB (README, "Choosing an index type").
FLAT_MAX_MB = 64
#: HNSW links per node, and the candidates kept while inserting.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: ivfpq trains 256 centroids per sub-quantizer (faiss asks for 39 points per centroid) and
#: its coarse lists; below this many vectors it stays flat.
IVFPQ_MIN_VECTORS = 10_000
#: an ivfpq index trained for n vectors is trained again when it holds this many times n.
RETRAIN_GROWTH = 4
#: exact scores of the top k * IVFPQ_RERANK candidates of an ivfpq search (0: codes' scores).
IVFPQ_RERANK = 8
#: code bytes of an ivfpq-disk index (its codes are on disk: the memory budget does not bound them)
DISK_PQ_BYTES = 64
#: IVFPQ_RERANK of an ivfpq-disk index: at 10^7 vectors and nprobe 64, re-scoring the top 320
#: instead of 80 took recall@10 from 0.927 to 0.960 for 1.3 ms more a query (docs/scale.md)
DISK_RERANK = 32
FAISS_METRIC = {Metric.COSINE: faiss.METRIC_INNER_PRODUCT, Metric.L2: faiss.METRIC_L2}
# faiss's 39+ training points per list up to 6,553 lists (n near 4 x 10^7); 1.3 GB of float32 at
# 1280-d. At 10^7 (4,096 lists) 163,840 points instead of 65,536 moved recall@10 at nprobe 64 from
# 0.941 to 0.947 (docs/scale.md): the sample was not what limits recall there.
_IVFPQ_MAX_TRAIN = 262_144
_OPQ_ROUNDS = 10
_OPQ_MAX_TRAIN = 16_384
_EXACT_FILTER_MAX = 4096  # a filter matching at most this many cases is searched exactly
_MAX_WIDEN = 64  # a filtered approximate search widens ef_search / nprobe up to this factor
_DEFAULTS = IndexConfig()

#: the exact (normalized) vectors of the given case-table rows, ``(len(rows), dim)`` float32
ExactRows = Callable[[np.ndarray], np.ndarray]


# -- choosing and building ------------------------------------------------------------------------


def choose_index_type(n: int, dim: int, *, memory_budget_mb: float = _DEFAULTS.memory_budget_mb) -> IndexType:
    """The index type ``auto`` picks for ``n`` vectors of dimension ``dim``.

    1. ``flat`` (exact) while the vectors take at most :data:`FLAT_MAX_MB` (13,100 1280-d vectors):
       a query then reads at most that much, tens of milliseconds.
    2. ``hnsw`` while the HNSW index fits the memory budget (4 * dim + ~270 bytes per vector).
    3. ``ivfpq`` beyond: product-quantized codes as large as the budget allows (8 to 128 bytes
       per vector), with the exact vectors on disk for re-ranking.
    4. ``ivfpq-disk`` when even :data:`DISK_PQ_BYTES`-byte codes exceed the budget: the same index
       with its lists on disk, memory-mapped (:mod:`medsearch.store.ondisk`).

    The rule follows autofaiss (exact for few vectors, a graph while memory allows, compressed
    codes beyond); the thresholds were measured with ``benchmarks/search.py``.
    """
    budget = memory_budget_mb * 2**20
    if n * index_bytes_per_vector(IndexType.FLAT, dim) <= min(FLAT_MAX_MB * 2**20, budget):
        return IndexType.FLAT
    if n * index_bytes_per_vector(IndexType.HNSW, dim) <= budget:
        return IndexType.HNSW
    # too few vectors to train codes on: flat is the smallest index that works
    if n < IVFPQ_MIN_VECTORS:
        return IndexType.FLAT
    return IndexType.IVFPQ if n * index_bytes_per_vector(IndexType.IVFPQ, dim, pq_bytes=DISK_PQ_BYTES) <= budget else IndexType.IVFPQ_DISK


def index_bytes_per_vector(kind: IndexType | str, dim: int, *, pq_bytes: int = 64) -> float:
    """Memory a vector takes in a faiss index of ``kind`` (an estimate; lists and graphs vary).

    flat: the float32 vector. hnsw: the vector and its links (2 * M ids on level 0, a few more
    above). ivfpq: the code and its 8-byte id in an inverted list (the exact vector is on disk).
    """
    kind = IndexType(kind)
    if kind is IndexType.FLAT:
        return 4.0 * dim
    if kind is IndexType.HNSW:
        return 4.0 * dim + 4 * 2 * HNSW_M * 1.05 + 12
    return float(pq_bytes + 8)


def plan(requested: IndexType, n: int, dim: int, *, memory_budget_mb: int) -> tuple[IndexType, dict[str, Any], str]:
    """The index type and build parameters for ``n`` vectors, and a note when it falls back to flat.

    ``ivfpq-disk`` plans an ``ivfpq`` index (its form in memory while it is built) with
    :data:`DISK_PQ_BYTES`-byte codes whatever the budget; a commit writes its lists to disk.
    """
    kind = choose_index_type(n, dim, memory_budget_mb=memory_budget_mb) if requested is IndexType.AUTO else requested
    on_disk = kind is IndexType.IVFPQ_DISK
    if on_disk:
        kind, memory_budget_mb = IndexType.IVFPQ, max(memory_budget_mb, math.ceil(n * (DISK_PQ_BYTES + 8) / 2**20))
    note = ""
    if kind is IndexType.IVFPQ and n < IVFPQ_MIN_VECTORS:
        note = (
            f"ivfpq needs at least {IVFPQ_MIN_VECTORS} vectors to train and the index holds {n}; "
            "it searches exactly (flat) until then and converts when it grows"
        )
        kind = IndexType.FLAT
    return kind, build_params(kind, n, dim, memory_budget_mb, on_disk=on_disk), note


def rebuild_due(planned: IndexType, current: IndexType, n: int, *, built_for: int) -> bool:
    """Whether an index of type ``current`` built for ``built_for`` vectors must be rebuilt as ``planned`` for ``n``."""
    if planned is not current:
        return True
    if planned is IndexType.IVFPQ:
        # coarse centroids trained for far fewer vectors make lists long and slow: train again
        return n >= RETRAIN_GROWTH * max(built_for, 1)
    return False


def build_params(kind: IndexType, n: int, dim: int, memory_budget_mb: float, *, on_disk: bool = False) -> dict[str, Any]:
    """The build parameters of an index of ``kind`` for ``n`` vectors (recorded in the manifest);
    ``on_disk``: an ivfpq index whose lists go to disk (``ivfpq-disk``: see :func:`opq_dim`, :data:`DISK_RERANK`)."""
    if kind is IndexType.HNSW:
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
    if kind is not IndexType.IVFPQ:
        return {}
    # about sqrt(n) coarse lists (a power of two), each trained with 40 points
    nlist = int(2 ** round(math.log2(max(math.sqrt(n), 16))))
    nlist = max(16, min(nlist, 65_536, n // 40))
    # the largest code that fits the budget, at most 128 bytes and at most one byte per 2 dims
    per_vector = memory_budget_mb * 2**20 / max(n, 1) - 8
    sizes = [m for m in (8, 16, 32, 48, 64, 96, 128) if m <= dim // 2] or [1]
    m = max([s for s in sizes if s <= per_vector] or [sizes[0]])
    train = min(max(IVFPQ_MIN_VECTORS, 40 * nlist), _IVFPQ_MAX_TRAIN)
    return {
        "nlist": nlist,
        "m": m,
        "nbits": 8,
        "opq_dim": opq_dim(m, dim, on_disk=on_disk),
        "train_size": train,
        "rerank": DISK_RERANK if on_disk else IVFPQ_RERANK,
    }


def opq_dim(m: int, dim: int, *, on_disk: bool = False) -> int:
    """The dimensions OPQ keeps for ``m``-byte codes: 4 per byte (8 for ``ivfpq-disk``), at most ``dim``.

    OPQ rotates (and shortens) the vectors so that each sub-quantizer gets a balanced share, and
    the coarse quantizer that picks the lists a query scans sees only what it keeps. At 10^7 vectors
    the lists probed, not the codes, limit recall (docs/scale.md). On a 10^6 stand-in (as many
    vectors per list and per cluster as the 10^7 benchmark), keeping 512 of 1,280 dimensions instead
    of 256 put 0.946 of the true neighbours in the lists probed instead of 0.923 (1,280: 0.948), at
    about the same query time and twice the time to assign the vectors to lists. The in-memory
    ``ivfpq`` keeps 4 per byte: at 10^6 with a list per cluster both reach 0.99.
    """
    return min((8 if on_disk else 4) * m, dim - dim % m)


def empty_index(kind: IndexType, params: Mapping[str, Any], dim: int, metric: Metric) -> faiss.Index:
    """A new faiss index of ``kind`` (an ivfpq one still to be trained)."""
    if kind is IndexType.FLAT:
        return new_flat(dim, metric)
    if kind is IndexType.HNSW:
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), FAISS_METRIC[metric])
        index.hnsw.efConstruction = int(params["ef_construction"])
        return index
    m, opq_dim = int(params["m"]), int(params["opq_dim"])
    # "np": no polysemous training (a slow code reordering for a search mode medsearch does not use)
    description = f"OPQ{m}_{opq_dim},IVF{int(params['nlist'])},PQ{m}x{int(params['nbits'])}np"
    index = faiss.index_factory(dim, description, FAISS_METRIC[metric])
    # faiss's default OPQ training (50 rounds, 40 k-means iterations in the first, 65,536 points)
    # takes many minutes on a few cores at 1280-d; fewer rounds on fewer points give most of the gain
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter, opq.niter_pq_0, opq.max_train_points = _OPQ_ROUNDS, _OPQ_ROUNDS, _OPQ_MAX_TRAIN
    return index


def new_flat(dim: int, metric: Metric) -> faiss.Index:
    """An empty exact index: inner products (cosine, of normalized vectors) or l2."""
    return faiss.IndexFlatIP(dim) if metric is Metric.COSINE else faiss.IndexFlatL2(dim)


def kind_of(index: faiss.Index) -> IndexType:
    """The type of a faiss index that :func:`empty_index` built."""
    if isinstance(index, faiss.IndexHNSW):
        return IndexType.HNSW
    if isinstance(index, faiss.IndexFlat):
        return IndexType.FLAT
    return IndexType.IVFPQ


def normalized(vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """The vectors as the index stores them: L2-normalized for cosine, as they are for l2."""
    if metric is Metric.COSINE:
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def flat_storage(index: faiss.Index) -> np.ndarray:
    """The ``(n, d)`` vectors of a flat index or of an HNSW index's storage, as a view (no copy)."""
    flat = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if flat.ntotal == 0:
        return np.zeros((0, flat.d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


# -- searching ------------------------------------------------------------------------------------


def apply_search_params(index: faiss.Index, kind: IndexType, *, ef_search: int, nprobe: int) -> None:
    """Set the search-time knobs on the index itself (hnsw: ``efSearch``; ivfpq: ``nprobe``)."""
    if kind is IndexType.HNSW:
        index.hnsw.efSearch = ef_search
    elif kind is IndexType.IVFPQ:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, ivf.nlist)
        single_query_on_all_cores(ivf)


def single_query_on_all_cores(ivf: faiss.IndexIVF) -> None:
    """Scan one query's lists on every core (faiss's default gives each core whole queries, so a
    single query runs on one): 1.8 times faster a query on 2 cores, a batch of 200 4% slower."""
    ivf.parallel_mode = 1


def _search_params(index: faiss.Index, kind: IndexType, selector: Any, *, ef_search: int, nprobe: int, widen: int) -> Any:
    if kind is IndexType.HNSW:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search * widen)
    if kind is IndexType.IVFPQ:
        nlist = faiss.extract_index_ivf(index).nlist
        ivf = faiss.SearchParametersIVF(sel=selector, nprobe=min(nprobe * widen, nlist))
        return faiss.SearchParametersPreTransform(index_params=ivf) if isinstance(index, faiss.IndexPreTransform) else ivf
    return faiss.SearchParameters(sel=selector)


def rerank(
    queries: np.ndarray, candidates: np.ndarray, k: int, *, metric: Metric, exact_rows: ExactRows
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidates (from the exact vectors); the best ``k`` of them."""
    found = candidates >= 0
    vectors = exact_rows(np.where(found, candidates, 0).ravel()).reshape(*candidates.shape, queries.shape[1])
    if metric is Metric.COSINE:
        scores = np.einsum("qd,qcd->qc", queries, vectors)
        scores[~found] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((vectors - queries[:, None, :]) ** 2).sum(axis=2)
        scores[~found] = np.inf
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    ids = np.take_along_axis(candidates, order, axis=1)
    ids[~np.isfinite(scores)] = -1
    return scores, ids


def search_filtered(
    index: faiss.Index,
    kind: IndexType,
    queries: np.ndarray,
    k: int,
    mask: np.ndarray,
    *,
    metric: Metric,
    ef_search: int,
    nprobe: int,
    rerank_factor: int,
    exact_rows: ExactRows,
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of the cases ``mask`` keeps, for each (normalized) query: through a faiss ID
    selector, widening an approximate search that meets too few of them, or exactly when few match."""
    allowed = np.flatnonzero(mask)
    k = min(k, len(allowed))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if kind is not IndexType.FLAT and len(allowed) <= _EXACT_FILTER_MAX:
        # few matching cases: comparing with each is cheaper and exact
        return exact_search(queries, allowed, k, metric=metric, exact_rows=exact_rows)
    bits = np.packbits(mask, bitorder="little")  # the selector reads this buffer: keep it alive
    selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
    factor = max(rerank_factor, 1)
    fetch = min(k * factor, len(allowed))
    widen = 1
    while True:
        params = _search_params(index, kind, selector, ef_search=ef_search, nprobe=nprobe, widen=widen)
        scores, ids = index.search(queries, fetch, params=params)
        short = (ids >= 0).sum(axis=1) < k
        if not short.any() or kind is IndexType.FLAT or widen >= _MAX_WIDEN:
            break
        # a graph walk or the lists probed met too few matching cases: look further
        widen *= 4
    if factor > 1:
        scores, ids = rerank(queries, ids, k, metric=metric, exact_rows=exact_rows)
    if short.any() and kind is not IndexType.FLAT:
        exact_scores, exact_ids = exact_search(queries[short], allowed, k, metric=metric, exact_rows=exact_rows)
        scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
        scores[short], ids[short] = exact_scores, exact_ids
    return scores[:, :k], ids[:, :k]


def exact_search(
    queries: np.ndarray, rows: np.ndarray, k: int, *, metric: Metric, exact_rows: ExactRows
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` among ``rows`` (in chunks, so a large subset is never copied at once)."""
    best_scores = np.zeros((len(queries), 0), np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(rows), _EXACT_FILTER_MAX):
        chunk = rows[start:start + _EXACT_FILTER_MAX]
        scores = _exact_scores(queries, exact_rows(chunk), metric)
        ids = np.broadcast_to(chunk, scores.shape)
        best_scores, best_ids = top_k(
            np.concatenate([best_scores, scores], axis=1), np.concatenate([best_ids, ids], axis=1), k, metric
        )
    return best_scores, best_ids


def _exact_scores(queries: np.ndarray, vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """faiss's convention: inner products (cosine), or squared Euclidean distances (l2)."""
    if metric is Metric.COSINE:
        return queries @ vectors.T
    return (queries**2).sum(1)[:, None] - 2 * queries @ vectors.T + (vectors**2).sum(1)[None, :]


def top_k(scores: np.ndarray, ids: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` columns of each row, best first (largest inner product, smallest l2)."""
    key = -scores if metric is Metric.COSINE else scores
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(key, k - 1, axis=1)[:, :k]
        key, scores, ids = (np.take_along_axis(a, part, axis=1) for a in (key, scores, ids))
    order = np.argsort(key, axis=1, kind="stable")
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    return scores.astype(np.float32), np.where(np.isfinite(scores), ids, -1).astype(np.int64)
