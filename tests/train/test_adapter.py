"""medsearch.train.adapter and the adapter run: the frozen encoder is kept when nothing can be learned,
and an adapter that wins goes into the config, through index, query and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tomllib
from conftest import SAMPLE
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import load_config
from medsearch.deid import SiteKey
from medsearch.encoders import AdaptedEncoder, load_encoder
from medsearch.errors import EncoderMismatchError
from medsearch.evaluate import evaluate_index, evaluate_npz
from medsearch.indexing import build_index
from medsearch.search import query
from medsearch.train import train_encoder
from medsearch.train.adapter import _folds

ADAPTER = {"size": 32, "mode": "adapter", "progress": False}


@pytest.mark.slow
def test_frozen_is_chosen_when_labels_are_shuffled(shuffled_npz, tmp_path):
    out = tmp_path / "shuffled"
    (tmp_path / "shuffled.adapter.pt").write_bytes(b"an adapter of an earlier run")
    # the recipe picks 128 px for these 28 px images; the frozen default (224 px) stays the reference
    report = train_encoder(shuffled_npz, out=out, mode="adapter", progress=False)
    assert report.recipe["size"] == 128 and report.chosen == "frozen"
    assert report.verdict.startswith("no candidate beats the frozen encoder (224 px) by more than the noise")
    assert "\n" not in report.verdict
    # every candidate is reported with its interval; none beats frozen
    names = [(c["candidate"], c["size"]) for c in report.candidates]
    assert names == [("frozen", 224), ("frozen-resized", 128), ("adapter-linear", 128), ("adapter-mlp", 128)]
    assert not any(c["beats_frozen"] for c in report.candidates)
    assert all(c["ci95"][0] <= c["metrics"]["map_hits@5"] <= c["ci95"][1] for c in report.candidates)
    # the frozen default config, and no adapter file pretending to be better (the earlier one is withdrawn)
    cfg = load_config(report.config_path)
    assert cfg.encoder.adapter == "" and cfg.encoder.checkpoint == "" and cfg.preprocess.size == 224
    assert report.adapter is None and not (tmp_path / "shuffled.adapter.pt").exists()
    record = json.loads(report.metadata_path.read_text())
    assert record["chosen"] == "frozen" and record["verdict"] == report.verdict
    assert record["details"]["cross_validation"]["queries"] == 90  # every train and val case, once


@pytest.mark.slow
def test_adapter_round_trip_index_query_evaluate(stripes_npz, tmp_path):
    report = train_encoder(stripes_npz, out=tmp_path / "stripes", select_metric="precision@10", **ADAPTER)
    assert report.chosen.startswith("adapter-"), report.verdict
    chosen = next(c for c in report.candidates if c["chosen"])
    assert chosen["beats_frozen"] and chosen["gain_interval"][0] > 0
    assert report.adapter == tmp_path / "stripes.adapter.pt" and report.adapter.is_file()

    # the config names the adapter and its hash; the encoder it loads applies it
    cfg = load_config(report.config_path)
    assert cfg.encoder.adapter == str(report.adapter.resolve()) and cfg.encoder.adapter_sha256 == report.weights_sha256
    encoder = load_encoder(cfg.encoder)
    frozen = load_encoder(load_config().encoder)
    assert isinstance(encoder, AdaptedEncoder) and encoder.info.adapter_sha256 == report.weights_sha256
    assert encoder.info.weights_sha256 != frozen.info.weights_sha256

    # index the sample archive through it, query, evaluate
    key = SiteKey.load(tmp_path / "k", create=True)
    index = tmp_path / "index"
    build_index(SAMPLE / "tcga-luad-ct", index, config=report.config_path, labels=SAMPLE / "labels.csv", key=key)
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["encoder"]["adapter_sha256"] == report.weights_sha256
    assert manifest["dim"] == encoder.dim
    study = sorted((SAMPLE / "tcga-luad-ct").glob("*.dcm"))[0]
    result = query(study, index, k=3)  # through the config the index recorded: with the adapter
    assert len(result.results) == 3 and result.results[0].distance == pytest.approx(0.0, abs=1e-4)
    assert evaluate_index(index, ks=[1, 3]).results[0].n_queries >= 10
    # a query without the adapter is refused: another embedding space
    plain = tmp_path / "plain.toml"
    plain.write_text(report.config_path.read_text().replace(str(report.adapter.resolve()), "").replace(report.weights_sha256, ""))
    assert load_config(plain).encoder.adapter == ""
    with pytest.raises(EncoderMismatchError):
        query(study, index, k=3, config=plain)

    # evaluate on the npz's test split, through the adapter config
    scored = evaluate_npz(stripes_npz, config=report.config_path, ks=[1, 5], progress=False).results[0]
    assert scored.encoder["weights_sha256"] == encoder.info.weights_sha256 and scored.n_queries == 12


@pytest.mark.slow
def test_adapter_file_swapped_after_training_is_refused(stripes_npz, tmp_path):
    report = train_encoder(stripes_npz, out=tmp_path / "a", select_metric="precision@10", **ADAPTER)
    assert report.adapter is not None
    report.adapter.write_bytes(report.adapter.read_bytes() + b"\0")
    from medsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="is not the one this config records"):
        load_encoder(load_config(report.config_path).encoder)


@pytest.mark.slow
def test_cli_json_carries_recipe_candidates_and_choice(shuffled_npz, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", str(shuffled_npz), "--out", str(out), "--size", "32", "--budget-minutes", "5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["recipe"]["mode"] == "adapter" and data["recipe"]["budget_s"] == 300
    assert data["recipe"]["reasons"] and data["chosen"] == "frozen"
    assert {c["candidate"] for c in data["candidates"]} == {"frozen", "adapter-linear", "adapter-mlp"}
    for c in data["candidates"]:
        assert set(c) >= {"metrics", "ci95", "gain_over_frozen", "gain_interval", "chosen"}
    assert data["config_path"] == str(out) + ".toml" and data["checkpoint"] is None
    toml = tomllib.loads((tmp_path / "cli.toml").read_text())
    assert toml["encoder"]["adapter"] == "" and toml["preprocess"]["size"] == 32

    shown = CliRunner().invoke(app, ["train", str(shuffled_npz), "--out", str(out), "--size", "32", "-q"])
    assert shown.exit_code == 0, shown.output
    assert "recipe: adapter" in shown.stdout and "no candidate beats the frozen encoder" in shown.stdout


def test_folds_are_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    folds = _folds(labels, 3, seed=0)
    assert np.array_equal(folds, _folds(labels, 3, seed=0))
    for c in (0, 1, 2):
        counts = np.bincount(folds[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
