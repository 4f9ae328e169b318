"""The settings of a training run: :class:`TrainOptions`, with the choices it offers.

One frozen object holds every setting :func:`medsearch.train.train_encoder` takes besides the data
and the checkpoint to write, and checks them on entry::

    options = TrainOptions(mode="selfsupervised", epochs=8, size=128)
    train_encoder("breastmnist.npz", "runs/breast.pt", options=options)

Enums accept their string values (``mode="supervised"``). What is left unset and depends on the
data (the mode, input size, epochs and loss: :mod:`medsearch.train.recipe`; the default
``head_epochs`` and ``freeze_norm``) is resolved when the run starts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from medsearch.config import Config, parse_enum
from medsearch.errors import ConfigError

__all__ = ["VAL_METRICS", "SupervisedLoss", "TrainMode", "TrainOptions"]

#: Metrics computed on validation after each epoch (val cases query the training cases).
VAL_METRICS = ("hit@1", "map_hits@5", "mmv@5", "precision@10", "knn_acc@11")


class TrainMode(str, enum.Enum):
    """What the training learns, and from what.

    ``adapter``: a small projection on the frozen encoder's embeddings, from labels.
    ``supervised``: the network itself, fine-tuned on labels. ``selfsupervised``: the network,
    from the images alone (SimCLR). ``auto``: the recipe picks from the data.
    """

    ADAPTER = "adapter"
    SUPERVISED = "supervised"
    SELFSUPERVISED = "selfsupervised"
    AUTO = "auto"


class SupervisedLoss(str, enum.Enum):
    """The loss of a supervised run (see :mod:`medsearch.train` for which is better and why)."""

    MULTISIMILARITY = "multisimilarity"
    SUPCON = "supcon"
    CLASSIFIER = "classifier"


@dataclass(frozen=True)
class TrainOptions:
    """How to train: every setting of :func:`medsearch.train.train_encoder` but the data and ``out``.

    Attributes
    ----------
    labels : str or Path, optional
        For an archive: a CSV of labels per file or series (as ``medsearch index --labels``).
    label_column : str, optional
        The column of ``labels`` to learn (needed when it has several).
    config : Config, str or Path, optional
        Preprocessing (and a starting ``encoder.checkpoint``, if any); a TOML file or a preset.
    size : int, optional
        Overrides ``preprocess.size`` (encoder input in pixels). Default: the ``config``'s when one
        is given, else the recipe's choice from the image size.
    mode : TrainMode or str, default "auto"
        ``adapter``, ``supervised``, ``selfsupervised``, or ``auto`` (the recipe picks).
    loss : SupervisedLoss or str, optional
        Loss of an adapter or supervised run: ``multisimilarity``, ``supcon`` or ``classifier``
        (fine-tuning only). Default: the recipe's choice.
    epochs : int, optional
        Passes over the training images (at most; see ``patience``). Default: the recipe's
        choice (for an adapter: chosen by cross-validation; given, the adapter trains that long).
    budget_minutes : float, default 30
        The time the whole run may take; the recipe plans within it and fine-tuning stops when
        the next epoch would pass it.
    batch_size : int, default 64
        Images per step (a self-supervised step sees two views of each).
    lr, weight_decay : float
        AdamW settings; the learning rate warms up over the first epoch, then follows a cosine.
    temperature : float, default 0.1
        Of the supcon and SimCLR (NT-Xent) losses.
    seed : int, default 0
        Seeds the split, the sampling, the augmentations and the heads.
    val_split : float, default 0.15
        Fraction held out for validation when the data has no val split (by patient for an archive).
    patience : int, default 10
        Stop after this many epochs without a better validation score (0: never stop early).
    select_metric : str, default "map_hits@5"
        Validation metric that compares the candidates (the frozen encoder, adapters, epochs of a
        supervised run); one of :data:`VAL_METRICS`.
    flips : bool, default False
        Allow horizontal flips among the augmentations (not where laterality matters).
    augment : float, default 1.0
        Strength of the augmentations (0 turns them off for supervised runs).
    steps_per_epoch : int, optional
        Steps per epoch (default: enough to see every training image once).
    head_epochs : int, optional
        First epochs that train only the new head, on the fixed encoder (default: 1 for a
        self-supervised run, 0 for a supervised one).
    freeze_norm : bool, optional
        Keep BatchNorm's running statistics as loaded (its scale and shift still learn); default:
        True for a self-supervised run, False for a supervised one.
    resume : bool, default True
        Continue from ``<out>.last.pt`` when it was written by a run with the same settings and data.
    device : str, default "auto"
        ``auto`` (CUDA when available, with autocast), ``cpu`` or ``cuda``.
    progress : bool, default True
        A progress bar on stderr with the loss and the validation score.

    Raises
    ------
    ConfigError
        A value out of its range, or not one of its choices.
    """

    labels: str | Path | None = None
    label_column: str | None = None
    config: Config | str | Path | None = None
    size: int | None = None
    mode: TrainMode = TrainMode.AUTO
    loss: SupervisedLoss | None = None
    epochs: int | None = None
    budget_minutes: float = 30.0
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    temperature: float = 0.1
    seed: int = 0
    val_split: float = 0.15
    patience: int = 10
    select_metric: str = "map_hits@5"
    flips: bool = False
    augment: float = 1.0
    steps_per_epoch: int | None = None
    head_epochs: int | None = None
    freeze_norm: bool | None = None
    resume: bool = True
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_enum(TrainMode, self.mode, "mode"))
        if self.loss is not None:
            object.__setattr__(self, "loss", parse_enum(SupervisedLoss, self.loss, "loss"))
        if self.epochs is not None and int(self.epochs) < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if not float(self.budget_minutes) > 0:
            raise ConfigError(f"budget_minutes must be positive, got {self.budget_minutes}")
        if self.size is not None and not 16 <= int(self.size) <= 2048:
            raise ConfigError(f"size must be between 16 and 2048 pixels, got {self.size}")
        if int(self.batch_size) < 4:
            raise ConfigError(f"batch size must be at least 4, got {self.batch_size}")
        if not 0 < float(self.lr) < 1:
            raise ConfigError(f"learning rate must be between 0 and 1, got {self.lr}")
        if not 0 < float(self.val_split) < 1:
            raise ConfigError(f"val_split must be between 0 and 1 (a fraction), got {self.val_split}")
        if int(self.patience) < 0:
            raise ConfigError(f"patience must be 0 (never stop early) or more, got {self.patience}")
        if float(self.augment) < 0:
            raise ConfigError(f"augment must be 0 (none) or more, got {self.augment}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) < 1:
            raise ConfigError(f"steps per epoch must be at least 1, got {self.steps_per_epoch}")
        if float(self.temperature) <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.head_epochs is not None and self.epochs is not None and not 0 <= self.head_epochs < self.epochs:
            raise ConfigError(f"head_epochs must be at least 0 and below epochs ({self.epochs}), got {self.head_epochs}")
        if self.select_metric not in VAL_METRICS:
            raise ConfigError(f"select_metric must be one of {', '.join(VAL_METRICS)}, got {self.select_metric!r}")
