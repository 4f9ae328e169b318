"""medsearch.train: a few steps on tiny synthetic sets, the checkpoint back through index/query,
resume after an interruption, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import EncoderConfig, load_config
from medsearch.deid import SiteKey
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, InvalidStudyError, MedsearchError
from medsearch.search import build_index, query
from medsearch.train import _Trainer, train_encoder

SAMPLE = Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample"
# Small and quick: 32 px input, 8 images a step, 3 steps an epoch.
FAST = {"size": 32, "batch_size": 8, "steps_per_epoch": 3, "lr": 1e-3, "progress": False}


def _shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """28-px gray images: bright squares (label 0) and bright rings (label 1), with noise."""
    yy, xx = np.mgrid[:28, :28]
    images, labels = [], []
    for i in range(n):
        cy, cx = rng.integers(10, 18, size=2)
        r = rng.integers(5, 8)
        if i % 2 == 0:
            img = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        else:
            d = np.hypot(yy - cy, xx - cx)
            img = (d < r) & (d > r - 2.5)
        noisy = img * 200 + rng.normal(30, 12, size=img.shape)
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        labels.append(i % 2)
    return np.stack(images), np.asarray(labels)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "shapes.npz"
    train_x, train_y = _shapes(24, rng)
    val_x, val_y = _shapes(12, rng)
    test_x, test_y = _shapes(6, rng)
    np.savez(path, train_images=train_x, train_labels=train_y, val_images=val_x, val_labels=val_y,
             test_images=test_x, test_labels=test_y)
    return path


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


def test_selfsupervised_head_learns_alone_first_and_norm_statistics_stay(tiny_npz, tmp_path, monkeypatch):
    import torch

    start = {k: v.clone() for k, v in load_encoder(EncoderConfig(device="cpu")).net.model.state_dict().items()}
    after_epoch = []
    real = _Trainer._validate

    def spy(self, epoch):
        after_epoch.append({k: v.detach().clone() for k, v in self.net.model.state_dict().items()})
        return real(self, epoch)

    monkeypatch.setattr(_Trainer, "_validate", spy)
    report = train_encoder(tiny_npz, out=tmp_path / "ssl.pt", mode="selfsupervised", epochs=2, **FAST)
    assert report.settings["head_epochs"] == 1 and report.settings["freeze_norm"] is True
    first, second = after_epoch
    # epoch 1 trained only the projection head: the encoder is exactly as loaded, statistics and all
    assert all(torch.equal(first[k], start[k]) for k in start)
    # epoch 2 trained the encoder, but BatchNorm kept its ImageNet statistics
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in start if k.endswith("weight") and start[k].is_floating_point()]
    assert stats and all(torch.equal(second[k], start[k]) for k in stats)
    assert any(not torch.equal(second[k], start[k]) for k in weights)

    # a supervised run keeps training the statistics, from the first epoch
    after_epoch.clear()
    report = train_encoder(tiny_npz, out=tmp_path / "sup.pt", epochs=1, **FAST)
    assert report.settings["head_epochs"] == 0 and report.settings["freeze_norm"] is False
    assert any(not torch.equal(after_epoch[0][k], start[k]) for k in stats)


def test_never_reads_the_test_split(tiny_npz, tmp_path, monkeypatch):
    import medsearch.train as train_module

    seen = []
    real = train_module.load_npz_split

    def spy(path, split, **kwargs):
        seen.append(split)
        return real(path, split, **kwargs)

    monkeypatch.setattr(train_module, "load_npz_split", spy)
    train_encoder(tiny_npz, out=tmp_path / "e.pt", epochs=1, **{**FAST, "steps_per_epoch": 1})
    assert sorted(seen) == ["train", "val"]


def test_resume_after_interruption_repeats_the_same_run(tiny_npz, tmp_path, monkeypatch):
    whole = train_encoder(tiny_npz, out=tmp_path / "whole.pt", epochs=2, **FAST)

    real = _Trainer._validate

    def interrupt_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(_Trainer, "_validate", interrupt_in_second_epoch)
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        train_encoder(tiny_npz, out=out, epochs=2, **FAST)
    assert out.is_file() and (tmp_path / "cut.last.pt").is_file()
    monkeypatch.setattr(_Trainer, "_validate", real)

    resumed = train_encoder(tiny_npz, out=out, epochs=2, **FAST)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_completed == 2
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-3)

    # other settings must not resume silently
    with pytest.raises(ConfigError, match="other settings.*--no-resume"):
        train_encoder(tiny_npz, out=out, epochs=2, **{**FAST, "lr": 5e-4})
    with pytest.raises(ConfigError, match="run of 2 epochs, not 3"):
        train_encoder(tiny_npz, out=out, epochs=3, **FAST)


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
