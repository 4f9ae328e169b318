"""Tests of medsearch.evaluate.scoring: hand-computed cases, an independent library (torchmetrics)
and brute force on random data, leave-one-out with patient groups, and bad calls."""

from __future__ import annotations

import numpy as np
import pytest

from medsearch.errors import ConfigError, EncoderMismatchError, ShapeError
from medsearch.evaluate import evaluate_embeddings


def _on_line(positions, dim=2):
    """Points at the given positions on the x axis (for the l2 metric: distance = |x - x'|)."""
    out = np.zeros((len(positions), dim), dtype=np.float32)
    out[:, 0] = positions
    return out


# --------------------------------------------------------------------------------------------------
# hand-computed cases on vectors


def test_hand_computed_line():
    # Gallery at x = 1..6 with labels a a b a b b. Query at 0 (label a) sees them in order 1..6:
    # ranked a a b a b b, 3 relevant. Query at 7 (label b) sees them in order 6..1: b b a b a a.
    gallery = _on_line([1, 2, 3, 4, 5, 6])
    result = evaluate_embeddings(
        gallery, list("aababb"), _on_line([0, 7]), ["a", "b"], ks=(1, 3, 5), metric="l2", n_resamples=50
    )
    expected = {
        "hit@1": 1.0,
        "precision@3": 2 / 3,
        "recall@1": 1 / 3,  # n_relevant counts the whole gallery, not the top k
        "recall@3": 2 / 3,
        "recall@5": 1.0,
        "map@3": (1 + 1) / 3,
        "map_hits@3": 1.0,
        "map@5": (1 + 1 + 3 / 4) / 3,
        "map_hits@5": (1 + 1 + 3 / 4) / 3,
        "mmv@3": 1.0,
        "knn_acc@5": 1.0,
        "map@r": (1 + 1) / 3,
        "r_precision": 2 / 3,
        "mrr": 1.0,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(result.per_query[name], [value, value], atol=1e-12, err_msg=name)
    assert result.n_gallery == 6 and result.n_queries == 2 and result.ks == (1, 3, 5)
    assert result.support == {"a": 1, "b": 1} and result.per_class["a"]["hit@1"] == 1.0
    assert result.confusion["labels"] == ["a", "b"] and result.confusion["matrix"] == [[1, 0], [0, 1]]
    assert result.precision_curve["k"] == [1, 2, 3, 4, 5, 6]  # capped at the gallery size
    np.testing.assert_allclose(result.precision_curve["per_class"]["a"], [1, 1, 2 / 3, 3 / 4, 3 / 5, 1 / 2])


def test_ties_lenient_and_strict_votes():
    # Query label b; ranked a then b. A 1-1 tie: lenient mMV counts it, strict k-NN gives it to a.
    result = evaluate_embeddings(_on_line([1, 2]), ["a", "b"], _on_line([0]), ["b"], ks=(2,), metric="l2", n_resamples=10)
    assert result.metrics["mmv@2"] == 1.0 and result.metrics["knn_acc@2"] == 0.0
    assert result.predictions.tolist() == ["a"]


def test_query_label_absent_from_gallery_scores_zero():
    result = evaluate_embeddings(_on_line([1, 2, 3]), ["a", "a", "b"], _on_line([0, 0]), ["c", "a"], ks=(1, 3), metric="l2", n_resamples=10)
    for name, values in result.per_query.items():
        assert values[0] == 0.0, name
    assert result.settings["n_queries_without_relevant"] == 1
    assert result.confusion["labels"] == ["a", "c"]


def test_one_class_only():
    result = evaluate_embeddings(np.eye(4, dtype=np.float32), [7] * 4, np.eye(4, dtype=np.float32)[:2], [7, 7], ks=(1, 4), n_resamples=10)
    for name in ("hit@1", "precision@4", "recall@4", "map@4", "map@r", "r_precision", "ndcg@4", "knn_acc@4", "mrr"):
        assert result.metrics[name] == 1.0, name
    assert result.metrics["recall@1"] == 0.25


def test_k_larger_than_gallery_raises():
    with pytest.raises(ConfigError, match=r"k = 5 is larger than the gallery searched \(3 items\); use a smaller -k"):
        evaluate_embeddings(_on_line([1, 2, 3]), [0, 1, 0], _on_line([0]), [0], ks=(5,))
    # leave-one-out: the query's own row does not count
    with pytest.raises(ConfigError, match=r"\(2 items after leaving out each query's own cases\)"):
        evaluate_embeddings(_on_line([1, 2, 3]), [0, 1, 0], _on_line([1]), [0], ks=(3,), query_rows=[0])


def test_exact_mrr_beyond_the_results_fetched():
    # 30 gallery items, the only relevant one at rank 25: beyond max(k, 20, R) = 20 results.
    labels = ["b"] * 30
    labels[24] = "a"
    result = evaluate_embeddings(_on_line(np.arange(1, 31)), labels, _on_line([0]), ["a"], ks=(1,), metric="l2", n_resamples=10)
    assert result.settings["results_per_query"] == 20
    assert result.metrics["mrr"] == pytest.approx(1 / 25)
    assert result.metrics["map@r"] == 0.0


def test_leave_one_out_with_groups_by_hand():
    # Items 0..3 at x = 0, 1, 5, 6; labels a a a b; groups p1 p1 p2 p3.
    vectors = _on_line([0, 1, 5, 6])
    labels, groups = ["a", "a", "a", "b"], ["p1", "p1", "p2", "p3"]
    rows = np.arange(4)
    plain = evaluate_embeddings(vectors, labels, vectors, labels, ks=(1,), metric="l2", query_rows=rows, n_resamples=10)
    # Query 0: itself left out; nearest is item 1 (a): a hit; 2 relevant left (items 1, 2).
    assert plain.per_query["hit@1"][0] == 1.0 and plain.per_query["recall@1"][0] == 0.5
    grouped = evaluate_embeddings(
        vectors, labels, vectors, labels, ks=(1,), metric="l2", query_rows=rows,
        gallery_groups=groups, query_groups=groups, n_resamples=10,
    )
    # Query 0: items 0 and 1 (patient p1) left out; nearest is item 2 (a): 1 relevant left.
    assert grouped.per_query["hit@1"][0] == 1.0 and grouped.per_query["recall@1"][0] == 1.0
    # Query 3 (b): no other b anywhere.
    assert grouped.per_query["mrr"][3] == 0.0
    # Query 2 (a, alone in p2): nearest is item 3 (b), then items 1 and 0: rank of first hit 2.
    assert grouped.per_query["mrr"][2] == 0.5


def test_excluded_items_never_count_when_a_query_runs_out_of_gallery():
    # Patient p1 holds items 0-3 (a a b b); items 4-9 are b, each its own patient. Query 0 has 6
    # items left, none relevant; a b query has 7 relevant, so 7 results are fetched for every row
    # and the 7th of query 0 is its own patient's item 1 (label a): it must not count.
    vectors = _on_line([0, 0.1, 0.2, 0.3, 1, 2, 3, 4, 5, 6])
    labels = ["a", "a", "b", "b"] + ["b"] * 6
    groups = ["p1"] * 4 + [f"p{i}" for i in range(2, 8)]
    result = evaluate_embeddings(
        vectors, labels, vectors, labels, ks=(1,), metric="l2", query_rows=np.arange(10),
        gallery_groups=groups, query_groups=groups, n_resamples=10,
    )
    assert result.settings["results_per_query"] == 7
    for name in ("mrr", "map@r", "r_precision", "hit@1"):
        assert result.per_query[name][0] == 0.0, name
    assert result.settings["n_queries_without_relevant"] == 2


# --------------------------------------------------------------------------------------------------
# independent checks on random data


@pytest.mark.parametrize("k", [1, 5, 10])
def test_against_torchmetrics_full_gallery(k, random_set, cosine):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchmetrics.functional.retrieval")
    gallery, g_labels, queries, q_labels = random_set(seed=k)
    result = evaluate_embeddings(gallery, g_labels, queries, q_labels, ks=(k,), n_resamples=10)
    # torchmetrics sees the whole gallery (scores and targets), not our top-k lists; its functions
    # ignore scores <= 0, so shift cosine similarity into (0, 2].
    scores = cosine(queries, gallery) + 1.0 + 1e-6
    checks = {
        f"hit@{k}": ("retrieval_hit_rate", {"top_k": k}),
        f"precision@{k}": ("retrieval_precision", {"top_k": k}),
        f"recall@{k}": ("retrieval_recall", {"top_k": k}),
        f"map_hits@{k}": ("retrieval_average_precision", {"top_k": k}),
        f"ndcg@{k}": ("retrieval_normalized_dcg", {"top_k": k}),
        "r_precision": ("retrieval_r_precision", {}),
        "mrr": ("retrieval_reciprocal_rank", {}),
    }
    for name, (function_name, kwargs) in checks.items():
        function = getattr(functional, function_name)
        expected = [
            float(function(torch.tensor(row), torch.tensor(g_labels == q), **kwargs))
            for row, q in zip(scores, q_labels, strict=True)
        ]
        np.testing.assert_allclose(result.per_query[name], expected, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("use_groups", [False, True], ids=["self-only", "same-patient"])
def test_leave_one_out_against_brute_force(use_groups, random_set, brute_force):
    gallery, g_labels, _, _ = random_set(seed=7, n_gallery=80)
    rng = np.random.default_rng(1)
    groups = np.array([f"p{i}" for i in rng.integers(0, 25, len(gallery))], dtype=object)
    queries_rows = np.sort(rng.choice(len(gallery), 30, replace=False))
    k = 5
    result = evaluate_embeddings(
        gallery, g_labels, gallery[queries_rows], g_labels[queries_rows], ks=(k,), query_rows=queries_rows,
        gallery_groups=groups if use_groups else None,
        query_groups=groups[queries_rows] if use_groups else None, n_resamples=10,
    )
    expected = brute_force(
        gallery, g_labels, gallery[queries_rows], g_labels[queries_rows], queries_rows,
        groups, groups[queries_rows] if use_groups else None, k,
    )
    np.testing.assert_allclose(result.per_query[f"recall@{k}"], expected["recall"], atol=1e-9)
    np.testing.assert_allclose(result.per_query[f"map@{k}"], expected["map"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["map@r"], expected["map@r"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["mrr"], expected["rr"], atol=1e-9)


BAD_CALLS = [
    ("dim-mismatch", lambda: evaluate_embeddings(np.zeros((3, 2)), [0, 1, 0], np.zeros((1, 3)), [0], ks=(1,)), EncoderMismatchError, "dimension 3 but the gallery 2"),
    ("label-count", lambda: evaluate_embeddings(np.eye(3), [0, 1], np.eye(3)[:1], [0], ks=(1,)), ShapeError, r"gallery_labels must hold one label per row \(3\)"),
    ("label-kinds", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], ["0"], ks=(1,)), ShapeError, "same kind"),
    ("no-queries", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.zeros((0, 3)), [], ks=(1,)), ShapeError, "non-empty"),
    ("bad-k", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], ks=(0,)), ConfigError, "whole number >= 1"),
    ("main-metric", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], ks=(1,), main_metric="hit@7"), ConfigError, "main metric 'hit@7' is not computed"),
    ("protocol", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], protocol="trec"), ConfigError, "unknown protocol 'trec'"),
    ("one-group-side", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], ks=(1,), gallery_groups=["a", "b", "c"]), ShapeError, "give both"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_calls(call, error, message):
    with pytest.raises(error, match=message):
        call()
