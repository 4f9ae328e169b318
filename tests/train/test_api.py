"""medsearch.train.api: a few steps on tiny synthetic sets, the checkpoint back through index/query,
and one-line errors for bad input."""

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


@pytest.mark.parametrize("mode", ["supervised", "selfsupervised"])
def test_loss_falls_and_checkpoint_loads(tiny_npz, tmp_path, mode):
    out = tmp_path / "enc.pt"
    # Every epoch trains the encoder (a first head-only epoch, the self-supervised default, scores
    # its loss on fixed features: not comparable with the later epochs' on 3 steps of 8 images).
    report = train_encoder(tiny_npz, out=out, mode=mode, epochs=3, head_epochs=0, **FAST)
    losses = [h["loss"] for h in report.history]
    assert report.mode == mode and report.epochs_completed == 3
    assert losses[-1] < losses[0], losses
    # the validation search ran on labelled val images in both modes
    assert all("knn_acc@11" in h for h in report.history)
    if mode == "selfsupervised":
        assert report.select_metric == "val_loss" and all("val_loss" in h for h in report.history)

    # a plain EfficientNet-Lite0 state dict: load_encoder reads it strictly, hash and all
    encoder = load_encoder(EncoderConfig(name="efficientnet-lite0", checkpoint=str(out), device="cpu"))
    assert encoder.dim == 1280 and encoder.info.weights_sha256 == report.weights_sha256
    default = load_encoder(EncoderConfig(device="cpu"))
    assert encoder.info.weights_sha256 != default.info.weights_sha256

    # the config beside it carries the training preprocessing and the checkpoint
    cfg = load_config(report.config_path)
    assert cfg.preprocess.size == 32 and Path(cfg.encoder.checkpoint) == out.resolve()
    record = json.loads(report.metadata_path.read_text())
    assert record["settings"]["seed"] == 0 and record["data_sha256"] == report.data_sha256
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
    assert record["config"]["preprocess"]["size"] == 32
    assert any("evaluate" in c and str(report.config_path) in c for c in report.follow_up())


def test_dicom_archive_checkpoint_serves_index_and_query(tmp_path):
    archive = SAMPLE / "tcga-luad-ct"
    out = tmp_path / "ct.pt"
    report = train_encoder(
        archive, out=out, labels=SAMPLE / "labels.csv", epochs=1, val_split=0.3,
        **{**FAST, "batch_size": 4, "steps_per_epoch": 2},
    )
    assert report.mode == "supervised" and report.n_train >= 4 and report.n_val >= 1
    key = SiteKey.load(tmp_path / "k", create=True)
    index = tmp_path / "index"
    built = build_index(archive, index, config=report.config_path, labels=SAMPLE / "labels.csv", key=key)
    # the same cases as training saw (13 files, one a byte-identical duplicate)
    assert built.n_cases_total == report.n_train + report.n_val
    study = sorted(archive.glob("*.dcm"))[0]
    result = query(study, index, k=3)
    assert len(result.results) == 3 and result.results[0].distance == pytest.approx(0.0, abs=1e-4)
    assert any(c.startswith("medsearch index") and "--config" in c for c in report.follow_up(labels="labels.csv"))


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
        "archive without labels, supervised": ({"data": SAMPLE / "tcga-luad-ct", "mode": "supervised"}, ConfigError, "needs labels"),
        "labels file missing": ({"data": SAMPLE / "tcga-luad-ct", "labels": tmp_path / "none.csv"}, ConfigError, "labels file .* does not exist"),
        "labels with an npz": ({"data": tiny_npz, "labels": SAMPLE / "labels.csv"}, ConfigError, "carries its own labels"),
        "unknown mode": ({"data": tiny_npz, "mode": "magic"}, ConfigError, "mode must be one of"),
        "unknown loss": ({"data": tiny_npz, "loss": "triplet-ish"}, ConfigError, "loss must be one of"),
        "checkpoint not .pt": ({"data": tiny_npz, "out": tmp_path / "enc.bin"}, ConfigError, r"must end in \.pt"),
        "bad select metric": ({"data": tiny_npz, "select_metric": "auc"}, ConfigError, "select_metric must be one of"),
        "other encoder": ({"data": tiny_npz, "config": "resnet"}, ConfigError, "no config file or preset"),
        "head epochs without a head": ({"data": tiny_npz, "epochs": 2, "head_epochs": 1}, ConfigError, "no head to train alone"),
        "head epochs, all of them": ({"data": tiny_npz, "mode": "selfsupervised", "head_epochs": 1}, ConfigError, "below epochs"),
    }


BAD = [
    "missing file", "no train split", "too few images", "one class", "archive without labels, supervised",
    "labels file missing", "labels with an npz", "unknown mode", "unknown loss", "checkpoint not .pt",
    "bad select metric", "other encoder", "head epochs without a head", "head epochs, all of them",
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
    result = runner.invoke(app, ["train", str(tiny_npz), "--out", str(out), "--size", "32", "--epochs", "1",
                                 "--batch-size", "8", "--steps-per-epoch", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["checkpoint"] == str(out) and data["epochs_completed"] == 1
    assert any(c.startswith("medsearch evaluate") for c in data["next"])

    bad = runner.invoke(app, ["train", str(tmp_path / "missing.npz"), "--out", str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
