"""The scoring core: gallery and query vectors with their labels in, an :class:`EvaluationResult` out.

:func:`evaluate_embeddings` searches an exact (flat) faiss index of the gallery through
:class:`~medsearch.store.IndexStore` and scores the ranked labels with :mod:`medsearch.metrics`. It
asks for ``max(k, R)`` results per query (``R`` = relevant items in the gallery, for MAP@R and
R-precision) plus the number of excluded items, and counts ``n_relevant`` over the whole gallery
searched (minus excluded items), so recall, AP and MAP@R have the right denominators. MRR is exact
too: a query whose first hit lies beyond those results is ranked against the whole gallery.

Leave-one-out: ``query_rows`` names the gallery row that is the query itself, and
``gallery_groups``/``query_groups`` (patient pseudonyms) leave out the cases of the query's patient;
an excluded item is never retrieved and never counted as relevant.

Distances: the gallery index uses the given metric; embeddings are unit-length, so cosine and L2
give the same ranking.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from medsearch._json import plain
from medsearch.config import Metric
from medsearch.errors import ConfigError, EncoderMismatchError, ShapeError
from medsearch.evaluate.protocols import Protocol, default_headline, metric_names, resolve_ks, resolve_protocol
from medsearch.evaluate.results import EvaluationResult
from medsearch.metrics import (
    bootstrap_cis,
    compute_metrics,
    confusion_matrix,
    knn_predict,
    reciprocal_rank,
    summarize,
)
from medsearch.store import IndexStore

__all__ = ["evaluate_embeddings"]

# Precision@k curves in the figure and the report run to at least this rank.
_CURVE_K = 20
# Bound the (queries x results) arrays held at once while scoring.
_CHUNK_ELEMENTS = 4_000_000


def evaluate_embeddings(
    gallery: ArrayLike,
    gallery_labels: ArrayLike,
    queries: ArrayLike,
    query_labels: ArrayLike,
    *,
    ks: Iterable[int] | None = None,
    metric: Metric | str = Metric.COSINE,
    query_rows: ArrayLike | None = None,
    gallery_groups: ArrayLike | None = None,
    query_groups: ArrayLike | None = None,
    protocol: Protocol | str | None = None,
    main_metric: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    dataset: str = "embeddings",
    encoder: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    reorder: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> EvaluationResult:
    """Search the gallery with each query vector and score the ranked labels.

    Parameters
    ----------
    gallery : array_like, shape (N, d)
        Gallery embeddings; they go into an exact faiss index.
    gallery_labels : array_like, shape (N,)
        Label of each gallery item (ints or strs).
    queries : array_like, shape (Q, d)
        Query embeddings.
    query_labels : array_like, shape (Q,)
        Label of each query, of the same kind as ``gallery_labels``.
    ks : iterable of int, optional
        Cut-offs; joined with the protocol's. Default (1, 5, 10) without a protocol.
    metric : Metric or str, default "cosine"
        Distance of the gallery index.
    query_rows : array_like of int, shape (Q,), optional
        Leave-one-out: the gallery row that is the query itself (-1 for none); it is never
        retrieved and not counted as relevant.
    gallery_groups, query_groups : array_like of str, shape (N,) and (Q,), optional
        Group of each item (a patient pseudonym): gallery items of the query's group are never
        retrieved and not counted as relevant. An empty string or None is no group.
    protocol : Protocol or str, optional
        A preset of :data:`~medsearch.evaluate.protocols.PROTOCOLS`, for its cut-offs, headline and main metric.
    main_metric : str, optional
        Metric of paired tests; default the protocol's, else ``map@r``.
    n_resamples : int, default 1000
        Bootstrap resamples of the 95% intervals.
    seed : int, default 0
        Seed of the bootstrap.
    dataset : str
        Name recorded in the result.
    encoder : mapping, optional
        Encoder description recorded in the result (name, weights hash...).
    settings : mapping, optional
        Extra settings recorded in the result.
    reorder : callable, optional
        A second ranking stage: given query numbers ``(q,)`` and the gallery rows found for them
        ``(q, fetch)``, closest first, the same rows in a new order (late-interaction re-ranking,
        :mod:`medsearch.rerank`). MRR beyond the rows fetched falls back to the first stage.

    Returns
    -------
    EvaluationResult

    Raises
    ------
    ShapeError
        Mismatched shapes, labels of different kinds, or no query.
    ConfigError
        A ``k`` larger than the gallery left after exclusions, or an unknown main metric.
    EncoderMismatchError
        Queries and gallery of different dimensions (embedded by different encoders).
    """
    started = time.perf_counter()
    spec = resolve_protocol(protocol)
    ks = resolve_ks(ks, spec)
    gallery = np.ascontiguousarray(np.asarray(gallery, dtype=np.float32))
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    g_values, q_values = np.asarray(gallery_labels), np.asarray(query_labels)
    _check_arrays(gallery, g_values, queries, q_values)
    n_gallery, n_queries = gallery.shape[0], queries.shape[0]

    vocabulary, codes = _label_codes(g_values, q_values)
    g_lab, q_lab = codes[:n_gallery], codes[n_gallery:]
    n_labels = vocabulary.shape[0]
    rows = _query_rows(query_rows, n_queries, n_gallery)
    g_grp, q_grp = _group_codes(gallery_groups, query_groups, n_gallery, n_queries)

    # Relevant items and excluded items per query, counted over the whole gallery.
    n_relevant = np.bincount(g_lab, minlength=n_labels)[q_lab].astype(np.int64)
    n_excluded = np.zeros(n_queries, dtype=np.int64)
    in_group = q_grp >= 0
    if in_group.any():
        n_groups = int(max(g_grp.max(initial=-1), q_grp.max(initial=-1))) + 1
        grouped = g_grp >= 0
        group_size = np.bincount(g_grp[grouped], minlength=n_groups)
        group_label = np.bincount(g_grp[grouped] * n_labels + g_lab[grouped], minlength=n_groups * n_labels)
        n_excluded[in_group] += group_size[q_grp[in_group]]
        n_relevant[in_group] -= group_label[q_grp[in_group] * n_labels + q_lab[in_group]]
    has_self = rows >= 0
    self_rows = np.where(has_self, rows, 0)
    self_extra = has_self & ~(in_group & (g_grp[self_rows] == q_grp))
    n_excluded += self_extra
    n_relevant -= self_extra & (g_lab[self_rows] == q_lab)
    n_available = n_gallery - n_excluded

    k_max = max(ks)
    smallest = int(n_available.min())
    if k_max > smallest:
        where = "after leaving out each query's own cases" if n_excluded.any() else ""
        raise ConfigError(
            f"k = {k_max} is larger than the gallery searched ({smallest} items{' ' + where if where else ''}); "
            "use a smaller -k"
        )
    spec_main = main_metric or (spec.main_metric if spec else "map@r")
    names = metric_names(ks)
    if spec_main not in names:
        raise ConfigError(f"main metric {spec_main!r} is not computed; choose one of: {', '.join(names)}")
    vote_k = spec.vote_k if spec else k_max
    curve_k = min(max(k_max, _CURVE_K), smallest)
    need = int(max(k_max, curve_k, n_relevant.max(initial=0)))
    fetch = int(min(n_gallery, need + n_excluded.max(initial=0)))

    store = _exact_store(gallery, Metric(metric))
    at_k = [n for n in names if "@" in n and n != "map@r"]
    per_query: dict[str, list[np.ndarray]] = {n: [] for n in names}
    predictions: list[np.ndarray] = []
    curve_sum = np.zeros((n_labels, curve_k), dtype=np.float64)
    search_s = metrics_s = 0.0
    chunk = max(1, _CHUNK_ELEMENTS // max(fetch, 1))
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        t0 = time.perf_counter()
        hits = store.search(queries[start:stop], fetch)
        found = hits.ids if reorder is None else reorder(np.arange(start, stop), hits.ids)
        ids = _drop_excluded(found, rows[start:stop], g_grp, q_grp[start:stop])[:, :need]
        t1 = time.perf_counter()
        search_s += t1 - t0
        # Rows whose own cases are many end with excluded items once their gallery runs out:
        # give those places a label no query has.
        available = np.arange(need) < n_available[start:stop, None]
        retrieved = np.where(available, g_lab[ids], -1)
        q = q_lab[start:stop]
        rel = retrieved == q[:, None]
        n_rel = n_relevant[start:stop]
        values = compute_metrics(retrieved[:, :k_max], q, n_rel, ks=ks, names=at_k)
        r_cols = int(max(n_rel.max(initial=0), 1))
        values.update(compute_metrics(retrieved[:, :r_cols], q, n_rel, names=["map@r", "r_precision"]))
        values["mrr"] = _exact_reciprocal_rank(
            store, queries[start:stop], retrieved, q, n_rel, rows[start:stop], g_lab, g_grp, q_grp[start:stop]
        )
        for name in names:
            per_query[name].append(values[name])
        predictions.append(knn_predict(retrieved[:, :vote_k], vote_k))
        curve = np.cumsum(rel[:, :curve_k], axis=1) / np.arange(1, curve_k + 1)
        np.add.at(curve_sum, q, curve)
        metrics_s += time.perf_counter() - t1

    t2 = time.perf_counter()
    values_all = {name: np.concatenate(parts) for name, parts in per_query.items()}
    label_values = vocabulary[q_lab]
    summary = summarize(values_all, label_values)
    predicted = vocabulary[np.concatenate(predictions)]
    classes = np.unique(np.concatenate([q_lab, np.concatenate(predictions)]))
    matrix = confusion_matrix(label_values, predicted, labels=vocabulary[classes])
    support_codes, support_counts = np.unique(q_lab, return_counts=True)
    curve_per_class = {
        plain(vocabulary[c]): (curve_sum[c] / n).tolist() for c, n in zip(support_codes, support_counts, strict=True)
    }
    t3 = time.perf_counter()
    ci95 = bootstrap_cis(values_all, n_resamples=n_resamples, seed=seed)
    t4 = time.perf_counter()
    metrics_s += t3 - t2
    headline = spec.headline if spec else default_headline(ks)
    return EvaluationResult(
        dataset=dataset,
        protocol=spec.name if spec else "custom",
        encoder=dict(encoder or {}),
        n_gallery=n_gallery,
        n_queries=n_queries,
        ks=ks,
        main_metric=spec_main,
        headline=tuple(headline),
        metrics=summary["metrics"],
        macro=summary["macro"],
        per_class=summary["per_class"],
        support=summary["support"],
        ci95=ci95,
        confusion={
            "method": f"majority vote of the top {vote_k} (ties to the nearest tied label)",
            "k": vote_k,
            "labels": [plain(v) for v in vocabulary[classes]],
            "matrix": matrix.tolist(),
        },
        precision_curve={
            "k": list(range(1, curve_k + 1)),
            "all": (curve_sum.sum(axis=0) / n_queries).tolist(),
            "per_class": curve_per_class,
        },
        settings={
            "protocol_source": spec.source if spec else "",
            "metric": Metric(metric).value,
            "n_queries_without_relevant": int((n_relevant == 0).sum()),
            "results_per_query": need,
            **dict(settings or {}),
        },
        timings={
            "search_s": search_s,
            "metrics_s": metrics_s,
            "bootstrap_s": t4 - t3,
            "evaluate_s": time.perf_counter() - started,
        },
        per_query=values_all,
        query_labels=label_values,
        predictions=predicted,
    )


def _check_arrays(gallery: np.ndarray, g_values: np.ndarray, queries: np.ndarray, q_values: np.ndarray) -> None:
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise ShapeError(f"gallery must be a non-empty (N, d) array of embeddings, got shape {gallery.shape}")
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise ShapeError(f"queries must be a non-empty (Q, d) array of embeddings, got shape {queries.shape}")
    if queries.shape[1] != gallery.shape[1]:
        raise EncoderMismatchError(f"queries have dimension {queries.shape[1]} but the gallery {gallery.shape[1]}; embed both with one encoder")
    for name, values, n in (("gallery_labels", g_values, gallery.shape[0]), ("query_labels", q_values, queries.shape[0])):
        if values.ndim != 1 or values.shape[0] != n:
            raise ShapeError(f"{name} must hold one label per row ({n}), got shape {values.shape}")


def _label_codes(g_values: np.ndarray, q_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    text = {"U", "S", "O"}
    if (g_values.dtype.kind in text) != (q_values.dtype.kind in text):
        raise ShapeError(
            f"gallery labels are {g_values.dtype} but query labels {q_values.dtype}; "
            "labels must be of the same kind (both strings or both numbers)"
        )
    try:
        vocabulary, codes = np.unique(np.concatenate([g_values, q_values]), return_inverse=True)
    except TypeError as e:
        raise ShapeError(f"labels cannot be compared ({e}); pass strings or numbers") from e
    return vocabulary, codes.reshape(-1).astype(np.int64)


def _query_rows(query_rows: ArrayLike | None, n_queries: int, n_gallery: int) -> np.ndarray:
    if query_rows is None:
        return np.full(n_queries, -1, dtype=np.int64)
    rows = np.asarray(query_rows, dtype=np.int64)
    if rows.shape != (n_queries,) or rows.max(initial=-1) >= n_gallery or rows.min(initial=-1) < -1:
        raise ShapeError(f"query_rows must hold one gallery row (or -1) per query, each below {n_gallery}")
    return rows


def _group_codes(
    gallery_groups: ArrayLike | None, query_groups: ArrayLike | None, n_gallery: int, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    if gallery_groups is None and query_groups is None:
        return np.full(n_gallery, -1, dtype=np.int64), np.full(n_queries, -1, dtype=np.int64)
    if gallery_groups is None or query_groups is None:
        raise ShapeError("give both gallery_groups and query_groups, or neither")
    g = np.asarray(["" if pd.isna(v) else str(v) for v in np.asarray(gallery_groups, dtype=object)], dtype=object)
    q = np.asarray(["" if pd.isna(v) else str(v) for v in np.asarray(query_groups, dtype=object)], dtype=object)
    if g.shape != (n_gallery,) or q.shape != (n_queries,):
        raise ShapeError("gallery_groups and query_groups must hold one group per gallery item and per query")
    vocabulary, codes = np.unique(np.concatenate([g, q]).astype(str), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    if vocabulary.shape[0] and vocabulary[0] == "":
        codes = codes - 1  # the empty group becomes -1: no group
    return codes[:n_gallery], codes[n_gallery:]


def _exact_store(vectors: np.ndarray, metric: Metric) -> IndexStore:
    """An in-memory exact (flat) index of the gallery; never written to disk."""
    store = IndexStore.create(
        Path(tempfile.gettempdir()) / "medsearch-evaluate-in-memory",
        dim=vectors.shape[1],
        metric=metric,
        encoder={},
        preprocess={},
    )
    store.add(vectors, pd.DataFrame({"case_id": [str(i) for i in range(vectors.shape[0])]}))
    return store


def _drop_excluded(ids: np.ndarray, rows: np.ndarray, g_grp: np.ndarray, q_grp: np.ndarray) -> np.ndarray:
    """Move each query's own row and the rows of its group to the end of its result list."""
    excluded = ids == rows[:, None]
    if (q_grp >= 0).any():
        excluded |= (g_grp[ids] == q_grp[:, None]) & (q_grp[:, None] >= 0)
    if not excluded.any():
        return ids
    order = np.argsort(excluded, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)


def _exact_reciprocal_rank(
    store: IndexStore,
    queries: np.ndarray,
    retrieved: np.ndarray,
    q_lab: np.ndarray,
    n_relevant: np.ndarray,
    rows: np.ndarray,
    g_lab: np.ndarray,
    g_grp: np.ndarray,
    q_grp: np.ndarray,
) -> np.ndarray:
    """1 / rank of the first hit over the whole gallery (not only the results fetched)."""
    rr = reciprocal_rank(retrieved, q_lab)
    late = np.flatnonzero((rr == 0) & (n_relevant > 0))
    if late.size:
        # The first hit lies beyond the results fetched: rank these few queries against everything.
        hits = store.search(queries[late], len(store))
        ids = _drop_excluded(hits.ids, rows[late], g_grp, q_grp[late])
        rel = g_lab[ids] == q_lab[late, None]
        rr[late] = 1.0 / (rel.argmax(axis=1) + 1.0)
    return rr
