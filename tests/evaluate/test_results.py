"""Tests of medsearch.evaluate.results: paired comparisons of results, and the figure."""

from __future__ import annotations

import numpy as np
import pytest

from medsearch.config import Config
from medsearch.errors import ConfigError
from medsearch.evaluate import compare_results, evaluate_embeddings, evaluate_npz

# The exact encoder input does not matter for these tests: small images keep them quick.
SMALL = Config().replace(preprocess={"size": 32})


def test_paired_comparison_of_two_systems(random_set):
    gallery, g_labels, queries, q_labels = random_set(seed=3, n_queries=40)
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


def test_npz_figure(tmp_path, make_npz):
    report = evaluate_npz(make_npz(tmp_path / "f.npz", (20, 20)), ks=(1, 5), config=SMALL, n_resamples=10)
    report.save_figure(tmp_path / "out" / "fig.png")
    assert (tmp_path / "out" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="must end in .png"):
        report.save_figure(tmp_path / "fig.pdf")
