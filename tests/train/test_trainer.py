"""medsearch.train.trainer: the head learns alone first, BatchNorm statistics stay, and resume after an
interruption repeats the same run."""

from __future__ import annotations

import pytest
from train.tiny import FAST

from medsearch.config import EncoderConfig
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError
from medsearch.train import train_encoder
from medsearch.train.trainer import Trainer


@pytest.mark.slow
def test_selfsupervised_head_learns_alone_first_and_norm_statistics_stay(tiny_npz, tmp_path, monkeypatch):
    import torch

    start = {k: v.clone() for k, v in load_encoder(EncoderConfig(device="cpu")).net.model.state_dict().items()}
    after_epoch = []
    real = Trainer._validate

    def spy(self, epoch, *, frozen=False):
        if not frozen:  # epoch 0 scores the encoder as loaded
            after_epoch.append({k: v.detach().clone() for k, v in self.net.model.state_dict().items()})
        return real(self, epoch, frozen=frozen)

    monkeypatch.setattr(Trainer, "_validate", spy)
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
    report = train_encoder(tiny_npz, out=tmp_path / "sup.pt", mode="supervised", epochs=1, **FAST)
    assert report.settings["head_epochs"] == 0 and report.settings["freeze_norm"] is False
    assert any(not torch.equal(after_epoch[0][k], start[k]) for k in stats)


@pytest.mark.slow
def test_resume_after_interruption_repeats_the_same_run(tiny_npz, tmp_path, monkeypatch):
    run = {"mode": "supervised", "epochs": 2, **FAST}
    whole = train_encoder(tiny_npz, out=tmp_path / "whole.pt", **run)

    real = Trainer._validate

    def interrupt_in_second_epoch(self, epoch, *, frozen=False):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, frozen=frozen)

    monkeypatch.setattr(Trainer, "_validate", interrupt_in_second_epoch)
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        train_encoder(tiny_npz, out=out, **run)
    assert out.is_file() and (tmp_path / "cut.last.pt").is_file()
    monkeypatch.setattr(Trainer, "_validate", real)

    resumed = train_encoder(tiny_npz, out=out, **run)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_completed == 2
    assert [h["loss"] for h in resumed.history[1:]] == pytest.approx([h["loss"] for h in whole.history[1:]], rel=1e-3)
    assert resumed.candidates == whole.candidates and resumed.chosen == whole.chosen

    # other settings must not resume silently
    with pytest.raises(ConfigError, match="other settings.*--no-resume"):
        train_encoder(tiny_npz, out=out, **{**run, "lr": 5e-4})
    with pytest.raises(ConfigError, match="run of 2 epochs, not 3"):
        train_encoder(tiny_npz, out=out, **{**run, "epochs": 3})


@pytest.mark.slow
def test_budget_stops_fine_tuning(tiny_npz, tmp_path, monkeypatch):
    import medsearch.train.trainer as trainer_module

    clock = iter(range(0, 10_000, 40))  # every reading of the clock is 40 s later: an epoch takes ~40 s
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    report = train_encoder(tiny_npz, out=tmp_path / "b", mode="supervised", epochs=5, budget_minutes=0.1, **FAST)
    assert report.stopped_by_budget and report.epochs_completed < 5
