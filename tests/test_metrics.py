"""Tests of medsearch.metrics: hand-computed tables, an independent library, and error paths."""

from __future__ import annotations

import ast
import doctest
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medsearch import metrics
from medsearch.metrics import (
    METRICS,
    average_precision_at_k,
    bootstrap_ci,
    bootstrap_cis,
    compute_metrics,
    confusion_matrix,
    hit_at_k,
    hits_precision_at_k,
    knn_accuracy_at_k,
    knn_predict,
    majority_vote_lenient_at_k,
    map_at_r,
    ndcg_at_k,
    paired_test,
    precision_at_k,
    r_precision,
    recall_at_k,
    reciprocal_rank,
    summarize,
)

# --------------------------------------------------------------------------------------------------
# hand-computed tables: (case id, ranked labels of one query, query label, n_relevant, k, expected)

# Worked example where Mahbod et al.'s mAP@k and standard AP@k differ.
# Ranked A B A B B, query A, 4 A's in the gallery, k = 5: hits at ranks 1 and 3,
# precision there 1/1 and 2/3, sum 5/3.
#   map_hits@5 = (5/3) / 2 hits            = 5/6  = 0.8333...
#   map@5      = (5/3) / min(5, 4 relevant) = 5/12 = 0.4166...
WORKED = ["A", "B", "A", "B", "B"]

# One class only: every result is relevant. 10 relevant in the gallery, 3 retrieved.
ONE_CLASS = ["A", "A", "A"]

# No relevant item anywhere in the gallery.
NO_RELEVANT = ["B", "B", "C"]

AT_K_CASES = [
    # hit@k
    ("hit-worked-k1", hit_at_k, WORKED, "A", 4, 1, 1.0),
    ("hit-worked-k5", hit_at_k, WORKED, "A", 4, 5, 1.0),
    ("hit-miss-k1", hit_at_k, ["B", "A"], "A", 1, 1, 0.0),
    ("hit-none", hit_at_k, NO_RELEVANT, "A", 0, 3, 0.0),
    # precision@k = hits / k
    ("precision-worked-k5", precision_at_k, WORKED, "A", 4, 5, 2 / 5),
    ("precision-worked-k3", precision_at_k, WORKED, "A", 4, 3, 2 / 3),
    ("precision-one-class", precision_at_k, ONE_CLASS, "A", 10, 3, 1.0),
    ("precision-none", precision_at_k, NO_RELEVANT, "A", 0, 3, 0.0),
    # recall@k = hits / n_relevant (gallery-wide), 0 when n_relevant = 0
    ("recall-worked-k5", recall_at_k, WORKED, "A", 4, 5, 2 / 4),
    ("recall-one-class", recall_at_k, ONE_CLASS, "A", 10, 3, 3 / 10),
    ("recall-none", recall_at_k, NO_RELEVANT, "A", 0, 3, 0.0),
    # standard AP@k
    ("map-worked-k5", average_precision_at_k, WORKED, "A", 4, 5, 5 / 12),
    # k = 3: hits 1, 3 -> (1 + 2/3) / min(3, 4) = 5/9
    ("map-worked-k3", average_precision_at_k, WORKED, "A", 4, 3, 5 / 9),
    # denominator min(3, 10) = 3, not 10
    ("map-one-class", average_precision_at_k, ONE_CLASS, "A", 10, 3, 1.0),
    ("map-none", average_precision_at_k, NO_RELEVANT, "A", 0, 3, 0.0),
    # Mahbod et al.'s mAP@k
    ("map_hits-worked-k5", hits_precision_at_k, WORKED, "A", 4, 5, 5 / 6),
    ("map_hits-worked-k3", hits_precision_at_k, WORKED, "A", 4, 3, 5 / 6),
    ("map_hits-worked-k2", hits_precision_at_k, WORKED, "A", 4, 2, 1.0),
    # only hit at rank 2: precision 1/2, one hit -> 1/2
    ("map_hits-late", hits_precision_at_k, ["B", "A", "B"], "A", 5, 3, 0.5),
    ("map_hits-none", hits_precision_at_k, NO_RELEVANT, "A", 0, 3, 0.0),
    # nDCG@5: DCG = 1/log2(2) + 1/log2(4) = 1.5;
    # ideal (min(5, 4) = 4 hits first) = 1 + 1/log2(3) + 1/log2(4) + 1/log2(5)
    (
        "ndcg-worked-k5",
        ndcg_at_k,
        WORKED,
        "A",
        4,
        5,
        1.5 / (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)),
    ),
    # ideal DCG from min(3, 1) = 1 hit: DCG = 1/log2(3) at rank 2, ideal 1
    ("ndcg-one-relevant", ndcg_at_k, ["B", "A", "B"], "A", 1, 3, 1 / math.log2(3)),
    ("ndcg-one-class", ndcg_at_k, ONE_CLASS, "A", 10, 3, 1.0),
    ("ndcg-none", ndcg_at_k, NO_RELEVANT, "A", 0, 3, 0.0),
    # reciprocal rank with a cut-off
    ("rr-worked-k5", reciprocal_rank, WORKED, "A", 4, 5, 1.0),
    ("rr-late-k3", reciprocal_rank, ["B", "B", "A"], "A", 1, 3, 1 / 3),
    ("rr-late-k2", reciprocal_rank, ["B", "B", "A"], "A", 1, 2, 0.0),
    ("rr-none", reciprocal_rank, NO_RELEVANT, "A", 0, 3, 0.0),
]

# Majority vote: (case id, ranked labels, query label, k, lenient mmv@k, strict knn_acc@k,
# knn_predict label)
VOTE_CASES = [
    # 2-2 tie between B (best rank 1) and A: lenient counts it, strict picks B
    ("tie-b-first", ["B", "A", "A", "B"], "A", 4, 1.0, 0.0, "B"),
    # 2-2 tie, A ranked first: both count it
    ("tie-a-first", ["A", "B", "B", "A"], "A", 4, 1.0, 1.0, "A"),
    # three-way tie, query's label ranked last
    ("three-way-tie", ["C", "B", "A"], "A", 3, 1.0, 0.0, "C"),
    # clear majority
    ("majority", ["B", "A", "A", "B"], "A", 3, 1.0, 1.0, "A"),
    ("minority", ["B", "B", "A", "B"], "A", 4, 0.0, 0.0, "B"),
    ("k1", ["B", "A", "A", "A"], "A", 1, 0.0, 0.0, "B"),
    # tie between two labels that are not the query's
    ("tie-others", ["B", "C", "C", "B", "A"], "A", 4, 0.0, 0.0, "B"),
    ("one-class", ["A", "A", "A"], "A", 3, 1.0, 1.0, "A"),
    ("no-relevant", ["B", "B", "C"], "A", 3, 0.0, 0.0, "B"),
]

# MAP@R and R-precision: (case id, ranked labels, query label, R, map@r, r_precision)
R_CASES = [
    # R = 3: hits at ranks 1, 3 among the first 3 -> (1 + 2/3) / 3 = 5/9; R-precision 2/3
    ("r3", ["A", "B", "A", "A", "B"], "A", 3, 5 / 9, 2 / 3),
    # R = 10, only the first 3 correct: (1 + 1 + 1) / 10 = 0.3; R-precision 3/10
    ("r10-first3", ["A"] * 3 + ["B"] * 7, "A", 10, 0.3, 0.3),
    # R = 4, hits at ranks 2 and 4 -> (1/2 + 2/4) / 4 = 1/4; R-precision 2/4;
    # the hit at rank 5 is beyond R and does not count
    ("r4-late", ["B", "A", "B", "A", "A"], "A", 4, 0.25, 0.5),
    ("one-class", ["A", "A", "A"], "A", 3, 1.0, 1.0),
    ("no-relevant", ["B", "B", "C"], "A", 0, 0.0, 0.0),
]


def _needs_n_relevant(function) -> bool:
    return function in (recall_at_k, average_precision_at_k, ndcg_at_k)


@pytest.mark.parametrize(
    ("function", "ranked", "query", "n_relevant", "k", "expected"),
    [case[1:] for case in AT_K_CASES],
    ids=[case[0] for case in AT_K_CASES],
)
def test_at_k_hand_computed(function, ranked, query, n_relevant, k, expected):
    if _needs_n_relevant(function):
        got = function([ranked], [query], [n_relevant], k=k)
    else:
        got = function([ranked], [query], k=k)
    assert got.dtype == np.float64
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, abs=1e-12)


def test_map_hits_exceeds_standard_map_on_worked_example():
    standard = average_precision_at_k([WORKED], ["A"], [4], k=5)[0]
    hits_only = hits_precision_at_k([WORKED], ["A"], k=5)[0]
    assert (standard, hits_only) == (pytest.approx(5 / 12), pytest.approx(5 / 6))


@pytest.mark.parametrize(
    ("ranked", "query", "k", "lenient", "strict", "predicted"),
    [case[1:] for case in VOTE_CASES],
    ids=[case[0] for case in VOTE_CASES],
)
def test_majority_vote_hand_computed(ranked, query, k, lenient, strict, predicted):
    assert majority_vote_lenient_at_k([ranked], [query], k=k)[0] == lenient
    assert knn_accuracy_at_k([ranked], [query], k=k)[0] == strict
    assert knn_predict([ranked], k=k)[0] == predicted


@pytest.mark.parametrize(
    ("ranked", "query", "r", "expected_map", "expected_rp"),
    [case[1:] for case in R_CASES],
    ids=[case[0] for case in R_CASES],
)
def test_map_at_r_hand_computed(ranked, query, r, expected_map, expected_rp):
    assert map_at_r([ranked], [query], [r])[0] == pytest.approx(expected_map, abs=1e-12)
    assert r_precision([ranked], [query], [r])[0] == pytest.approx(expected_rp, abs=1e-12)


def test_integer_labels_and_batches():
    retrieved = np.array([[1, 2, 1], [2, 2, 2], [3, 3, 1]])
    queries = np.array([1, 1, 3])
    assert hit_at_k(retrieved, queries, k=1).tolist() == [1.0, 0.0, 1.0]
    assert recall_at_k(retrieved, queries, [4, 0, 2], k=3).tolist() == [0.5, 0.0, 1.0]
    assert knn_predict(retrieved, k=3).tolist() == [1, 2, 3]


def test_k_larger_than_gallery_raises():
    # A gallery of 3 items: the caller can only pass 3 columns, so k = 5 is refused, not padded.
    with pytest.raises(
        ValueError, match="retrieved has 3 columns but k=5; ask the search for at least 5"
    ):
        precision_at_k([["A", "B", "A"]], ["A"], k=5)
    with pytest.raises(ValueError, match="retrieved has 3 columns"):
        compute_metrics([["A", "B", "A"]], ["A"], [2], ks=(1, 5), names=["hit@k"])


def test_map_at_r_says_how_many_columns_are_needed():
    with pytest.raises(ValueError, match=r"map@r needs at least 10 retrieved columns .* has 3"):
        map_at_r([ONE_CLASS], ["A"], [10])
    with pytest.raises(ValueError, match="r_precision needs at least 10"):
        r_precision([ONE_CLASS], ["A"], [10])


# --------------------------------------------------------------------------------------------------
# registry, report, statistics


def test_registry_names_and_order():
    assert list(METRICS) == [
        "hit@k",
        "precision@k",
        "recall@k",
        "map@k",
        "map_hits@k",
        "mmv@k",
        "knn_acc@k",
        "ndcg@k",
        "map@r",
        "r_precision",
        "mrr",
    ]
    assert metrics.__all__ == sorted(metrics.__all__)


def test_compute_metrics_keys_and_values():
    retrieved = [WORKED, ["B", "B", "A", "A", "B"]]
    out = compute_metrics(retrieved, ["A", "A"], [4, 2], ks=(1, 5))
    assert list(out) == [
        "hit@1", "hit@5", "precision@1", "precision@5", "recall@1", "recall@5", "map@1", "map@5",
        "map_hits@1", "map_hits@5", "mmv@1", "mmv@5", "knn_acc@1", "knn_acc@5", "ndcg@1", "ndcg@5",
        "map@r", "r_precision", "mrr",
    ]  # fmt: skip
    assert all(v.shape == (2,) and v.dtype == np.float64 for v in out.values())
    assert out["map@5"][0] == pytest.approx(5 / 12)
    assert out["map_hits@5"][0] == pytest.approx(5 / 6)
    assert out["mrr"].tolist() == [1.0, 1 / 3]
    # concrete names may be mixed with patterns
    subset = compute_metrics(retrieved, ["A", "A"], [4, 2], names=["map@3", "mrr"])
    assert list(subset) == ["map@3", "mrr"]
    assert subset["map@3"][0] == pytest.approx(5 / 9)


def test_summarize_micro_macro_per_class():
    per_query = {"hit@1": np.array([1.0, 0.0, 0.0, 1.0]), "mrr": np.array([1.0, 0.5, 0.0, 1.0])}
    out = summarize(per_query, np.array([0, 0, 0, 1]))
    assert out["metrics"] == {"hit@1": 0.5, "mrr": 0.625}
    # class 0: hit 1/3, mrr 0.5; class 1: hit 1, mrr 1
    assert out["per_class"][0] == pytest.approx({"hit@1": 1 / 3, "mrr": 0.5})
    assert out["per_class"][1] == {"hit@1": 1.0, "mrr": 1.0}
    assert out["macro"] == pytest.approx({"hit@1": 2 / 3, "mrr": 0.75})
    assert out["support"] == {0: 3, 1: 1}
    assert all(type(label) is int for label in out["per_class"])


def test_bootstrap_ci_brackets_mean_and_is_reproducible():
    values = np.random.default_rng(1).random(300)
    low, high = bootstrap_ci(values, n_resamples=2000, seed=3)
    assert low < values.mean() < high
    # the normal approximation gives a similar width for a mean of 300 uniforms
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(values, n_resamples=2000, seed=3) == (low, high)
    together = bootstrap_cis({"x": values, "y": 1 - values}, n_resamples=2000, seed=3)
    assert together["x"] == pytest.approx((low, high), abs=1e-12)
    # same resamples: the interval of 1 - x mirrors that of x
    assert together["y"] == pytest.approx((1 - high, 1 - low), abs=1e-12)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def test_paired_test_detects_difference_and_its_absence():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    better = paired_test(base + 0.1, base)
    assert better["mean_diff"] == pytest.approx(0.1)
    assert better["ci95"] == (pytest.approx(0.1), pytest.approx(0.1))
    assert better["p_value"] == pytest.approx(1 / 10001)
    same = paired_test(base, base)
    assert same["p_value"] == 1.0
    noise = paired_test(base, rng.permutation(base))
    assert noise["ci95"][0] < noise["mean_diff"] < noise["ci95"][1]
    assert noise["ci95"][0] < 0 < noise["ci95"][1]
    assert noise["p_value"] > 0.05


def test_paired_test_exact_small_sample():
    # differences +1, +1, +1, -1: |mean| = 0.5; sign patterns with |sum| >= 2 are the 2 all-equal
    # ones plus the 8 with exactly one sign differing -> 10 of 16.
    out = paired_test([1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    assert out["p_value"] == pytest.approx(10 / 16)
    assert out["method"] == "exact sign-flip permutation test"


def test_paired_test_wilcoxon_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy gives the optional Wilcoxon p-value")
    rng = np.random.default_rng(5)
    a, b = rng.random(50), rng.random(50)
    assert paired_test(a, b)["p_value_wilcoxon"] == pytest.approx(stats.wilcoxon(a - b).pvalue)


def test_confusion_matrix():
    true = ["a", "b", "b", "c", "c", "c"]
    pred = ["a", "a", "b", "c", "b", "c"]
    got = confusion_matrix(true, pred, labels=["c", "a", "b"])
    assert got.tolist() == [[2, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert got.dtype == np.int64


def test_knn_predict_feeds_confusion_matrix():
    retrieved = np.array([[0, 1, 1], [1, 1, 0], [0, 0, 1]])
    got = confusion_matrix([1, 1, 0], knn_predict(retrieved, k=3), labels=[0, 1])
    assert got.tolist() == [[1, 0], [0, 2]]


# --------------------------------------------------------------------------------------------------
# against independent implementations on random data


def _random_rankings(seed: int = 0, n_queries: int = 200, gallery: int = 50, n_classes: int = 4):
    """Each query ranks its whole gallery, so n_relevant can be counted exactly."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(0, n_classes, n_queries)
    # skewed class frequencies, so some queries have few or no relevant items
    ranked = rng.choice(n_classes, size=(n_queries, gallery), p=[0.55, 0.3, 0.13, 0.02])
    queries[:3] = n_classes  # a label absent from every gallery: n_relevant = 0
    n_relevant = (ranked == queries[:, None]).sum(axis=1)
    return ranked, queries, n_relevant


def _reference(ranked_row, query, n_relevant, k):
    """Loop-based reference for one query, written without the module's vectorised tricks."""
    hits, precision_sum, dcg, first = 0, 0.0, 0.0, None
    for rank, label in enumerate(ranked_row[:k], start=1):
        if label == query:
            hits += 1
            precision_sum += hits / rank
            dcg += 1 / math.log2(rank + 1)
            first = rank if first is None else first
    ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(k, n_relevant) + 1))
    votes = Counter(ranked_row[:k].tolist())
    top = max(votes.values())
    tied = {label for label, count in votes.items() if count == top}
    strict = next(label for label in ranked_row[:k].tolist() if label in tied)
    return {
        "hit": float(hits > 0),
        "precision": hits / k,
        "recall": hits / n_relevant if n_relevant else 0.0,
        "map": precision_sum / min(k, n_relevant) if n_relevant else 0.0,
        "map_hits": precision_sum / hits if hits else 0.0,
        "ndcg": dcg / ideal if ideal else 0.0,
        "rr": 1 / first if first else 0.0,
        "mmv": float(query in tied),
        "knn": float(strict == query),
    }


@pytest.mark.parametrize("k", [1, 3, 5, 10, 11, 50])
def test_against_loop_reference(k):
    ranked, queries, n_relevant = _random_rankings(seed=k)
    expected = [
        _reference(row, q, n, k) for row, q, n in zip(ranked, queries, n_relevant, strict=True)
    ]
    got = {
        "hit": hit_at_k(ranked, queries, k),
        "precision": precision_at_k(ranked, queries, k),
        "recall": recall_at_k(ranked, queries, n_relevant, k),
        "map": average_precision_at_k(ranked, queries, n_relevant, k),
        "map_hits": hits_precision_at_k(ranked, queries, k),
        "ndcg": ndcg_at_k(ranked, queries, n_relevant, k),
        "rr": reciprocal_rank(ranked, queries, k),
        "mmv": majority_vote_lenient_at_k(ranked, queries, k),
        "knn": knn_accuracy_at_k(ranked, queries, k),
    }
    for name, values in got.items():
        np.testing.assert_allclose(values, [e[name] for e in expected], atol=1e-12, err_msg=name)


def test_map_at_r_against_loop_reference():
    ranked, queries, n_relevant = _random_rankings(seed=7)
    expected_map, expected_rp = [], []
    for row, query, r in zip(ranked, queries, n_relevant, strict=True):
        # Musgrave et al.: MAP@R = (1/R) sum_{i<=R} P(i) rel(i); as AP@k with k = R, per query
        ref = _reference(row, query, r, r) if r else {"map": 0.0, "precision": 0.0}
        expected_map.append(ref["map"])
        expected_rp.append(ref["precision"])
    np.testing.assert_allclose(map_at_r(ranked, queries, n_relevant), expected_map, atol=1e-12)
    np.testing.assert_allclose(r_precision(ranked, queries, n_relevant), expected_rp, atol=1e-12)


# torchmetrics.functional.retrieval (1.9) scores one query at a time from scores and a full
# relevance vector. Conventions, checked against its source:
# - a query with no relevant item scores 0 in every function (as here);
# - retrieval_average_precision(top_k=k) divides by the hits in the top k, i.e. Mahbod et al.'s
#   map_hits@k, not standard AP@k; without top_k it is AP over the full ranking, which equals our
#   map@k at k = gallery size (denominator min(k, R) = R). Standard AP@k for k < gallery size is
#   checked against the loop reference above;
# - its functions ignore items with a score <= 0, so scores here are strictly positive;
# - MAP@R, majority votes: not in torchmetrics; loop reference only.
TORCHMETRICS_AT_K = [
    ("hit", hit_at_k, "retrieval_hit_rate"),
    ("precision", precision_at_k, "retrieval_precision"),
    ("recall", recall_at_k, "retrieval_recall"),
    ("map_hits", hits_precision_at_k, "retrieval_average_precision"),
    ("ndcg", ndcg_at_k, "retrieval_normalized_dcg"),
    ("mrr", reciprocal_rank, "retrieval_reciprocal_rank"),
]


def _torchmetrics_per_query(function_name, ranked, queries, top_k, seed=0):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchmetrics.functional.retrieval")
    function = getattr(functional, function_name)
    rng = np.random.default_rng(seed)
    gallery = ranked.shape[1]
    out = []
    for row, query in zip(ranked, queries, strict=True):
        # hand torchmetrics the gallery in a shuffled order: it must sort by score itself
        order = rng.permutation(gallery)
        scores = torch.tensor((gallery - order).astype(np.float64))  # rank 0 -> highest score
        target = torch.tensor(row[order] == query)
        kwargs = {} if top_k is None else {"top_k": top_k}
        out.append(float(function(scores, target, **kwargs)))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 5, 10, 50])
@pytest.mark.parametrize(
    ("name", "function", "torchmetrics_name"),
    TORCHMETRICS_AT_K,
    ids=[case[0] for case in TORCHMETRICS_AT_K],
)
def test_against_torchmetrics_at_k(name, function, torchmetrics_name, k):
    ranked, queries, n_relevant = _random_rankings(seed=100 + k)
    expected = _torchmetrics_per_query(torchmetrics_name, ranked, queries, k)
    if function in (recall_at_k, ndcg_at_k):
        got = function(ranked, queries, n_relevant, k)
    else:
        got = function(ranked, queries, k)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_against_torchmetrics_full_ranking():
    ranked, queries, n_relevant = _random_rankings(seed=42)
    gallery = ranked.shape[1]
    cases = [
        (
            average_precision_at_k(ranked, queries, n_relevant, gallery),
            "retrieval_average_precision",
        ),
        (r_precision(ranked, queries, n_relevant), "retrieval_r_precision"),
        (reciprocal_rank(ranked, queries), "retrieval_reciprocal_rank"),
    ]
    for got, torchmetrics_name in cases:
        expected = _torchmetrics_per_query(torchmetrics_name, ranked, queries, None)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=torchmetrics_name)


def test_against_torchmetrics_module_means():
    # The stateful classes group rows by query index, then average: compare means over queries.
    torch = pytest.importorskip("torch")
    retrieval = pytest.importorskip("torchmetrics.retrieval")
    ranked, queries, n_relevant = _random_rankings(seed=9)
    n_queries, gallery = ranked.shape
    scores = torch.tensor(np.tile(np.arange(gallery, 0, -1, dtype=np.float64), n_queries))
    target = torch.tensor((ranked == queries[:, None]).ravel())
    indexes = torch.arange(n_queries).repeat_interleave(gallery)
    k = 5
    pairs = [
        (retrieval.RetrievalPrecision(top_k=k), precision_at_k(ranked, queries, k)),
        (retrieval.RetrievalRecall(top_k=k), recall_at_k(ranked, queries, n_relevant, k)),
        (retrieval.RetrievalMAP(top_k=k), hits_precision_at_k(ranked, queries, k)),
        (retrieval.RetrievalNormalizedDCG(top_k=k), ndcg_at_k(ranked, queries, n_relevant, k)),
        (retrieval.RetrievalMRR(), reciprocal_rank(ranked, queries)),
        (retrieval.RetrievalRPrecision(), r_precision(ranked, queries, n_relevant)),
    ]
    for metric, ours in pairs:
        expected = float(metric(scores, target, indexes=indexes))
        assert ours.mean() == pytest.approx(expected, abs=1e-6), type(metric).__name__


# --------------------------------------------------------------------------------------------------
# error paths

GOOD = np.array([["A", "B", "A"], ["B", "B", "A"]])

ERROR_CASES = [
    ("retrieved-1d", lambda: hit_at_k(["A", "B"], ["A", "B"], 1), "retrieved must be 2-D"),
    ("retrieved-empty", lambda: hit_at_k(np.empty((0, 3), str), [], 1), "no queries"),
    ("retrieved-no-columns", lambda: hit_at_k(np.empty((2, 0), str), ["A", "B"], 1), "0 columns"),
    (
        "query-length",
        lambda: hit_at_k(GOOD, ["A"], 1),
        "query_labels has 1 entries but retrieved has 2",
    ),
    ("query-2d", lambda: hit_at_k(GOOD, [["A"], ["B"]], 1), "query_labels must be 1-D"),
    ("label-kinds", lambda: hit_at_k(GOOD, [1, 2], 1), "same kind"),
    ("k-zero", lambda: precision_at_k(GOOD, ["A", "B"], 0), "k must be an integer >= 1, got 0"),
    ("k-float", lambda: precision_at_k(GOOD, ["A", "B"], 2.0), "k must be an integer"),
    ("k-bool", lambda: precision_at_k(GOOD, ["A", "B"], True), "k must be an integer"),
    ("k-too-large", lambda: hit_at_k(GOOD, ["A", "B"], 4), "retrieved has 3 columns but k=4"),
    ("k-too-large-vote", lambda: knn_predict(GOOD, 11), "ask the search for at least 11 results"),
    ("n-length", lambda: recall_at_k(GOOD, ["A", "B"], [2], 1), "n_relevant has 1 entries"),
    ("n-2d", lambda: recall_at_k(GOOD, ["A", "B"], [[2, 2]], 1), "n_relevant must be 1-D"),
    ("n-negative", lambda: recall_at_k(GOOD, ["A", "B"], [2, -1], 1), "n_relevant must be >= 0"),
    ("n-fraction", lambda: recall_at_k(GOOD, ["A", "B"], [2.5, 3], 1), "whole numbers"),
    (
        "n-from-top-k",
        lambda: ndcg_at_k(GOOD, ["A", "B"], [1, 2], 1),
        r"n_relevant\[0\] = 1 but 2 .* whole gallery",
    ),
    (
        "map-r-columns",
        lambda: map_at_r(GOOD, ["A", "B"], [2, 5]),
        "needs at least 5 retrieved columns",
    ),
    (
        "unknown-name",
        lambda: compute_metrics(GOOD, ["A", "B"], [2, 2], names=["accuracy@k"]),
        "unknown metric 'accuracy@k'",
    ),
    (
        "summarize-length",
        lambda: summarize({"hit@1": [1.0]}, ["A", "B"]),
        r"per_query\['hit@1'\] has shape \(1,\)",
    ),
    ("summarize-empty", lambda: summarize({}, []), "non-empty"),
    ("bootstrap-empty", lambda: bootstrap_ci([]), "non-empty"),
    ("bootstrap-nan", lambda: bootstrap_ci([1.0, float("nan")]), "NaN"),
    ("bootstrap-alpha", lambda: bootstrap_ci([1.0], alpha=5), "alpha must be between 0 and 1"),
    ("bootstrap-resamples", lambda: bootstrap_ci([1.0], n_resamples=0), "n_resamples must be"),
    ("bootstrap-lengths", lambda: bootstrap_cis({"a": [1.0], "b": [1.0, 2.0]}), "differ in length"),
    ("paired-lengths", lambda: paired_test([1.0, 2.0], [1.0]), "a has 2 values but b has 1"),
    (
        "confusion-unknown",
        lambda: confusion_matrix(["a", "z"], ["a", "a"], labels=["a", "b"]),
        "true holds the label 'z', which is not in labels",
    ),
    ("confusion-lengths", lambda: confusion_matrix(["a"], ["a", "b"], ["a", "b"]), "same length"),
    ("confusion-repeat", lambda: confusion_matrix(["a"], ["a"], ["a", "a"]), "more than once"),
]


@pytest.mark.parametrize(
    ("call", "message"), [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES]
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------------
# module hygiene


def test_doctests():
    result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10
    assert result.failed == 0


def test_imports_numpy_only():
    # metrics sits below the index and the encoders: numpy and the standard library only
    # (scipy is imported lazily inside paired_test, for an optional p-value).
    tree = ast.parse(Path(metrics.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert top_level <= {"__future__", "collections", "inspect", "numpy", "re", "typing"}
