"""medsearch.train.recipe: the mode, input size, epochs and loss picked from the data, on a table of cases."""

from __future__ import annotations

import pytest

from medsearch.errors import ConfigError
from medsearch.train.options import SupervisedLoss, TrainMode
from medsearch.train.recipe import ADAPTER_EPOCHS, FINETUNE_MAX_EPOCHS, VAL_GALLERY, DataProfile, Machine, pick_recipe

CPU, GPU = Machine(device="cpu", cores=2), Machine(device="cuda", cores=2)
M, A, S, SSL = TrainMode.AUTO, TrainMode.ADAPTER, TrainMode.SUPERVISED, TrainMode.SELFSUPERVISED
MS, CLS, SUPCON = SupervisedLoss.MULTISIMILARITY, SupervisedLoss.CLASSIFIER, SupervisedLoss.SUPCON

# (id, profile, machine, settings, expected mode, size, loss, epochs (None: not checked), a reason that must be given)
CASES = [
    ("small balanced 28 px", DataProfile(546, 78, (273, 273), 28), CPU, {},
     A, 128, MS, max(ADAPTER_EPOCHS), "too few to fine-tune"),
    ("small imbalanced", DataProfile(546, 78, (50, 496), 28), CPU, {},
     A, 128, MS, max(ADAPTER_EPOCHS), "imbalanced (9.9 to 1)"),
    ("large, CPU, 30 min", DataProfile(60000, 6000, (30000, 30000), 28), CPU, {"budget_minutes": 30},
     A, 128, MS, max(ADAPTER_EPOCHS), "over the budget"),
    ("large, CPU, 10 hours", DataProfile(20000, 2000, (10000, 10000), 28), CPU, {"budget_minutes": 600},
     S, 128, MS, FINETUNE_MAX_EPOCHS, "fine-tuning (supervised)"),
    ("large imbalanced, GPU", DataProfile(5000, 500, (500, 4500), 28), GPU, {"budget_minutes": 30},
     S, 128, MS, FINETUNE_MAX_EPOCHS, "imbalanced (9.0 to 1)"),
    ("PneumoniaMNIST, CPU, 30 min", DataProfile(3882, 524, (388, 3494), 28), CPU, {},
     S, 128, MS, 14, "fit in the budget"),
    ("mid-sized, CPU, 30 min: 128 px", DataProfile(6000, 600, (3000, 3000), 28), CPU, {},
     S, 128, MS, 9, "fit in the budget"),
    ("larger, CPU, 30 min: 64 px", DataProfile(20000, 2000, (10000, 10000), 28), CPU, {},
     S, 64, MS, None, "fine-tuning (supervised) at 64 px"),
    ("mid-sized, larger images: no fall back to 64 px", DataProfile(6000, 600, (3000, 3000), 256), CPU, {},
     A, 224, MS, None, "over the budget"),
    ("large images", DataProfile(300, 50, (150, 150), 512), CPU, {},
     A, 224, MS, None, "the encoder's own"),
    ("volumes of 28 px", DataProfile(1335, 191, (1185, 150), 28, inputs_per_case=5), CPU, {},
     A, 128, MS, None, "too few to fine-tune"),
    ("no labels", DataProfile(300, 50, (), 64), CPU, {},
     SSL, 128, MS, None, "no labels"),
    ("fine-tuning asked, small balanced", DataProfile(500, 100, (250, 250), 28), CPU, {"mode": S},
     S, 128, CLS, None, "classifier loss: a small balanced set"),
    ("fine-tuning asked, small imbalanced", DataProfile(500, 100, (50, 450), 28), CPU, {"mode": S},
     S, 128, MS, None, "imbalanced"),
    ("everything given", DataProfile(500, 100, (250, 250), 28), CPU, {"mode": S, "size": 64, "epochs": 5, "loss": SUPCON},
     S, 64, SUPCON, 5, None),
    ("adapter with a given length", DataProfile(500, 100, (250, 250), 28), CPU, {"mode": A, "epochs": 7},
     A, 128, MS, 7, "input 128 px"),
]


@pytest.mark.parametrize(("profile", "machine", "settings", "mode", "size", "loss", "epochs", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_recipe_follows_the_data(profile, machine, settings, mode, size, loss, epochs, reason):
    recipe = pick_recipe(profile, machine, **{"budget_minutes": 30, **settings})
    assert (recipe.mode, recipe.size, recipe.loss) == (mode, size, loss)
    if epochs is not None:
        assert recipe.epochs == epochs
    if reason is not None:
        assert any(reason in r for r in recipe.reasons), recipe.reasons
    else:  # everything was given: nothing was picked, no reason is invented
        assert recipe.reasons == ()
    assert recipe.budget_s == 60 * settings.get("budget_minutes", 30)
    assert recipe.folds == (min(5, min(profile.class_counts)) if mode is A else 0)
    assert all("\n" not in r for r in recipe.reasons)


def test_the_estimate_stays_within_the_budget_when_fine_tuning():
    profile = DataProfile(3000, 300, (1500, 1500), 28)
    recipe = pick_recipe(profile, CPU, budget_minutes=120)
    assert recipe.mode is S and recipe.estimate_s <= recipe.budget_s
    assert recipe.to_dict()["mode"] == "supervised" and recipe.to_dict()["reasons"] == list(recipe.reasons)


@pytest.mark.parametrize("mode", [A, S])
def test_learning_from_labels_without_labels_is_refused(mode):
    with pytest.raises(ConfigError, match="needs labels; give --labels CSV, or use --mode selfsupervised"):
        pick_recipe(DataProfile(300, 50, (), 64), CPU, budget_minutes=30, mode=mode)


def test_the_estimate_counts_each_epoch_s_validation_and_the_frozen_one():
    profile = DataProfile(3882, 524, (388, 3494), 28)
    recipe = pick_recipe(profile, CPU, budget_minutes=30)
    validated = min(profile.n_train, VAL_GALLERY) + profile.n_val  # the gallery is capped, the queries are not
    epoch = CPU.finetune_epoch_seconds(3882, 128) + CPU.validate_seconds(validated, 128)
    reference = CPU.embed_seconds(3882 + 524, 224)  # the frozen encoder at its own size
    assert recipe.estimate_s == pytest.approx(recipe.epochs * epoch + CPU.validate_seconds(validated, 128) + reference)
    assert recipe.estimate_s <= recipe.budget_s < recipe.estimate_s + epoch
