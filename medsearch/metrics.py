"""Retrieval metrics computed from the labels of ranked results.

Every metric is a pure function of label-level arrays, so this module knows nothing of the index,
the encoder or torch. The parameters mean the same in every function:

``retrieved``
    ``(Q, K)`` array of labels (int or str) of the top-K gallery items of each query, best first.
    The caller has already removed the query itself and, for leave-one-out, same-patient items.
    Every row must hold ``K`` real results; padding is not supported.
``query_labels``
    ``(Q,)`` label of each query, of the same kind as ``retrieved`` (both strings or both numbers).
``n_relevant``
    ``(Q,)`` number of items in the *whole gallery searched* that share the query's label. It is
    the denominator of recall, AP and MAP@R; counting it from the top-K alone would give wrong
    values, and a count smaller than the hits already retrieved raises ``ValueError``.
``k``
    The cut-off (for a vote, the number of voters): an integer with ``1 <= k <= K``. A larger ``k``
    raises ``ValueError`` instead of silently scoring a shorter list: ask the search for at least
    ``k`` results.
``n_resamples``, ``alpha``, ``seed``
    Of the bootstrap and the permutation test: resamples of the queries (an integer >= 1),
    1 - confidence level (0.05 gives the 2.5th and 97.5th percentiles), and the seed of the
    random generator, so that intervals and p-values are reproducible.

Each metric returns the per-query values (``float64``, shape ``(Q,)``), so means, macro averages,
bootstrap intervals and paired tests all build on the same arrays.

Every function raises ``ValueError``, with a message that says what to pass instead, on wrong
shapes, lengths that differ between arguments, labels of different kinds, a ``k`` outside
``[1, K]``, an ``n_relevant`` that is negative, fractional or smaller than the hits retrieved, and
per-query values that are empty or not finite.

Conventions (the same in every function):

- precision@k divides by ``k_eff = min(k, gallery size)``, which is ``k``: every row holds
  ``K >= k`` real results, so an accepted call searched at least ``k`` items; a gallery smaller
  than ``k`` shows up as ``k > K`` and raises.
- A query with no relevant item in the gallery (``n_relevant == 0``) scores 0 for every metric
  (recall, AP, nDCG, MAP@R, R-precision included), not NaN, so means stay defined.
- ``map@k`` is standard AP@k: the sum of precision at each hit rank within ``k``, divided by
  ``min(k, n_relevant)``. ``map_hits@k`` is the definition of Mahbod et al. (2024): the same sum
  divided by the number of hits in the top ``k``. It is never lower than ``map@k``.
- Majority vote: ``mmv@k`` (lenient, Mahbod et al.) counts a tie as correct when any tied label is
  the query's; ``knn_acc@k`` (strict, MedMNIST+ k-NN) breaks a tie in favour of the tied label whose
  best-ranked item comes first.

The JSON names of the report are the keys of :data:`METRICS`, with ``@k`` replaced by each value of
``ks`` in :func:`compute_metrics`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "METRICS",
    "average_precision_at_k",
    "bootstrap_ci",
    "bootstrap_cis",
    "compute_metrics",
    "confusion_matrix",
    "hit_at_k",
    "hits_precision_at_k",
    "knn_accuracy_at_k",
    "knn_predict",
    "majority_vote_lenient_at_k",
    "map_at_r",
    "ndcg_at_k",
    "paired_test",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
    "reciprocal_rank",
    "summarize",
]

FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------------------------------
# validation


def _check_retrieved(retrieved: ArrayLike) -> np.ndarray:
    ret = np.asarray(retrieved)
    if ret.ndim != 2:
        raise ValueError(
            f"retrieved must be 2-D (queries, ranked results), got shape {ret.shape}; "
            "pass one row of result labels per query"
        )
    if ret.shape[0] == 0:
        raise ValueError("retrieved has no queries (0 rows); pass at least one query")
    if ret.shape[1] == 0:
        raise ValueError("retrieved has 0 columns; ask the search for at least 1 result")
    return ret


def _check_labels(retrieved: ArrayLike, query_labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ret = _check_retrieved(retrieved)
    q = np.asarray(query_labels)
    if q.ndim != 1:
        raise ValueError(f"query_labels must be 1-D (one label per query), got shape {q.shape}")
    if q.shape[0] != ret.shape[0]:
        raise ValueError(
            f"query_labels has {q.shape[0]} entries but retrieved has {ret.shape[0]} rows; "
            "pass one label per query, in the same order"
        )
    # numpy compares a str array with an int array as all-False instead of failing: catch it here.
    text = {"U", "S"}
    if (ret.dtype.kind in text) != (q.dtype.kind in text) and "O" not in (ret.dtype.kind, q.dtype.kind):
        raise ValueError(
            f"retrieved holds {ret.dtype} labels but query_labels holds {q.dtype}; "
            "labels must be of the same kind (both strings or both numbers)"
        )
    return ret, q


def _check_k(k: int, n_columns: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    if k > n_columns:
        raise ValueError(f"retrieved has {n_columns} columns but k={k}; ask the search for at least {k} results")
    return int(k)


def _relevance(ret: np.ndarray, q: np.ndarray) -> NDArray[np.bool_]:
    return np.asarray(ret == q[:, None], dtype=bool)


def _check_n_relevant(n_relevant: ArrayLike, rel: NDArray[np.bool_]) -> NDArray[np.int64]:
    n = np.asarray(n_relevant)
    if n.ndim != 1:
        raise ValueError(f"n_relevant must be 1-D (one count per query), got shape {n.shape}")
    if n.shape[0] != rel.shape[0]:
        raise ValueError(
            f"n_relevant has {n.shape[0]} entries but retrieved has {rel.shape[0]} rows; "
            "pass one count per query, in the same order"
        )
    if n.dtype.kind not in "iuf" or (n.dtype.kind == "f" and not np.all(n == np.round(n))):
        raise ValueError(f"n_relevant must hold whole numbers (counts of relevant gallery items), got {n.dtype}")
    n = n.astype(np.int64)
    if np.any(n < 0):
        raise ValueError(f"n_relevant must be >= 0, got {int(n.min())}")
    hits = rel.sum(axis=1)
    bad = np.flatnonzero(hits > n)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"n_relevant[{i}] = {int(n[i])} but {int(hits[i])} of that query's retrieved items "
            "share its label; n_relevant must count the relevant items in the whole gallery "
            "searched, not in the top-K"
        )
    return n


def _prepare(retrieved: ArrayLike, query_labels: ArrayLike, k: int | None) -> tuple[NDArray[np.bool_], int]:
    """Validate, and return the relevance matrix and the cut-off (all columns when k is None)."""
    ret, q = _check_labels(retrieved, query_labels)
    k = ret.shape[1] if k is None else _check_k(k, ret.shape[1])
    return _relevance(ret, q), k


def _safe_divide(num: np.ndarray, den: np.ndarray) -> FloatArray:
    """``num / den`` with 0 where ``den == 0`` (no relevant item, or no hit)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _precision_sum(rel: NDArray[np.bool_]) -> FloatArray:
    """Sum, over the hit ranks of each row, of the precision at that rank."""
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    precision = np.cumsum(rel, axis=1) / ranks
    return np.asarray((precision * rel).sum(axis=1), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# metrics


def hit_at_k(retrieved: ArrayLike, query_labels: ArrayLike, k: int) -> FloatArray:
    """Hit rate: 1 where any of the top ``k`` results shares the query's label (JSON ``hit@k``).

    This is ``ACC@k`` of Mahbod et al. (2024).

    >>> hit_at_k([["a", "b"], ["b", "b"]], ["b", "a"], k=2)
    array([1., 0.])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    return np.asarray(rel[:, :k].any(axis=1), dtype=np.float64)


def precision_at_k(retrieved: ArrayLike, query_labels: ArrayLike, k: int) -> FloatArray:
    """Fraction of the top ``k`` results that share the query's label (JSON ``precision@k``).

    >>> precision_at_k([[1, 2, 1, 1]], [1], k=4)
    array([0.75])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    return np.asarray(rel[:, :k].sum(axis=1) / k, dtype=np.float64)


def recall_at_k(retrieved: ArrayLike, query_labels: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Hits in the top ``k`` divided by ``n_relevant`` (JSON ``recall@k``); 0 where ``n_relevant == 0``.

    >>> recall_at_k([[1, 2, 1], [2, 2, 2]], [1, 1], [4, 0], k=3)
    array([0.5, 0. ])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    n = _check_n_relevant(n_relevant, rel)
    return _safe_divide(rel[:, :k].sum(axis=1), n)


def average_precision_at_k(retrieved: ArrayLike, query_labels: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Standard AP@k (JSON ``map@k``).

    ``AP@k = sum_{i <= k, rel_i} P@i / min(k, n_relevant)``, 0 where ``n_relevant == 0``. Compare
    :func:`hits_precision_at_k`, which divides by the number of hits instead. Hits at ranks 1 and 3
    of 5, four relevant items: ``(1 + 2/3) / min(5, 4) = 5/12``.

    >>> average_precision_at_k([["a", "b", "a", "b", "b"]], ["a"], [4], k=5).round(4)
    array([0.4167])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    n = _check_n_relevant(n_relevant, rel)
    return _safe_divide(_precision_sum(rel[:, :k]), np.minimum(k, n))


def hits_precision_at_k(retrieved: ArrayLike, query_labels: ArrayLike, k: int) -> FloatArray:
    """Mean precision over the hit ranks in the top ``k`` (JSON ``map_hits@k``).

    The ``mAP@k`` of Mahbod et al. (2024): ``sum_{i <= k, rel_i} P@i / hits@k``, 0 where no hit.
    It ignores relevant items that were not retrieved, so it is never lower than standard AP@k
    (:func:`average_precision_at_k`). torchmetrics' ``RetrievalMAP(top_k=k)`` uses the same
    denominator. Hits at ranks 1 and 3 of 5: ``(1 + 2/3) / 2 = 5/6``.

    >>> hits_precision_at_k([["a", "b", "a", "b", "b"]], ["a"], k=5).round(4)
    array([0.8333])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    top = rel[:, :k]
    return _safe_divide(_precision_sum(top), top.sum(axis=1))


def _vote(
    retrieved: ArrayLike, query_labels: ArrayLike | None, k: int
) -> tuple[np.ndarray, NDArray[np.bool_], NDArray[np.intp], NDArray[np.intp]]:
    """Count the labels of the top ``k``: return the sorted label vocabulary, a ``(Q, C)`` mask of the
    labels tied for the most votes, the code of the strict (best-ranked tied) winner, and the query
    codes (empty without labels)."""
    if query_labels is None:
        ret = _check_retrieved(retrieved)
        q = ret[:0, 0]
    else:
        ret, q = _check_labels(retrieved, query_labels)
    k = _check_k(k, ret.shape[1])
    n_queries = ret.shape[0]
    top = ret[:, :k]
    pool = np.concatenate([top.ravel(), q])
    vocabulary, inverse = np.unique(pool, return_inverse=True)
    inverse = inverse.reshape(-1)
    codes = inverse[: n_queries * k].reshape(n_queries, k)
    query_codes = inverse[n_queries * k :]
    n_classes = vocabulary.shape[0]
    rows = np.arange(n_queries)
    counts = np.bincount(
        (rows[:, None] * n_classes + codes).ravel(), minlength=n_queries * n_classes
    ).reshape(n_queries, n_classes)
    # Best rank of each label: walk the columns from last to first so the best rank is written last.
    first = np.full((n_queries, n_classes), k, dtype=np.intp)
    for j in range(k - 1, -1, -1):
        first[rows, codes[:, j]] = j
    tied = counts == counts.max(axis=1, keepdims=True)
    winner = np.where(tied, first, k).argmin(axis=1)
    return vocabulary, tied, winner, query_codes


def majority_vote_lenient_at_k(retrieved: ArrayLike, query_labels: ArrayLike, k: int) -> FloatArray:
    """Majority vote of the top ``k``, lenient on ties (JSON ``mmv@k``).

    1 where the query's label has the most votes among the top ``k``, a tie included: a tie counts
    as correct when any tied label is the query's (``mMV@k`` of Mahbod et al., 2024).

    >>> majority_vote_lenient_at_k([["b", "a", "a", "b"]], ["a"], k=4)  # 2-2 tie: correct
    array([1.])
    """
    _, tied, _, query_codes = _vote(retrieved, query_labels, k)
    return tied[np.arange(tied.shape[0]), query_codes].astype(np.float64)


def knn_predict(retrieved: ArrayLike, k: int) -> np.ndarray:
    """k-NN prediction: the majority label of the top ``k`` neighbours (MedMNIST+ uses ``k = 11``).

    A tie goes to the tied label whose best-ranked item comes first (the nearest neighbour among
    the tied labels), as a k-NN classifier over the ranked list would decide. Returns the predicted
    labels, shape ``(Q,)``, of the dtype of ``retrieved``.

    >>> knn_predict([["b", "a", "a", "b"], ["b", "a", "a", "c"]], k=4).tolist()
    ['b', 'a']
    """
    vocabulary, _, winner, _ = _vote(retrieved, None, k)
    return vocabulary[winner]


def knn_accuracy_at_k(retrieved: ArrayLike, query_labels: ArrayLike, k: int) -> FloatArray:
    """1 where :func:`knn_predict` gives the query's label (JSON ``knn_acc@k``).

    Strict majority vote: a tie is broken by the best-ranked among the tied labels, never counted
    correct just because the query's label is among them (:func:`majority_vote_lenient_at_k` is).

    >>> knn_accuracy_at_k([["b", "a", "a", "b"]], ["a"], k=4)  # tie goes to "b", ranked first
    array([0.])
    """
    _, _, winner, query_codes = _vote(retrieved, query_labels, k)
    return np.asarray(winner == query_codes, dtype=np.float64)


def _r_columns(rel: NDArray[np.bool_], n: NDArray[np.int64], name: str) -> NDArray[np.bool_]:
    """Relevance restricted to the first ``R = n_relevant`` columns of each row."""
    r_max = int(n.max())
    if r_max > rel.shape[1]:
        raise ValueError(
            f"{name} needs at least {r_max} retrieved columns (the largest n_relevant) but "
            f"retrieved has {rel.shape[1]}; ask the search for at least {r_max} results"
        )
    return rel[:, :r_max] & (np.arange(r_max) < n[:, None])


def map_at_r(retrieved: ArrayLike, query_labels: ArrayLike, n_relevant: ArrayLike) -> FloatArray:
    """MAP@R of Musgrave et al. (2020) (JSON ``map@r``).

    With ``R = n_relevant`` of the query: ``MAP@R = sum_{i <= R, rel_i} P@i / R``, 0 where
    ``R == 0``. It is AP@k with ``k = R`` per query, so ``retrieved`` needs at least
    ``max(n_relevant)`` columns (fewer raise ``ValueError``, saying how many). R = 3, hits at ranks
    1 and 3: ``(1 + 2/3) / 3 = 5/9``.

    >>> map_at_r([[1, 2, 1, 1, 2]], [1], [3]).round(4)
    array([0.5556])
    """
    rel, _ = _prepare(retrieved, query_labels, None)
    n = _check_n_relevant(n_relevant, rel)
    return _safe_divide(_precision_sum(_r_columns(rel, n, "map@r")), n)


def r_precision(retrieved: ArrayLike, query_labels: ArrayLike, n_relevant: ArrayLike) -> FloatArray:
    """Precision at rank ``R = n_relevant`` (JSON ``r_precision``), 0 where ``R == 0``.

    ``retrieved`` needs at least ``max(n_relevant)`` columns, as for :func:`map_at_r`.

    >>> r_precision([[1, 2, 1, 1, 2]], [1], [3]).round(4)
    array([0.6667])
    """
    rel, _ = _prepare(retrieved, query_labels, None)
    n = _check_n_relevant(n_relevant, rel)
    return _safe_divide(_r_columns(rel, n, "r_precision").sum(axis=1), n)


def ndcg_at_k(retrieved: ArrayLike, query_labels: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Normalised DCG at ``k`` with binary relevance (JSON ``ndcg@k``).

    ``DCG@k = sum_{i <= k} rel_i / log2(i + 1)``; the ideal DCG places ``min(k, n_relevant)`` hits
    first. 0 where ``n_relevant == 0``. One relevant item, found at rank 2: ``(1 / log2 3) / 1``.

    >>> ndcg_at_k([[2, 1, 2]], [1], [1], k=3).round(4)
    array([0.6309])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    n = _check_n_relevant(n_relevant, rel)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = rel[:, :k] @ discount
    ideal_cumulative = np.concatenate([[0.0], np.cumsum(discount)])
    return _safe_divide(dcg, ideal_cumulative[np.minimum(k, n)])


def reciprocal_rank(retrieved: ArrayLike, query_labels: ArrayLike, k: int | None = None) -> FloatArray:
    """``1 / rank`` of the first hit (JSON ``mrr`` once averaged), 0 where none is retrieved.

    ``k`` is optional: the top ``k`` only, by default all ``K`` retrieved columns.

    >>> reciprocal_rank([[2, 2, 1], [2, 2, 2]], [1, 1])
    array([0.33333333, 0.        ])
    """
    rel, k = _prepare(retrieved, query_labels, k)
    top = rel[:, :k]
    first = top.argmax(axis=1)
    return np.where(top.any(axis=1), 1.0 / (first + 1.0), 0.0)


# --------------------------------------------------------------------------------------------------
# registry and report

#: JSON-name pattern -> metric, in report order. ``@k`` patterns are expanded over ``ks``.
METRICS: Mapping[str, Callable[..., FloatArray]] = {
    "hit@k": hit_at_k,
    "precision@k": precision_at_k,
    "recall@k": recall_at_k,
    "map@k": average_precision_at_k,
    "map_hits@k": hits_precision_at_k,
    "mmv@k": majority_vote_lenient_at_k,
    "knn_acc@k": knn_accuracy_at_k,
    "ndcg@k": ndcg_at_k,
    "map@r": map_at_r,
    "r_precision": r_precision,
    "mrr": reciprocal_rank,
}

_CONCRETE = re.compile(r"^(?P<base>.+)@(?P<k>\d+)$")


def _expand(names: Iterable[str] | None, ks: Sequence[int]) -> list[tuple[str, str, int | None]]:
    """Turn patterns ("hit@k") and concrete names ("hit@3") into (key, pattern, k) triples."""
    out: list[tuple[str, str, int | None]] = []
    for name in METRICS if names is None else names:
        if name in METRICS:
            if name.endswith("@k"):
                out.extend((name[:-1] + str(k), name, k) for k in ks)
            else:
                out.append((name, name, None))
            continue
        match = _CONCRETE.match(name)
        if match and f"{match['base']}@k" in METRICS:
            out.append((name, f"{match['base']}@k", int(match["k"])))
            continue
        raise ValueError(
            f"unknown metric {name!r}; use one of {', '.join(METRICS)} "
            "(an '@k' pattern may also be given with a number, e.g. 'hit@3')"
        )
    return out


def compute_metrics(
    retrieved: ArrayLike,
    query_labels: ArrayLike,
    n_relevant: ArrayLike,
    *,
    ks: Sequence[int] = (1, 5, 10),
    names: Iterable[str] | None = None,
) -> dict[str, FloatArray]:
    """Per-query values of several metrics, keyed by JSON name, in :data:`METRICS` order.

    ``ks`` are the cut-offs of the ``@k`` patterns, each at most ``K``. ``names`` are patterns from
    :data:`METRICS` (``"hit@k"``, ``"mrr"``) or concrete names (``"hit@3"``); by default every
    metric, and ``map@r`` and ``r_precision`` then need ``K >= max(n_relevant)``. An unknown name
    raises ``ValueError``.

    >>> out = compute_metrics([[1, 2], [2, 2]], [1, 1], [1, 0], ks=(1,), names=["hit@k", "mrr"])
    >>> {key: value.tolist() for key, value in out.items()}
    {'hit@1': [1.0, 0.0], 'mrr': [1.0, 0.0]}
    """
    ret, q = _check_labels(retrieved, query_labels)
    n = _check_n_relevant(n_relevant, _relevance(ret, q))
    out: dict[str, FloatArray] = {}
    for key, pattern, k in _expand(names, ks):
        function = METRICS[pattern]
        kwargs: dict[str, Any] = {}
        if "n_relevant" in inspect.signature(function).parameters:
            kwargs["n_relevant"] = n
        if k is not None:
            kwargs["k"] = k
        out[key] = function(ret, q, **kwargs)
    return out


def _to_python(label: Any) -> Any:
    return label.item() if isinstance(label, np.generic) else label


def summarize(per_query: Mapping[str, ArrayLike], query_labels: ArrayLike) -> dict[str, Any]:
    """Micro means, macro means and per-class means of per-query metric values.

    ``per_query`` maps names to per-query arrays for the queries of ``query_labels`` (e.g. the
    output of :func:`compute_metrics`). Returns ``metrics`` (``{name: mean over queries}``),
    ``macro`` (``{name: mean of the per-class means}``), ``per_class`` (``{label: {name: mean over
    that class's queries}}``) and ``support`` (``{label: number of queries}``); labels are plain
    Python ints or strs, values floats.

    >>> s = summarize({"hit@1": [1.0, 0.0, 0.0]}, ["a", "a", "b"])
    >>> s["metrics"]["hit@1"], s["macro"]["hit@1"], s["per_class"]["a"]["hit@1"]
    (0.3333333333333333, 0.25, 0.5)
    """
    q = np.asarray(query_labels)
    if q.ndim != 1 or q.shape[0] == 0:
        raise ValueError(f"query_labels must be a non-empty 1-D array, got shape {q.shape}")
    values: dict[str, FloatArray] = {}
    for name, array in per_query.items():
        v = np.asarray(array, dtype=np.float64)
        if v.shape != q.shape:
            raise ValueError(
                f"per_query[{name!r}] has shape {v.shape} but query_labels has {q.shape}; "
                "pass per-query values for the same queries"
            )
        values[name] = v
    classes, inverse, support = np.unique(q, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    class_means = {
        name: np.bincount(inverse, weights=v, minlength=classes.shape[0]) / support
        for name, v in values.items()
    }
    return {
        "metrics": {name: float(v.mean()) for name, v in values.items()},
        "macro": {name: float(m.mean()) for name, m in class_means.items()},
        "per_class": {
            _to_python(label): {name: float(m[i]) for name, m in class_means.items()}
            for i, label in enumerate(classes)
        },
        "support": {_to_python(label): int(c) for label, c in zip(classes, support, strict=True)},
    }


# --------------------------------------------------------------------------------------------------
# uncertainty and comparison

# Resample in blocks of at most this many (resample x query) weights, to bound memory.
_BLOCK_ELEMENTS = 4_000_000


def _check_resampling(n_resamples: int, alpha: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (0.05 gives a 95% interval), got {alpha}")


def _bootstrap_means(values: FloatArray, n_resamples: int, seed: int) -> FloatArray:
    """``(n_resamples, M)`` means of ``values`` (shape ``(M, n)``) over resampled queries; all rows
    share the same resamples, so intervals of several metrics are paired."""
    n = values.shape[1]
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    means = np.empty((n_resamples, values.shape[0]), dtype=np.float64)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        size = stop - start
        drawn = rng.integers(0, n, size=(size, n))
        # How many times each query is drawn in each resample; one matmul then serves every metric.
        weights = np.bincount((np.arange(size)[:, None] * n + drawn).ravel(), minlength=size * n).reshape(size, n)
        means[start:stop] = weights @ values.T / n
    return means


def _as_values(values: ArrayLike, name: str) -> FloatArray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-query values, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} holds NaN or infinite values; pass finite per-query values")
    return v


def bootstrap_ci(
    values: ArrayLike, *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean of one metric's per-query values.

    >>> low, high = bootstrap_ci([0.0, 1.0] * 50, seed=0)
    >>> bool(0.35 < low < 0.5 < high < 0.65)
    True
    """
    low, high = bootstrap_cis({"values": values}, n_resamples=n_resamples, alpha=alpha, seed=seed)["values"]
    return low, high


def bootstrap_cis(
    per_query: Mapping[str, ArrayLike],
    *,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_ci` for many metrics at once, on the same resamples of the queries.

    ``per_query`` maps names to per-query arrays of one length (e.g. the output of
    :func:`compute_metrics`); returns ``{name: (low, high)}``. ``bootstrap_cis({"m": v}, ...)["m"]``
    equals ``bootstrap_ci(v, ...)`` for the same arguments (up to floating-point rounding).
    """
    _check_resampling(n_resamples, alpha)
    if not per_query:
        return {}
    arrays = {name: _as_values(v, f"per_query[{name!r}]") for name, v in per_query.items()}
    lengths = {v.shape[0] for v in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"per-query arrays differ in length ({sorted(lengths)}); pass values for the same queries")
    means = _bootstrap_means(np.stack(list(arrays.values())), int(n_resamples), seed)
    bounds = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return {name: (float(bounds[0, i]), float(bounds[1, i])) for i, name in enumerate(arrays)}


# Enumerate every sign pattern (exact test) up to this many paired values.
_EXACT_SIGN_FLIP_MAX = 16


def paired_test(a: ArrayLike, b: ArrayLike, *, n_resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Compare two systems on the same queries (e.g. two encoders' per-query AP).

    ``a`` and ``b`` hold the per-query values of the two systems, for the same queries in the same
    order. The p-value is from a two-sided sign-flip permutation test of the mean paired difference
    ``a - b``: under the null hypothesis each difference is as likely to have either sign. With at
    most 16 queries all ``2**Q`` sign patterns are enumerated (exact p); otherwise ``n_resamples``
    random patterns give ``p = (1 + #{|mean*| >= |mean|}) / (1 + n_resamples)``. The interval is a
    95% percentile bootstrap of the mean difference (queries resampled in pairs). Where scipy is
    installed, a Wilcoxon signed-rank p-value (``zero_method="wilcox"``: zero differences dropped)
    is reported as well; it is 1.0 when every difference is zero.

    Returns ``mean_diff`` (mean of ``a - b``), ``ci95`` (low, high), ``p_value`` (sign-flip test),
    ``p_value_wilcoxon`` (None without scipy), ``n`` and ``method``.

    >>> out = paired_test([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    >>> out["mean_diff"], out["p_value"]  # exact: 2 of the 16 sign patterns are as extreme
    (1.0, 0.125)
    """
    x = _as_values(a, "a")
    y = _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a has {x.shape[0]} values but b has {y.shape[0]}; pass per-query values of the same queries, in the same order")
    _check_resampling(n_resamples, 0.05)
    d = x - y
    n = d.shape[0]
    observed = abs(d.mean())
    # Tolerance so that sign patterns equal to the observed one up to rounding count as extreme.
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= _EXACT_SIGN_FLIP_MAX:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        flipped = np.abs(signs @ d) / n
        p_value = float(np.mean(flipped >= observed - tolerance))
        method = "exact sign-flip permutation test"
    else:
        rng = np.random.default_rng(seed)
        extreme = 0
        block = max(1, _BLOCK_ELEMENTS // n)
        for start in range(0, n_resamples, block):
            size = min(block, n_resamples - start)
            random_signs = 2.0 * rng.integers(0, 2, size=(size, n)) - 1.0
            extreme += int(np.count_nonzero(np.abs(random_signs @ d) / n >= observed - tolerance))
        p_value = (1 + extreme) / (1 + n_resamples)
        method = "random sign-flip permutation test"
    low, high = np.quantile(_bootstrap_means(d[None, :], int(n_resamples), seed)[:, 0], [0.025, 0.975])
    return {
        "mean_diff": float(d.mean()),
        "ci95": (float(low), float(high)),
        "p_value": p_value,
        "p_value_wilcoxon": _wilcoxon_p(d),
        "n": n,
        "method": method,
    }


def _wilcoxon_p(d: FloatArray) -> float | None:
    try:
        # optional: only for the extra p-value
        from scipy.stats import wilcoxon  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    if not np.any(d):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox").pvalue)


def confusion_matrix(true: ArrayLike, pred: ArrayLike, labels: ArrayLike) -> NDArray[np.int64]:
    """Count of queries per (true label, predicted label): ``int64``, shape ``(C, C)``.

    Rows are true labels, columns predicted labels (e.g. from :func:`knn_predict`), both in the
    order of ``labels``, which must hold every value of ``true`` and ``pred``, each once.

    >>> confusion_matrix(["a", "a", "b"], ["a", "b", "b"], labels=["a", "b"])
    array([[1, 1],
           [0, 1]])
    """
    t = np.asarray(true)
    p = np.asarray(pred)
    vocabulary = np.asarray(labels)
    if t.ndim != 1 or p.shape != t.shape:
        raise ValueError(f"true and pred must be 1-D of the same length, got shapes {t.shape} and {p.shape}")
    if vocabulary.ndim != 1 or vocabulary.shape[0] == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {vocabulary.shape}")
    if np.unique(vocabulary).shape[0] != vocabulary.shape[0]:
        raise ValueError("labels holds a label more than once; pass each label once")
    order = np.argsort(vocabulary, kind="stable")
    sorted_labels = vocabulary[order]
    codes = []
    for name, array in (("true", t), ("pred", p)):
        position = np.clip(np.searchsorted(sorted_labels, array), 0, sorted_labels.shape[0] - 1)
        missing = sorted_labels[position] != array
        if np.any(missing):
            raise ValueError(f"{name} holds the label {_to_python(array[missing][0])!r}, which is not in labels; add it to labels")
        codes.append(order[position])
    n_classes = vocabulary.shape[0]
    return (
        np.bincount(codes[0] * n_classes + codes[1], minlength=n_classes * n_classes)
        .reshape(n_classes, n_classes)
        .astype(np.int64)
    )
