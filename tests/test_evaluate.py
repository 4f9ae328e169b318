"""Tests of medsearch.evaluate and ``medsearch evaluate``: hand-computed cases, an independent
library (torchmetrics) and brute force on random data, npz files in every layout, leave-one-out on
the sample index, and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import Config
from medsearch.deid import SiteKey
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, InvalidStudyError, KeyFileError
from medsearch.evaluate import (
    PROTOCOLS,
    EvaluationReport,
    Protocol,
    compare_results,
    embed_npz_split,
    evaluate_embeddings,
    evaluate_index,
    evaluate_npz,
    evaluate_queries,
    parse_encoder_spec,
)
from medsearch.io import load_npz_split
from medsearch.search import build_index, embed_volume

SAMPLE = Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample"
# The exact encoder input does not matter for these tests: small images keep them quick.
SMALL = Config().replace(preprocess={"size": 32})
DOCUMENTED_KEYS = {"dataset", "protocol", "encoder", "n_gallery", "n_queries", "metrics", "per_class", "ci95"}


@pytest.fixture(scope="module")
def medmnist_dir() -> Path:
    """``shared/data/medmnist`` beside the repository (or under $MEDSEARCH_SHARED_DATA); skip if absent."""
    env = os.environ.get("MEDSEARCH_SHARED_DATA")
    root = (Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data") / "medmnist"
    if not root.is_dir():
        pytest.skip(f"MedMNIST files not found at {root}; set MEDSEARCH_SHARED_DATA to the shared/data folder")
    return root


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


@pytest.mark.parametrize("k", [1, 5, 10])
def test_against_torchmetrics_full_gallery(k):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchmetrics.functional.retrieval")
    gallery, g_labels, queries, q_labels = _random_set(seed=k)
    result = evaluate_embeddings(gallery, g_labels, queries, q_labels, ks=(k,), n_resamples=10)
    # torchmetrics sees the whole gallery (scores and targets), not our top-k lists; its functions
    # ignore scores <= 0, so shift cosine similarity into (0, 2].
    scores = _cosine(queries, gallery) + 1.0 + 1e-6
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


@pytest.mark.parametrize("use_groups", [False, True], ids=["self-only", "same-patient"])
def test_leave_one_out_against_brute_force(use_groups):
    gallery, g_labels, _, _ = _random_set(seed=7, n_gallery=80)
    rng = np.random.default_rng(1)
    groups = np.array([f"p{i}" for i in rng.integers(0, 25, len(gallery))], dtype=object)
    queries_rows = np.sort(rng.choice(len(gallery), 30, replace=False))
    k = 5
    result = evaluate_embeddings(
        gallery, g_labels, gallery[queries_rows], g_labels[queries_rows], ks=(k,), query_rows=queries_rows,
        gallery_groups=groups if use_groups else None,
        query_groups=groups[queries_rows] if use_groups else None, n_resamples=10,
    )
    expected = _brute_force(
        gallery, g_labels, gallery[queries_rows], g_labels[queries_rows], queries_rows,
        groups, groups[queries_rows] if use_groups else None, k,
    )
    np.testing.assert_allclose(result.per_query[f"recall@{k}"], expected["recall"], atol=1e-9)
    np.testing.assert_allclose(result.per_query[f"map@{k}"], expected["map"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["map@r"], expected["map@r"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["mrr"], expected["rr"], atol=1e-9)


def test_paired_comparison_of_two_systems():
    gallery, g_labels, queries, q_labels = _random_set(seed=3, n_queries=40)
    good = evaluate_embeddings(gallery, g_labels, queries, q_labels, n_resamples=10, encoder={"name": "good"})
    noisy = evaluate_embeddings(
        gallery + np.random.default_rng(0).normal(scale=3.0, size=gallery.shape).astype(np.float32),
        g_labels, queries, q_labels, n_resamples=10, encoder={"name": "noisy"},
    )
    (c,) = compare_results([good, noisy], n_resamples=200)
    assert c["metric"] == "map@r" and c["baseline"] == "good" and c["encoder"] == "noisy"
    assert c["mean_diff"] == pytest.approx(noisy.metrics["map@r"] - good.metrics["map@r"])
    assert 0.0 < c["p_value"] <= 1.0 and c["n"] == 40
    assert compare_results([good, good])[0]["mean_diff"] == 0.0
    other_queries = evaluate_embeddings(gallery, g_labels, queries[:10], q_labels[:10], n_resamples=10)
    with pytest.raises(ConfigError, match="same queries"):
        compare_results([good, other_queries])


BAD_CALLS = [
    ("dim-mismatch", lambda: evaluate_embeddings(np.zeros((3, 2)), [0, 1, 0], np.zeros((1, 3)), [0], ks=(1,)), "dimension 3 but the gallery 2"),
    ("label-count", lambda: evaluate_embeddings(np.eye(3), [0, 1], np.eye(3)[:1], [0], ks=(1,)), r"gallery_labels must hold one label per row \(3\)"),
    ("label-kinds", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], ["0"], ks=(1,)), "same kind"),
    ("no-queries", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.zeros((0, 3)), [], ks=(1,)), "non-empty"),
    ("bad-k", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], ks=(0,)), "whole number >= 1"),
    ("main-metric", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], ks=(1,), main_metric="hit@7"), "main metric 'hit@7' is not computed"),
    ("protocol", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], protocol="trec"), "unknown protocol 'trec'"),
    ("one-group-side", lambda: evaluate_embeddings(np.eye(3), [0, 1, 0], np.eye(3)[:1], [0], ks=(1,), gallery_groups=["a", "b", "c"]), "give both"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_calls(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_protocol_presets_name_their_source():
    assert set(PROTOCOLS) == set(Protocol)
    mahbod, plus = PROTOCOLS[Protocol.MAHBOD2024], PROTOCOLS[Protocol.MEDMNISTPLUS]
    assert (mahbod.gallery_split, mahbod.query_split, mahbod.vote_k, mahbod.main_metric) == ("train", "test", 5, "map_hits@5")
    assert mahbod.headline == ("map_hits@5", "mmv@5", "hit@1") and "2409.09430" in mahbod.source
    assert (plus.vote_k, plus.main_metric) == (11, "knn_acc@11") and "2404.15786" in plus.source


def test_parse_encoder_spec():
    assert parse_encoder_spec("efficientnet-lite0").name == "efficientnet-lite0"
    spec = parse_encoder_spec("resnet18:/w/r18.pt", SMALL.encoder)
    assert (spec.name, spec.checkpoint) == ("resnet18", "/w/r18.pt")
    with pytest.raises(ConfigError, match="has no name"):
        parse_encoder_spec(":x.pt")


# --------------------------------------------------------------------------------------------------
# npz files end to end (real encoder, small input)


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


@pytest.mark.parametrize(
    "shape", [(20, 20), (20, 20, 3), (6, 16, 16)], ids=["gray", "rgb", "volume-3d"]
)
def test_npz_duplicates_are_found_first(tmp_path, shape):
    path = _npz(tmp_path / "d.npz", shape, label_shape=(-1, 1))
    report = evaluate_npz(path, protocol="mahbod2024", config=SMALL, n_resamples=50)
    result = report.result
    assert isinstance(report, EvaluationReport) and report.comparisons == []
    assert (result.n_gallery, result.n_queries, result.protocol) == (12, 4, "mahbod2024")
    assert result.metrics["hit@1"] == 1.0 and result.metrics["map_hits@1"] == 1.0 and result.metrics["precision@1"] == 1.0
    assert result.settings["layout"] == {2: "gray", 3: "rgb" if shape[-1] == 3 else "volume"}[len(shape)]
    assert result.timings["images"] == 16 and result.timings["encode_s"] > 0
    data = report.to_dict()
    assert DOCUMENTED_KEYS <= set(data) and data["headline"] == ["map_hits@5", "mmv@5", "hit@1"]
    json.dumps(data)


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 3), (6, 16, 16)], ids=["gray", "rgb", "volume-3d"])
def test_batched_embedding_equals_embed_volume(tmp_path, shape):
    split = load_npz_split(_npz(tmp_path / "e.npz", shape, n_train=5), "train")
    encoder = load_encoder(SMALL.encoder)
    batched = embed_npz_split(split, encoder, SMALL, images_per_batch=3)
    one_by_one = np.stack([embed_volume(v, encoder, SMALL) for v in split.volumes()])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_npz_same_split_is_leave_one_out(tmp_path):
    # Each image twice, with its label: leaving the query out, its twin is the only relevant item.
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, (6, 20, 20), dtype=np.uint8)
    path = tmp_path / "pairs.npz"
    np.savez(path, test_images=np.concatenate([images, images]), test_labels=np.tile(np.arange(6), 2))
    result = evaluate_npz(path, gallery_split="test", query_split="test", ks=(1,), config=SMALL, n_resamples=20).result
    assert result.settings["leave_one_out"] is True and result.n_gallery == 12
    assert result.metrics["hit@1"] == 1.0 and result.metrics["recall@1"] == 1.0 and result.metrics["map@r"] == 1.0


def test_npz_limit_cache_and_two_encoders(tmp_path):
    import torch
    from monai.networks import nets

    path = _npz(tmp_path / "c.npz", (20, 20), n_train=15, n_test=10)
    checkpoint = tmp_path / "r10.pt"
    torch.manual_seed(0)
    torch.save(nets.resnet10(spatial_dims=2, n_input_channels=3, num_classes=2).state_dict(), checkpoint)
    cache = tmp_path / "cache"
    options = {"ks": (1, 3), "config": SMALL, "limit": 6, "seed": 1, "cache_dir": cache, "n_resamples": 20}
    first = evaluate_npz(path, encoders=["efficientnet-lite0", f"resnet10:{checkpoint}"], **options)
    assert [r.name for r in first.results] == ["efficientnet-lite0", "resnet10:r10.pt"]
    assert all(r.n_queries == 6 for r in first.results)
    (comparison,) = first.comparisons
    assert comparison["metric"] == "map@r" and comparison["encoder"] == "resnet10:r10.pt"
    assert len(list(cache.glob("*.npy"))) == 4  # gallery and queries, per encoder
    second = evaluate_npz(path, encoders=["efficientnet-lite0"], **options)
    assert second.result.timings.get("cache_hits") == 2 and "encode_s" not in second.result.timings
    assert second.result.metrics == first.results[0].metrics
    np.testing.assert_array_equal(second.result.query_labels, first.results[0].query_labels)
    data = first.to_dict()
    assert data["encoder"]["name"] == "efficientnet-lite0" and len(data["other_encoders"]) == 1
    assert data["comparisons"][0]["baseline"] == "efficientnet-lite0"
    frame = first.to_frame()
    assert set(frame["encoder"]) == {"efficientnet-lite0", "resnet10:r10.pt"} and {"all", "macro", "class=0"} <= set(frame["scope"])


def test_npz_figure(tmp_path):
    report = evaluate_npz(_npz(tmp_path / "f.npz", (20, 20)), ks=(1, 5), config=SMALL, n_resamples=10)
    report.save_figure(tmp_path / "out" / "fig.png")
    assert (tmp_path / "out" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="must end in .png"):
        report.save_figure(tmp_path / "fig.pdf")


NPZ_ERRORS = [
    ("missing-file", {"path": "nope.npz"}, InvalidStudyError, "does not exist"),
    ("protocol-split", {"protocol": "medmnistplus", "query_split": "val"}, ConfigError, "protocol medmnistplus uses the test split as query, not val"),
    ("missing-split", {"gallery_split": "val", "query_split": "train", "layout": "rgb"}, InvalidStudyError, "not the rgb layout"),
    ("twice", {"encoders": ["efficientnet-lite0", "EfficientNet-Lite0"]}, ConfigError, "is given twice"),
    ("unknown-encoder", {"encoders": ["vgg16"]}, ConfigError, "unknown encoder 'vgg16'"),
    ("k-too-large", {"ks": (50,)}, ConfigError, "k = 50 is larger than the gallery searched"),
]


@pytest.mark.parametrize("options, error, message", [c[1:] for c in NPZ_ERRORS], ids=[c[0] for c in NPZ_ERRORS])
def test_npz_errors(tmp_path, options, error, message):
    path = _npz(tmp_path / "x.npz", (20, 20))
    options = dict(options)
    target = tmp_path / options.pop("path") if "path" in options else path
    with pytest.raises(error, match=message):
        evaluate_npz(target, config=SMALL, **options)


def test_real_breastmnist_quick(medmnist_dir):
    # val (78 images) as the gallery keeps it quick; the protocols use train (docs/benchmarks.md).
    report = evaluate_npz(
        medmnist_dir / "breastmnist.npz", gallery_split="val", ks=(1, 5), config=SMALL, limit=20, n_resamples=50
    )
    result = report.result
    assert (result.n_gallery, result.n_queries) == (78, 20)
    assert set(result.support) <= {0, 1} and 0.0 <= result.metrics["hit@5"] <= 1.0


# --------------------------------------------------------------------------------------------------
# an index of the sample archive: leave-one-out, and queries against it


@pytest.fixture(scope="module")
def labeled_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-index")
    key = SiteKey.load(root / "k", create=True)
    build_index(SAMPLE / "tcga-luad-ct", root / "index", config=SMALL, labels=SAMPLE / "labels.csv", key=key)
    return root / "index", key


def _index_arrays(index_dir):
    from medsearch.store import IndexStore

    store = IndexStore.open(index_dir)
    return store.vectors(), store.cases["Contrast"].astype(str).to_numpy(), store.cases["patient"].to_numpy(dtype=object)


@pytest.mark.parametrize("same_patient", [False, True], ids=["own-case", "same-patient"])
def test_index_leave_one_out(labeled_index, same_patient):
    index_dir, _ = labeled_index
    result = evaluate_index(index_dir, label="Contrast", exclude_same_patient=same_patient, ks=(1, 5), n_resamples=50).result
    vectors, labels, patients = _index_arrays(index_dir)
    n = len(labels)
    assert (result.n_gallery, result.n_queries) == (n, n) == (12, 12)
    assert set(result.support) == {"True", "False"} and result.settings["exclude_same_patient"] is same_patient
    expected = _brute_force(vectors, labels, vectors, labels, np.arange(n), patients, patients if same_patient else None, 5)
    np.testing.assert_allclose(result.per_query["recall@5"], expected["recall"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["map@r"], expected["map@r"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["mrr"], expected["rr"], atol=1e-9)
    # The sample has one patient with two cases (both without contrast): excluding the patient
    # removes one relevant item from each of their queries.
    shared = [p for p in set(patients) if (patients == p).sum() > 1]
    assert result.settings["n_patients"] == (11 if same_patient else None) and len(shared) == 1


def test_index_default_label_and_errors(labeled_index, tmp_path):
    index_dir, _ = labeled_index
    assert evaluate_index(index_dir, ks=(1,), n_resamples=10).result.settings["label"] == "Contrast"
    with pytest.raises(ConfigError, match="has no label column 'Age'; its label columns: Contrast"):
        evaluate_index(index_dir, label="Age")
    with pytest.raises(ConfigError, match=r"k = 12 is larger than the gallery searched \(11 items"):
        evaluate_index(index_dir, ks=(12,))


def test_queries_against_the_index_leave_their_own_case_out(labeled_index):
    index_dir, key = labeled_index
    report = evaluate_queries(SAMPLE / "tcga-luad-ct", SAMPLE / "labels.csv", index_dir, key=key, ks=(1, 5), n_resamples=50)
    result = report.result
    assert result.n_queries == 12 and result.settings["n_queries_in_index"] == 12
    assert result.settings["exclude_own_case"] is True
    # The queries are the indexed cases themselves: the same as leave-one-out over the index.
    loo = evaluate_index(index_dir, ks=(1, 5), n_resamples=50).result
    for name in ("hit@1", "recall@5", "map@r", "mrr"):
        assert result.metrics[name] == pytest.approx(loo.metrics[name], abs=1e-6), name
    other_key = SiteKey.load(Path(str(index_dir) + "-other.key"), create=True)
    with pytest.raises(KeyFileError, match="built with another site key"):
        evaluate_queries(SAMPLE / "tcga-luad-ct", SAMPLE / "labels.csv", index_dir, key=other_key)


# --------------------------------------------------------------------------------------------------
# the command


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def small_config(tmp_path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text("[preprocess]\nsize = 32\n")
    return path


def test_cli_npz_writes_json_csv_and_figure(runner, tmp_path, small_config):
    data = _npz(tmp_path / "d.npz", (6, 16, 16))  # a 3D file, end to end
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "evaluate", str(data), "--protocol", "mahbod2024", "--config", str(small_config), "--quiet",
        "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--figure", str(out / "r.png"),
    ])
    assert result.exit_code == 0, result.output
    assert "map_hits@5" in result.stdout and "mahbod2024" in result.stdout and "per class" in result.stdout
    data_json = json.loads((out / "r.json").read_text())
    assert DOCUMENTED_KEYS <= set(data_json)
    assert data_json["metrics"]["hit@1"] == 1.0 and data_json["settings"]["layout"] == "volume"
    assert set(data_json["ci95"]) == set(data_json["metrics"]) and "0" in data_json["per_class"]
    assert (out / "r.csv").read_text().startswith("dataset,protocol,encoder,metric,scope,value")
    assert (out / "r.png").stat().st_size > 1000


def test_cli_two_encoders_side_by_side(runner, tmp_path, small_config):
    import torch
    from monai.networks import nets

    checkpoint = tmp_path / "r10.pt"
    torch.manual_seed(0)
    torch.save(nets.resnet10(spatial_dims=2, n_input_channels=3, num_classes=2).state_dict(), checkpoint)
    data = _npz(tmp_path / "d.npz", (20, 20), n_train=15, n_test=6)
    result = runner.invoke(app, [
        "evaluate", str(data), "-k", "1,3", "--config", str(small_config), "--quiet", "--limit", "5",
        "--encoder", "efficientnet-lite0", "--encoder", f"resnet10:{checkpoint}", "--json", str(tmp_path / "two.json"),
    ])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "efficientnet-lite0" in line and "resnet10:r10.pt" in line)
    assert "metric" in header
    assert "resnet10:r10.pt - efficientnet-lite0 on map@r:" in result.stdout and "p = " in result.stdout
    data_json = json.loads((tmp_path / "two.json").read_text())
    assert data_json["n_queries"] == 5 and data_json["other_encoders"][0]["encoder"]["checkpoint"] == str(checkpoint)
    assert data_json["comparisons"][0]["encoder"] == "resnet10:r10.pt"


def test_cli_index_leave_one_out(runner, labeled_index, tmp_path):
    index_dir, _ = labeled_index
    result = runner.invoke(app, [
        "evaluate", "--index", str(index_dir), "--label", "Contrast", "--exclude-same-patient", "-k", "1,5",
        "--json", str(tmp_path / "loo.json"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "loo.json").read_text())
    assert data["n_queries"] == 12 and data["ks"] == [1, 5] and data["settings"]["exclude_same_patient"] is True


CLI_ERRORS = [
    ("bad-npz", lambda p: ["evaluate", str(p / "missing.npz")], "missing.npz does not exist"),
    ("nothing", lambda p: ["evaluate"], "nothing to evaluate"),
    ("bad-k", lambda p: ["evaluate", str(_npz(p / "x.npz", (8, 8))), "-k", "1,five"], "-k takes whole numbers"),
    ("npz-only-option", lambda p: ["evaluate", "--index", str(p), "--protocol", "mahbod2024"], "--protocol apply to a DATA.npz evaluation only"),
    ("queries-without-labels", lambda p: ["evaluate", "--index", str(p), "--queries", str(p)], "--queries needs --labels"),
    ("not-an-index", lambda p: ["evaluate", "--index", str(p)], "is not a medsearch index"),
    ("bad-protocol", lambda p: ["evaluate", str(_npz(p / "x.npz", (8, 8))), "--protocol", "trec"], "unknown protocol 'trec'"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_are_one_line(runner, tmp_path, args, message):
    result = runner.invoke(app, args(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
