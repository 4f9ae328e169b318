"""medsearch.train.options: TrainOptions parses its enums, checks its values on entry, and
train_encoder takes it whole or field by field (an unknown field is refused by name)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from medsearch.errors import ConfigError
from medsearch.train import SupervisedLoss, TrainMode, TrainOptions, train_encoder


def test_enums_accept_their_string_values():
    options = TrainOptions(mode="selfsupervised", loss="supcon")
    assert options.mode is TrainMode.SELFSUPERVISED and options.loss is SupervisedLoss.SUPCON
    assert TrainOptions().mode is TrainMode.AUTO and TrainOptions(mode="adapter").mode is TrainMode.ADAPTER
    # left unset, the recipe picks them from the data
    assert (TrainOptions().epochs, TrainOptions().loss, TrainOptions().size) == (None, None, None)
    with pytest.raises(FrozenInstanceError):
        options.epochs = 3


BAD_OPTIONS = [
    ({"mode": "magic"}, "mode must be one of 'adapter', 'supervised', 'selfsupervised', 'auto', got 'magic'"),
    ({"budget_minutes": 0}, "budget_minutes must be positive, got 0"),
    ({"size": 8}, "size must be between 16 and 2048 pixels, got 8"),
    ({"loss": "triplet-ish"}, "loss must be one of"),
    ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ({"batch_size": 2}, "batch size must be at least 4, got 2"),
    ({"lr": 1.5}, "learning rate must be between 0 and 1, got 1.5"),
    ({"val_split": 1.0}, r"val_split must be between 0 and 1 \(a fraction\), got 1.0"),
    ({"patience": -1}, r"patience must be 0 \(never stop early\) or more, got -1"),
    ({"augment": -0.5}, r"augment must be 0 \(none\) or more, got -0.5"),
    ({"steps_per_epoch": 0}, "steps per epoch must be at least 1, got 0"),
    ({"temperature": 0}, "temperature must be positive, got 0"),
    ({"epochs": 2, "head_epochs": 2}, r"head_epochs must be at least 0 and below epochs \(2\), got 2"),
    ({"select_metric": "auc"}, "select_metric must be one of hit@1, .*, got 'auc'"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_OPTIONS, ids=[next(iter(s)) for s, _ in BAD_OPTIONS])
def test_bad_options_raise_one_line_error(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainOptions(**settings)
    assert "\n" not in str(info.value)


def test_settings_override_the_options_and_unknown_ones_are_named(tmp_path):
    # validated before anything is read: the data need not exist
    missing = tmp_path / "missing.npz"
    with pytest.raises(ConfigError, match=r"unknown training setting\(s\) 'epoch'; the settings are: .*epochs"):
        train_encoder(missing, tmp_path / "enc.pt", epoch=3)
    with pytest.raises(ConfigError, match="epochs must be at least 1, got 0"):
        train_encoder(missing, tmp_path / "enc.pt", options=TrainOptions(epochs=5), epochs=0)
    with pytest.raises(ConfigError, match="batch size must be at least 4"):
        train_encoder(missing, tmp_path / "enc.pt", options=TrainOptions(batch_size=2))
