"""The recipe a run follows when it is not told: mode, input size, epochs and loss, chosen from the data.

:func:`pick_recipe` is a pure function of a :class:`DataProfile` (how many cases, their classes, the
image size), a :class:`Machine` (how fast it embeds and trains) and the time budget; every setting
the user gave is kept as given. The :class:`Recipe` it returns says what it picked and why, in
sentences the command prints, and how long it expects the run to take.

The rules:

* **Mode.** Without labels: self-supervised (SimCLR). With labels: an *adapter* on the frozen
  encoder's embeddings, unless the set is large enough for fine-tuning to be selected reliably
  (:data:`FINETUNE_MIN_CASES` training cases) and :data:`FINETUNE_MIN_EPOCHS` epochs of it fit in
  the budget on this machine. An adapter embeds each image once and trains in seconds to minutes on
  a CPU; it cannot destroy the pretrained features, and its selection by cross-validation over
  train and val together is far less noisy than the choice of an epoch on a small val split. Where
  a set is large enough, fine-tuning is worth more than an adapter (PneumoniaMNIST, 3,882 training
  images: fine-tuned at 128 px by this recipe, mAP@5 90.4 on test; the adapter at 128 px, 83.9).
* **Input size.** Small images (at most 64 px a side, as MedMNIST's 28 px) go in at 128 px: 224
  adds no detail to an upscaled 28 px image and costs three times as much. When fine-tuning at 128
  px does not fit the budget, small images are fine-tuned at 64 px (3 times cheaper an epoch)
  before the recipe falls back to an adapter. Larger images keep the encoder's 224 px.
* **Epochs.** An adapter's are chosen by cross-validation among :data:`ADAPTER_EPOCHS`. Fine-tuning
  takes as many as fit in the budget, at most 20.
* **Loss.** Multi-Similarity (with its miner) for adapters, and for fine-tuning on imbalanced or
  larger sets; a classifier head for fine-tuning on a small balanced set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medsearch.errors import ConfigError
from medsearch.train.options import SupervisedLoss, TrainMode

__all__ = [
    "ADAPTER_EPOCHS",
    "FINETUNE_MIN_CASES",
    "FINETUNE_MIN_EPOCHS",
    "VAL_GALLERY",
    "DataProfile",
    "Machine",
    "Recipe",
    "pick_recipe",
]

#: Fewer training cases than this: an adapter rather than fine-tuning (a val split of a few
#: hundred cases cannot tell a better epoch from a lucky one).
FINETUNE_MIN_CASES = 2000
#: Fine-tuning only when at least this many epochs fit in the budget (every PneumoniaMNIST
#: fine-tuning measured, at 64, 128 and 224 px, chose epoch 4 to 6 on val: docs/benchmarks/training.md).
FINETUNE_MIN_EPOCHS = 6
#: The most epochs a run fine-tunes for when the budget allows more.
FINETUNE_MAX_EPOCHS = 20
#: The adapter lengths cross-validation chooses from (epochs over the cached embeddings).
ADAPTER_EPOCHS = (3, 6, 12, 25)
#: Images at most this many pixels a side are upscaled to SMALL_IMAGE_SIZE, not to 224.
SMALL_IMAGE_SIDE = 64
SMALL_IMAGE_SIZE = 128
#: Small images are fine-tuned at this size when SMALL_IMAGE_SIZE does not fit the budget.
SMALL_FINETUNE_SIZE = 64
DEFAULT_SIZE = 224
#: At most this many training cases (a seeded subset) form the gallery the val cases search after
#: each epoch, so that a large training set does not make each validation as slow as the epoch.
VAL_GALLERY = 2000
#: Class imbalance (largest class / smallest) from which the run says the set is imbalanced.
IMBALANCED = 3.0


@dataclass(frozen=True)
class DataProfile:
    """What the recipe reads of the data.

    Attributes
    ----------
    n_train, n_val : int
        Training and validation cases (an npz's splits; an archive's held-out patients).
    class_counts : tuple of int
        Training cases per class; empty without labels.
    image_side : int
        The larger in-plane side of the images, in pixels.
    inputs_per_case : int, default 1
        Encoder inputs per case (the slices of a volume; 1 for a 2D image).
    """

    n_train: int
    n_val: int
    class_counts: tuple[int, ...]
    image_side: int
    inputs_per_case: int = 1

    @property
    def has_labels(self) -> bool:
        return len(self.class_counts) > 0

    @property
    def imbalance(self) -> float:
        """Largest class over smallest (1.0 for balanced, or without labels)."""
        present = [c for c in self.class_counts if c > 0]
        return max(present) / min(present) if present else 1.0


@dataclass(frozen=True)
class Machine:
    """How fast this machine embeds and fine-tunes, to estimate a run's time.

    The defaults are measured on a 2-core VM without a GPU, alone (``benchmarks/train_speed.py``,
    rounded up by about 5%): ONNX Runtime embeds about 100 images a second at 224 px (an adapter's
    one pass); a fine-tuning epoch (augmentations, forward, backward, the optimizer's step) takes
    0.006 s an image at 64 px, 0.019 at 128 and 0.09 at 224; the validation after each epoch (the
    network in training embedding the gallery and the val cases) 0.003 s an image at 64 px, 0.013
    at 128 and 0.045 at 224. In between, interpolated; beyond 224, in proportion to the pixel count.
    All scale with the number of cores; a GPU is taken as 30 times faster (not measured here).

    ``slack`` multiplies the fine-tuning and validation times: a full-size run is slower per image
    than the benchmark's short one. PneumoniaMNIST's default run (3,882 training cases at 128 px)
    took a median 119 s an epoch where the figures above give 104 s, and 46 s for its first
    validation where they give 33 s; planned without slack, its 16 epochs did not fit in the 30
    minutes and the budget cut the learning-rate schedule short at 14.
    """

    device: str = "cpu"
    cores: int = 2
    embed_per_s_224: float = 100.0
    finetune_s_per_image: tuple[tuple[int, float], ...] = ((64, 0.006), (128, 0.019), (224, 0.09))
    validate_s_per_input: tuple[tuple[int, float], ...] = ((64, 0.003), (128, 0.013), (224, 0.045))
    slack: float = 1.15

    def _speedup(self) -> float:
        return max(1, self.cores) / 2

    def _network_speedup(self) -> float:
        return 30.0 if self.device == "cuda" else self._speedup()

    def embed_seconds(self, n_inputs: int, size: int) -> float:
        return n_inputs / (self.embed_per_s_224 * self._speedup()) * (size / 224) ** 2

    def finetune_epoch_seconds(self, n_inputs: int, size: int) -> float:
        return self.slack * n_inputs * _per_input(self.finetune_s_per_image, size) / self._network_speedup()

    def validate_seconds(self, n_inputs: int, size: int) -> float:
        return self.slack * n_inputs * _per_input(self.validate_s_per_input, size) / self._network_speedup()

    def adapter_seconds(self, n_inputs: int, folds: int) -> float:
        """Cross-validation of two adapter kinds, then the members of the chosen one (1 thread)."""
        steps = math.ceil(n_inputs / 128) * max(ADAPTER_EPOCHS)
        return 0.01 * steps * (2 * folds + 5)


@dataclass(frozen=True)
class Recipe:
    """What a run does, and why.

    Attributes
    ----------
    mode : TrainMode
        ``adapter``, ``supervised`` (fine-tuning) or ``selfsupervised``.
    size : int
        Encoder input in pixels.
    epochs : int
        Fine-tuning epochs; for an adapter, the longest of the lengths cross-validation compares.
    loss : SupervisedLoss
        The loss of an adapter or a supervised run.
    folds : int
        Cross-validation folds of an adapter run (0 otherwise).
    budget_s, estimate_s : float
        The time the run may take, and what it is expected to take on this machine.
    reasons : tuple of str
        One sentence per choice, printed by the command.
    """

    mode: TrainMode
    size: int
    epochs: int
    loss: SupervisedLoss
    folds: int
    budget_s: float
    estimate_s: float
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mode"], out["loss"] = self.mode.value, self.loss.value
        out["reasons"] = list(self.reasons)
        out["budget_s"], out["estimate_s"] = round(self.budget_s, 1), round(self.estimate_s, 1)
        return out


def _per_input(anchors: tuple[tuple[int, float], ...], size: int) -> float:
    """Seconds an input at ``size`` px, from (size, seconds) anchors: interpolated on the pixel count."""
    area = float(size) ** 2
    areas = [float(s) ** 2 for s, _ in anchors]
    if area <= areas[-1]:
        return float(np.interp(area, areas, [t for _, t in anchors]))
    return anchors[-1][1] * area / areas[-1]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def pick_recipe(
    profile: DataProfile,
    machine: Machine,
    *,
    budget_minutes: float,
    mode: TrainMode = TrainMode.AUTO,
    size: int | None = None,
    epochs: int | None = None,
    loss: SupervisedLoss | None = None,
) -> Recipe:
    """The run's mode, size, epochs and loss: the given ones kept, the others chosen from the data.

    Raises
    ------
    ConfigError
        An adapter or supervised run asked for on data without labels.
    """
    budget_s = float(budget_minutes) * 60
    reasons: list[str] = []
    n_cases = profile.n_train + profile.n_val
    imbalance = profile.imbalance

    if size is not None:
        run_size = int(size)
    elif profile.image_side <= SMALL_IMAGE_SIDE:
        run_size = SMALL_IMAGE_SIZE
        reasons.append(
            f"input {run_size} px: the images are {profile.image_side} px, and upscaling them to {DEFAULT_SIZE} "
            f"adds no detail at {(DEFAULT_SIZE / run_size) ** 2:.0f} times the cost (the frozen encoder at "
            f"{DEFAULT_SIZE} px stays the first candidate)"
        )
    else:
        run_size = DEFAULT_SIZE
        reasons.append(f"input {run_size} px, the encoder's own (the images are {profile.image_side} px)")

    train_inputs = profile.n_train * profile.inputs_per_case
    all_inputs = n_cases * profile.inputs_per_case
    validated = (min(profile.n_train, VAL_GALLERY) + profile.n_val) * profile.inputs_per_case
    folds = _folds(profile)
    # the frozen encoder at the default size, embedded once more when the recipe picks another size
    reference_s = machine.embed_seconds(all_inputs, DEFAULT_SIZE) if size is None and run_size != DEFAULT_SIZE else 0.0
    adapter_s = machine.embed_seconds(all_inputs, run_size) + machine.adapter_seconds(all_inputs, folds) + reference_s
    # each epoch ends with a validation, and the network as loaded is validated once before the first
    start_s = machine.validate_seconds(validated, run_size)
    epoch_s = machine.finetune_epoch_seconds(train_inputs, run_size) + start_s

    if mode is TrainMode.AUTO:
        if not profile.has_labels:
            mode = TrainMode.SELFSUPERVISED
            reasons.append(
                "self-supervised (SimCLR): the data has no labels; without labels the run cannot tell "
                "whether it beats the frozen encoder"
            )
        elif profile.n_train < FINETUNE_MIN_CASES:
            mode = TrainMode.ADAPTER
            reasons.append(
                f"adapter on the frozen encoder: {profile.n_train} training cases are too few to fine-tune "
                f"the network and select an epoch reliably (fine-tuning from {FINETUNE_MIN_CASES})"
            )
        elif FINETUNE_MIN_EPOCHS * epoch_s + start_s + reference_s > budget_s:
            small_start_s = machine.validate_seconds(validated, SMALL_FINETUNE_SIZE)
            small_s = machine.finetune_epoch_seconds(train_inputs, SMALL_FINETUNE_SIZE) + small_start_s
            over = (
                f"{FINETUNE_MIN_EPOCHS} epochs of fine-tuning at {run_size} px would take about "
                f"{_minutes(FINETUNE_MIN_EPOCHS * epoch_s)} here, over the budget of {_minutes(budget_s)}"
            )
            if (
                size is None
                and run_size == SMALL_IMAGE_SIZE
                and FINETUNE_MIN_EPOCHS * small_s + small_start_s + reference_s <= budget_s
            ):
                mode, run_size, epoch_s, start_s = TrainMode.SUPERVISED, SMALL_FINETUNE_SIZE, small_s, small_start_s
                reasons.pop(0)  # the input size is this reason's now
                reasons.append(
                    f"fine-tuning (supervised) at {run_size} px: {profile.n_train} training cases; {over}, and at "
                    f"{run_size} px, about {_minutes(epoch_s)} an epoch, they fit (the {profile.image_side} px images "
                    "lose no detail)"
                )
            else:
                mode = TrainMode.ADAPTER
                reasons.append(f"adapter on the frozen encoder: {over}")
        else:
            mode = TrainMode.SUPERVISED
            reasons.append(
                f"fine-tuning (supervised): {profile.n_train} training cases, and {FINETUNE_MIN_EPOCHS} epochs or more "
                f"fit in the budget of {_minutes(budget_s)} (about {_minutes(epoch_s)} an epoch here)"
            )
    elif mode in (TrainMode.ADAPTER, TrainMode.SUPERVISED) and not profile.has_labels:
        raise ConfigError(f"{mode.value} training needs labels; give --labels CSV, or use --mode selfsupervised")

    if mode is TrainMode.ADAPTER:
        run_epochs = int(epochs) if epochs is not None else max(ADAPTER_EPOCHS)
        if epochs is None:
            reasons.append(
                f"adapter length chosen by {folds}-fold cross-validation over train and val among "
                f"{', '.join(map(str, ADAPTER_EPOCHS))} epochs"
            )
        run_loss = loss or SupervisedLoss.MULTISIMILARITY
        if loss is None:
            reasons.append(_balance_reason(imbalance, "Multi-Similarity loss with its miner"))
        estimate = adapter_s
        return Recipe(mode, run_size, run_epochs, run_loss, folds, budget_s, estimate, tuple(reasons))

    per_epoch = epoch_s if mode is TrainMode.SUPERVISED else 2 * epoch_s  # SimCLR sees two views
    if epochs is not None:
        run_epochs = int(epochs)
    else:
        fit = int(max(0.0, budget_s - reference_s - start_s) // max(per_epoch, 1e-9))
        run_epochs = max(1, min(FINETUNE_MAX_EPOCHS, fit))
        reasons.append(
            f"{run_epochs} epochs: about {_minutes(per_epoch)} each here, within the budget of {_minutes(budget_s)}"
            + (" (the run stops early when the budget runs out)" if fit < FINETUNE_MAX_EPOCHS else "")
        )
    if mode is TrainMode.SELFSUPERVISED:
        run_loss = loss or SupervisedLoss.MULTISIMILARITY
    elif loss is not None:
        run_loss = loss
    elif imbalance < IMBALANCED and profile.n_train < 1000:
        run_loss = SupervisedLoss.CLASSIFIER
        reasons.append(f"classifier loss: a small balanced set ({profile.n_train} cases, imbalance {imbalance:.1f})")
    else:
        run_loss = SupervisedLoss.MULTISIMILARITY
        reasons.append(_balance_reason(imbalance, "Multi-Similarity loss with its miner"))
    return Recipe(
        mode, run_size, run_epochs, run_loss, 0, budget_s, per_epoch * run_epochs + start_s + reference_s, tuple(reasons)
    )


def _balance_reason(imbalance: float, loss: str) -> str:
    if imbalance >= IMBALANCED:
        return f"{loss}, on class-balanced batches: the classes are imbalanced ({imbalance:.1f} to 1)"
    return f"{loss}, on class-balanced batches (classes {imbalance:.1f} to 1)"


def _folds(profile: DataProfile) -> int:
    """Cross-validation folds: 5, fewer when the smallest class has fewer cases (at least 2)."""
    if not profile.has_labels:
        return 0
    smallest = min(c for c in profile.class_counts if c > 0)
    return max(2, min(5, smallest))
