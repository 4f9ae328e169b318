"""medsearch.train.api: a few steps on tiny synthetic sets, the choice against the frozen encoder, the
chosen encoder back through index/query, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from train.tiny import FAST
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import EncoderConfig, load_config
from medsearch.deid import SiteKey
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, InvalidStudyError, MedsearchError
from medsearch.indexing import build_index
from medsearch.search import query
from medsearch.train import train_encoder


@pytest.mark.slow
def test_network_run_keeps_the_frozen_encoder_when_training_cannot_beat_it(tiny_npz, tmp_path):
    # squares and rings: the frozen encoder already retrieves every one right (epoch 0 scores 1.0)
    out = tmp_path / "enc.pt"
    report = train_encoder(tiny_npz, out=out, mode="supervised", epochs=3, **FAST)
    start, *epochs = report.history
    assert start["epoch"] == 0 and start["loss"] is None and start["map_hits@5"] == 1.0
    losses = [h["loss"] for h in epochs]
    assert [h["epoch"] for h in epochs] == [1, 2, 3] and losses[-1] < losses[0], losses
    assert report.chosen == "frozen" and report.verdict.startswith("no candidate beats the frozen encoder (32 px)")
    assert [c["candidate"] for c in report.candidates] == ["frozen", "fine-tuned"]
    # no checkpoint pretending to be better: the best epoch's weights are withdrawn
    assert report.checkpoint is None and not out.exists() and report.last_checkpoint.is_file()
    cfg = load_config(report.config_path)
    assert cfg.encoder.checkpoint == "" and cfg.preprocess.size == 32
    assert report.weights_sha256 == load_encoder(EncoderConfig(device="cpu")).info.weights_sha256
    record = json.loads(report.metadata_path.read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3] and record["chosen"] == "frozen"

    # run again: it resumes from the finished state and comes to the same choice
    again = train_encoder(tiny_npz, out=out, mode="supervised", epochs=3, **FAST)
    assert again.resumed_from_epoch == 3 and again.chosen == "frozen" and not out.exists()


@pytest.mark.slow
def test_network_run_compares_with_the_frozen_encoder_at_the_default_size(tiny_npz, tmp_path):
    # the recipe picks 128 px for 28 px images; the frozen encoder at 224 px is scored on the same search
    report = train_encoder(tiny_npz, out=tmp_path / "n", mode="supervised", epochs=1, **{**FAST, "size": None})
    assert report.recipe["size"] == 128
    candidates = [(c["candidate"], c["size"]) for c in report.candidates]
    assert candidates == [("frozen", 224), ("frozen-resized", 128), ("fine-tuned", 128)]
    assert all(len(c["metrics"]) == 5 for c in report.candidates)
    assert report.chosen == "frozen" and load_config(report.config_path).preprocess.size == 224


@pytest.mark.slow
def test_network_run_writes_the_trained_encoder_that_beats_frozen(stripes_npz, tmp_path):
    # faint stripes under random shapes: SimCLR's views teach the encoder to look past the shapes
    out = tmp_path / "enc"
    report = train_encoder(stripes_npz, out=out, mode="selfsupervised", epochs=3, head_epochs=0, select_metric="precision@10", **FAST)
    assert report.chosen == "self-supervised", report.verdict
    assert report.select_metric == "precision@10" and report.settings["select_metric"] == "val_loss"
    trained = report.candidates[1]
    assert trained["beats_frozen"] and trained["gain_interval"][0] > 0 and trained["epochs"] == report.best_epoch
    assert report.checkpoint == tmp_path / "enc.pt"

    # a plain EfficientNet-Lite0 state dict: load_encoder reads it strictly, hash and all
    encoder = load_encoder(EncoderConfig(name="efficientnet-lite0", checkpoint=str(report.checkpoint), device="cpu"))
    assert encoder.dim == 1280 and encoder.info.weights_sha256 == report.weights_sha256
    default = load_encoder(EncoderConfig(device="cpu"))
    assert encoder.info.weights_sha256 != default.info.weights_sha256

    # the config beside it carries the training preprocessing and the checkpoint
    cfg = load_config(report.config_path)
    assert cfg.preprocess.size == 32 and Path(cfg.encoder.checkpoint) == report.checkpoint.resolve()
    record = json.loads(report.metadata_path.read_text())
    assert record["settings"]["seed"] == 0 and record["data_sha256"] == report.data_sha256
    assert record["config"]["preprocess"]["size"] == 32 and record["recipe"]["mode"] == "selfsupervised"
    assert any("evaluate" in c and str(report.config_path) in c for c in report.follow_up())


@pytest.mark.slow
def test_dicom_archive_run_serves_index_and_query(tmp_path):
    archive = SAMPLE / "tcga-luad-ct"
    report = train_encoder(archive, out=tmp_path / "ct", labels=SAMPLE / "labels.csv", val_split=0.3, size=32, progress=False)
    assert report.mode == "adapter" and report.n_train >= 4 and report.n_val >= 1
    assert report.candidates[0]["candidate"] == "frozen"
    key = SiteKey.load(tmp_path / "k", create=True)
    index = tmp_path / "index"
    built = build_index(archive, index, config=report.config_path, labels=SAMPLE / "labels.csv", key=key)
    # the same cases as training saw (13 files, one a byte-identical duplicate)
    assert built.n_cases_total == report.n_train + report.n_val
    study = sorted(archive.glob("*.dcm"))[0]
    result = query(study, index, k=3)
    assert len(result.results) == 3 and result.results[0].distance == pytest.approx(0.0, abs=1e-4)
    assert any(c.startswith("medsearch index") and "--config" in c for c in report.follow_up(labels="labels.csv"))


@pytest.mark.slow
def test_selfsupervised_without_labels_says_it_cannot_compare(tmp_path):
    report = train_encoder(
        SAMPLE / "tcga-luad-ct", out=tmp_path / "ssl", epochs=2, val_split=0.3, **{**FAST, "batch_size": 4, "steps_per_epoch": 1}
    )
    assert report.mode == "selfsupervised" and report.chosen == "self-supervised" and report.candidates == []
    assert report.verdict.startswith("no validation labels: the run cannot tell whether the self-supervised encoder beats")
    assert report.checkpoint is not None and report.checkpoint.is_file()
    assert any("no labels" in r for r in report.recipe["reasons"])


def _npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp_path: Path, tiny_npz: Path) -> dict[str, tuple[dict, type[MedsearchError], str]]:
    img = np.random.default_rng(1).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    lab = np.array([0, 1, 0, 1, 0, 1])
    return {
        "missing file": ({"data": tmp_path / "nope.npz"}, InvalidStudyError, "does not exist"),
        "no train split": ({"data": _npz(tmp_path, "no-train", test_images=img, test_labels=lab)}, InvalidStudyError, "no train split"),
        "too few images": (
            {"data": _npz(tmp_path, "three", train_images=img[:3], train_labels=lab[:3], val_images=img[:2], val_labels=lab[:2])},
            ConfigError, "only 3 training image",
        ),
        "one class": (
            {"data": _npz(tmp_path, "one-class", train_images=img, train_labels=np.zeros(6, int), val_images=img[:2], val_labels=lab[:2])},
            ConfigError, "at least 2 classes.*selfsupervised",
        ),
        "one class, supervised": (
            {"data": _npz(tmp_path, "one-class-s", train_images=img, train_labels=np.zeros(6, int), val_images=img[:2], val_labels=lab[:2]),
             "mode": "supervised"},
            ConfigError, "supervised training needs at least 2 classes",
        ),
        "archive without labels, supervised": ({"data": SAMPLE / "tcga-luad-ct", "mode": "supervised"}, ConfigError, "needs labels"),
        "labels file missing": ({"data": SAMPLE / "tcga-luad-ct", "labels": tmp_path / "none.csv"}, ConfigError, "labels file .* does not exist"),
        "labels with an npz": ({"data": tiny_npz, "labels": SAMPLE / "labels.csv"}, ConfigError, "carries its own labels"),
        "unknown mode": ({"data": tiny_npz, "mode": "magic"}, ConfigError, "mode must be one of"),
        "unknown loss": ({"data": tiny_npz, "loss": "triplet-ish"}, ConfigError, "loss must be one of"),
        "bad select metric": ({"data": tiny_npz, "select_metric": "auc"}, ConfigError, "select_metric must be one of"),
        "other encoder": ({"data": tiny_npz, "config": "resnet"}, ConfigError, "no config file or preset"),
        "head epochs without a head": ({"data": tiny_npz, "mode": "supervised", "loss": "multisimilarity", "epochs": 2, "head_epochs": 1}, ConfigError, "no head to train alone"),
        "head epochs, all of them": ({"data": tiny_npz, "mode": "selfsupervised", "head_epochs": 1}, ConfigError, "below epochs"),
        "adapter without labels": ({"data": SAMPLE / "tcga-luad-ct", "mode": "adapter"}, ConfigError, "adapter training needs labels"),
        "adapter with the classifier loss": ({"data": tiny_npz, "mode": "adapter", "loss": "classifier"}, ConfigError, "classifier loss is for --mode supervised"),
        "out with another suffix": ({"data": tiny_npz, "out": tmp_path / "enc.bin"}, ConfigError, r"must end in \.pt or have no suffix"),
        "out is a folder": ({"data": tiny_npz, "out": tmp_path}, ConfigError, "is a folder"),
    }


BAD = [
    "missing file", "no train split", "too few images", "one class", "one class, supervised",
    "archive without labels, supervised", "labels file missing", "labels with an npz", "unknown mode", "unknown loss",
    "bad select metric", "other encoder", "head epochs without a head", "head epochs, all of them",
    "adapter without labels", "adapter with the classifier loss", "out with another suffix", "out is a folder",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_one_line_error(tmp_path, tiny_npz, case):
    kwargs, error, match = _bad_inputs(tmp_path, tiny_npz)[case]
    kwargs = {"out": tmp_path / "enc.pt", "epochs": 1, **FAST, **kwargs}
    with pytest.raises(error, match=match) as info:
        train_encoder(**kwargs)
    assert "\n" not in str(info.value)


def test_cli_train_json_and_error(tiny_npz, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.pt"
    result = runner.invoke(app, ["train", str(tiny_npz), "--out", str(out), "--mode", "supervised", "--size", "32",
                                 "--epochs", "1", "--batch-size", "8", "--steps-per-epoch", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chosen"] == "frozen" and data["checkpoint"] is None and data["epochs_completed"] == 1
    assert data["config_path"] == str(tmp_path / "cli.toml") and data["recipe"]["mode"] == "supervised"
    assert any(c.startswith("medsearch evaluate") for c in data["next"])

    bad = runner.invoke(app, ["train", str(tmp_path / "missing.npz"), "--out", str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
