"""Fine-tune the encoder on a site's own images, so that its embeddings suit retrieval there.

:func:`train_encoder` trains EfficientNet-Lite0 (the default encoder) on a MedMNIST-format ``.npz``
or a DICOM archive, and writes a checkpoint that ``medsearch index``, ``query`` and ``evaluate``
load as ``encoder.checkpoint``::

    from medsearch.train import train_encoder
    report = train_encoder("breastmnist.npz", out="runs/breast.pt", size=64, epochs=30)
    report.config_path        # runs/breast.toml: give it to index / query / evaluate as --config

What the network learns is exactly what indexing uses: the globally pooled 1280-d features of the
last conv layer, L2-normalized (the classifier of the ImageNet network is kept, untouched, so that
the weights file loads strictly). Images go through :func:`medsearch.transforms.preprocess_volume`
with the run's config, the same call as indexing, so the preprocessing the index records is the
one the network was trained on.

Two modes:

* ``supervised`` (labels: the npz labels, or a labels CSV beside an archive). Three losses, all
  on the normalized embedding: ``multisimilarity`` (Multi-Similarity loss with its miner,
  pytorch-metric-learning), ``supcon`` (supervised contrastive) and ``classifier`` (cross-entropy
  through a linear head on the embedding; the head is dropped). Batches hold as many images of
  each class, which matters for imbalanced sets such as PneumoniaMNIST (9 pneumonia : 1 normal).
  Which is better was measured on validation splits (docs/benchmarks.md, "Trained encoders"):
  on BreastMNIST val the classifier head came first by 2 of 78 images (k-NN accuracy@11 0.897
  against 0.872 for both pair losses), within the noise of so small a split; on PneumoniaMNIST val
  (524 images) Multi-Similarity led clearly (0.958 against 0.943; hit@1 0.954 against 0.906).
  Multi-Similarity is the default: a pair loss shapes the neighbourhoods that retrieval reads
  directly and its miner keeps learning from the hard pairs of an imbalanced set, whereas
  cross-entropy only needs the classes linearly separable, which can leave a class spread out and
  its members' nearest neighbours in the other class. On BreastMNIST's few hundred images the
  classifier's simpler objective did as well or slightly better.
* ``selfsupervised`` (no labels): SimCLR. Two augmented views of each image should embed close
  and away from the rest of the batch (NT-Xent loss through a small projection head, dropped
  afterwards). The augmentations are MONAI's and fit for medical images: small rotations, zoom
  and shift, contrast (gamma), intensity scaling and shift, gaussian noise. There are no flips:
  laterality carries meaning in medical images (``flips=True`` allows horizontal ones).
  Two safeguards keep SimCLR from first tearing down the ImageNet features it starts from
  (measured, docs/benchmarks.md: without them the runs ended level with or below the frozen encoder
  on most figures; with them, PneumoniaMNIST beats it on every figure):
  the first epoch trains only the new projection head, on the fixed encoder (``head_epochs``),
  so that the encoder's first gradients come through a head that already means something; and
  BatchNorm keeps its ImageNet statistics (``freeze_norm``) instead of re-estimating them on
  64-image batches of augmented, upscaled images. Its scale and shift still learn.

``auto`` picks supervised when labels are at hand.

Validation: the npz ``val`` split (never the ``test`` split, which is not even read), or for an
archive a held-out fraction of the *patients*, so that slices of one patient never sit on both
sides. After each epoch the validation cases query the training cases (cosine, exact) and the
result is scored with :mod:`medsearch.metrics`; supervised runs keep the checkpoint with the best
``select_metric`` (default ``knn_acc@11``, ties broken by ``precision@10``). A self-supervised run
selects by its validation loss, which needs no label; the label metrics are still reported
when validation labels exist.

Files written beside ``out`` (``runs/breast.pt``), each atomically (temporary file, then rename):

* ``breast.pt``: the best weights, a plain EfficientNet-Lite0 state dict;
* ``breast.last.pt``: the state to resume from (weights, heads, optimizer, scheduler, epoch,
  RNG states, history); a run started again with the same settings continues from it;
* ``breast.json``: training settings, the preprocessing config, seed, data hash, metrics per
  epoch, the best epoch, the weights' sha256 and the wall time;
* ``breast.toml``: a config with the run's preprocessing and ``encoder.checkpoint`` set, ready for
  ``medsearch index/query/evaluate --config``.

Randomness is seeded from ``seed`` and re-seeded at the start of every epoch from
``(seed, epoch)``, so a resumed run repeats exactly the epochs an uninterrupted run would have.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medsearch.config import Config, load_config
from medsearch.deid import SiteKey, patient_pseudonym
from medsearch.encoders import DEFAULT_ENCODER, EncoderInfo, load_encoder, resolve_device
from medsearch.errors import ConfigError, InvalidStudyError, MedsearchError
from medsearch.io import LoadFailure, find_files, load_npz_split, load_volume, npz_splits, scan
from medsearch.metrics import compute_metrics
from medsearch.pipeline import encoder_input
from medsearch.search import labels_for_case, read_labels  # the index's own label matching

__all__ = ["SupervisedLoss", "TrainMode", "TrainReport", "train_encoder"]

log = logging.getLogger(__name__)

#: Metrics computed on validation after each epoch (val cases query the training cases).
VAL_METRICS = ("hit@1", "map_hits@5", "mmv@5", "precision@10", "knn_acc@11")
_VAL_KS = (1, 5, 10, 11)
# Gallery of the validation search: at most this many training cases (a seeded subset), so that a
# large training set does not make every epoch's validation as slow as the epoch itself.
_VAL_GALLERY = 2000
_FORMAT = 1


class TrainMode(str, enum.Enum):
    """What the training learns from."""

    SUPERVISED = "supervised"
    SELFSUPERVISED = "selfsupervised"
    AUTO = "auto"


class SupervisedLoss(str, enum.Enum):
    """The loss of a supervised run (see the module docstring for which is better and why)."""

    MULTISIMILARITY = "multisimilarity"
    SUPCON = "supcon"
    CLASSIFIER = "classifier"


@dataclass
class TrainReport:
    """What a training run did and wrote.

    Attributes
    ----------
    checkpoint : Path
        The best weights (an EfficientNet-Lite0 state dict): ``encoder.checkpoint``.
    last_checkpoint, metadata_path, config_path : Path
        The resume state, the JSON record, and the ready-to-use TOML config.
    history : list of dict
        Per epoch: ``epoch``, ``loss``, ``val_loss`` (self-supervised), the :data:`VAL_METRICS`,
        ``seconds``.
    """

    checkpoint: Path
    last_checkpoint: Path
    metadata_path: Path
    config_path: Path
    data: str
    mode: str
    loss: str
    select_metric: str
    epochs: int
    epochs_completed: int
    best_epoch: int
    best_value: float
    history: list[dict[str, Any]]
    resumed_from_epoch: int
    stopped_early: bool
    device: str
    n_train: int
    n_val: int
    data_sha256: str
    weights_sha256: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def follow_up(self, *, labels: str | Path | None = None) -> list[str]:
        """The commands that use the trained encoder on the same data."""
        config = _shell(self.config_path)
        if self.data.endswith(".npz"):
            data = _shell(self.data)
            return [
                f"medsearch evaluate {data} --config {config} --protocol mahbod2024",
                f"medsearch evaluate {data} --config {config} --protocol medmnistplus",
            ]
        index = _shell(self.checkpoint.with_suffix("")) + "-index"
        labels_part = f" --labels {_shell(labels)}" if labels else ""
        return [
            f"medsearch index {_shell(self.data)} --index {index} --config {config}{labels_part}",
            f"medsearch query STUDY --index {index}",
        ]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("checkpoint", "last_checkpoint", "metadata_path", "config_path"):
            out[key] = str(out[key])
        out["seconds"] = round(self.seconds, 2)
        return out


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class _Split:
    """Preprocessed images of one side (train or val), kept in memory between epochs.

    ``images`` are ``(M, c, size, size)`` in [0, 1] (``c`` = 1 for gray, 3 for RGB): one row per
    slice the encoder sees; ``case`` gives each row's case, ``labels`` each case's label code
    (-1 without a label).
    """

    images: torch.Tensor
    case: np.ndarray
    labels: np.ndarray

    @property
    def n_cases(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class _Data:
    train: _Split
    val: _Split
    classes: list[str]
    sha256: str
    source: str


def _prepare(images: list[torch.Tensor], *, gray: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Back from the encoder's normalization ([-1, 1]) to [0, 1], where the augmentations work.

    A gray image keeps one of its three (equal) channels; :func:`_normalize` repeats it again.
    """
    rows, case = [], []
    for i, batch in enumerate(images):
        x = batch[:, :1] if gray else batch
        rows.append(x * 0.5 + 0.5)
        case.extend([i] * batch.shape[0])
    return torch.cat(rows).contiguous(), np.asarray(case, dtype=np.int64)


def _codes(values: Sequence[Any], classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(str(v), -1) if v is not None else -1 for v in values], dtype=np.int64)


def _load_npz(path: Path, config: Config, val_split: float, seed: int, progress: bool) -> _Data:
    splits = npz_splits(path)
    if "train" not in splits:
        raise InvalidStudyError(
            f"{path} has no train split (train_images and train_labels); its splits: {', '.join(splits) or 'none'}"
        )
    train = load_npz_split(path, "train")
    digest = hashlib.sha256(train.sha256().encode())
    if "val" in splits:
        val = load_npz_split(path, "val")
        digest.update(val.sha256().encode())
        parts = [(train, np.arange(len(train))), (val, np.arange(len(val)))]
    else:
        rows_train, rows_val = _holdout(np.arange(len(train)), val_split, seed)
        parts = [(train, rows_train), (train, rows_val)]
        log.info("%s has no val split: holding out %d of %d train images for validation", path, len(rows_val), len(train))
    classes = [str(c) for c in np.unique(train.labels)]
    sides = []
    for split, rows in parts:
        volumes = split.volumes(rows)
        tensors = [_preprocess(v, config) for v in tqdm(volumes, total=len(rows), desc=f"preprocessing {split.split}", unit="img", disable=not progress, leave=False)]
        images, case = _prepare(tensors, gray=split.layout.value != "rgb")
        sides.append(_Split(images=images, case=case, labels=_codes([str(v) for v in split.labels[rows]], classes)))
    return _Data(train=sides[0], val=sides[1], classes=classes, sha256=digest.hexdigest(), source=str(path))


def _load_archive(
    path: Path, labels: str | Path | None, label_column: str | None, config: Config, val_split: float, seed: int, progress: bool
) -> _Data:
    table = None
    if labels is not None:
        table = read_labels(labels, None, [label_column] if label_column else None)
        if len(table.columns) != 1:
            raise ConfigError(
                f"labels file {labels} has several label columns ({', '.join(table.columns)}); pick one with --label"
            )
    found = scan(tqdm(list(find_files(path)), desc="reading headers", unit="file", disable=not progress, leave=False))
    # A keyed pseudonym with a key fixed by the seed: the same patients fall on the same side in
    # every run, and nothing identifying is kept.
    split_key = SiteKey(hashlib.sha256(f"medsearch-train-split-{seed}".encode()).digest())
    tensors, values, groups = [], [], []
    digest = hashlib.sha256()
    for case in tqdm(found.cases, desc="loading cases", unit="case", disable=not progress, leave=False):
        try:
            volume, _ = load_volume(case)
        except LoadFailure:
            continue
        value = None
        if table is not None:
            value = labels_for_case(case, table, path)[table.columns[0]]
        tensor = _preprocess(volume, config)
        digest.update(tensor.numpy().tobytes())
        digest.update(str(value).encode())
        tensors.append((tensor, volume.rgb))
        values.append(value)
        groups.append(patient_pseudonym(split_key, case.header))
    if table is not None:
        labeled = [i for i, v in enumerate(values) if v is not None and str(v) != ""]
        if not labeled:
            raise ConfigError(f"no case of {path} has a label in {labels}; check that its key column names these files")
        if len(labeled) < len(values):
            log.warning("%d case(s) of %s have no label in %s and are left out", len(values) - len(labeled), path, labels)
        tensors = [tensors[i] for i in labeled]
        values = [values[i] for i in labeled]
        groups = [groups[i] for i in labeled]
    if not tensors:
        raise InvalidStudyError(f"no decodable image found in {path}; give a folder of DICOM studies")
    unique_groups = np.asarray(sorted(set(groups)))
    g_train, g_val = _holdout(np.arange(unique_groups.shape[0]), val_split, seed)
    val_groups = set(unique_groups[g_val])
    rows_val = [i for i, g in enumerate(groups) if g in val_groups]
    rows_train = [i for i, g in enumerate(groups) if g not in val_groups]
    classes = sorted({str(v) for v in values if v is not None})
    rgb = any(rgb for _, rgb in tensors)
    sides = []
    for rows in (rows_train, rows_val):
        images, case = _prepare([tensors[i][0] for i in rows], gray=not rgb)
        sides.append(_Split(images=images, case=case, labels=_codes([values[i] for i in rows], classes)))
    return _Data(train=sides[0], val=sides[1], classes=classes, sha256=digest.hexdigest(), source=str(path))


# What EfficientNet-Lite0 takes (2D, 3 channels, [-1, 1]): EncoderInfo's defaults; the hash is unused here.
_LITE0_INPUT = EncoderInfo(name=DEFAULT_ENCODER, dim=1280, weights_sha256="")


def _preprocess(volume: Any, config: Config) -> torch.Tensor:
    """The encoder input exactly as indexing builds it for Lite0 (:func:`medsearch.pipeline.encoder_input`)."""
    return encoder_input(volume, _LITE0_INPUT, config)


def _holdout(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``rows`` into (keep, held out), with at least one on each side."""
    if rows.shape[0] < 2:
        raise ConfigError(f"only {rows.shape[0]} case(s)/patient(s) to split into train and validation; give more data")
    order = np.random.default_rng(seed).permutation(rows)
    n_val = min(max(1, int(round(fraction * rows.shape[0]))), rows.shape[0] - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# --------------------------------------------------------------------------------------------------
# augmentation


def _augmentation(flips: bool, strength: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """MONAI augmentations for one ``(c, H, W)`` image in [0, 1]; ``strength`` scales them."""
    from monai.data import MetaTensor
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    s = float(strength)
    steps: list[Any] = [
        # small rotations, zoom in and out, shifts: position and size vary between acquisitions,
        # orientation barely does
        RandAffine(
            prob=0.9,
            rotate_range=(math.radians(12) * s,),
            scale_range=(0.2 * s, 0.2 * s),
            translate_range=(0.1 * s, 0.1 * s),
            padding_mode="border",
            mode="bilinear",
        ),
        RandAdjustContrast(prob=0.5, gamma=(1 - 0.3 * s, 1 + 0.5 * s)),
        RandScaleIntensity(prob=0.5, factors=0.15 * s),
        RandShiftIntensity(prob=0.5, offsets=0.1 * s),
        RandGaussianNoise(prob=0.3, std=0.03 * s),
    ]
    if flips:
        steps.append(RandFlip(prob=0.5, spatial_axis=1))
    compose = Compose(steps)
    compose.set_random_state(seed=0)

    def apply(image: torch.Tensor) -> torch.Tensor:
        out = compose(image)
        # A plain tensor: a MetaTensor would route every op of the network through its
        # __torch_function__ and slow training several times over.
        plain = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
        return plain.to(torch.float32).clamp_(0.0, 1.0)

    apply.set_random_state = compose.set_random_state  # type: ignore[attr-defined]
    return apply


# --------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class _Settings:
    """Everything that decides the result of a run; a resume must find the same."""

    mode: str
    loss: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    seed: int
    val_split: float
    patience: int
    select_metric: str
    flips: bool
    augment: float
    steps_per_epoch: int | None
    preprocess: dict[str, Any]
    start_weights_sha256: str
    head_epochs: int = 0
    freeze_norm: bool = False


def train_encoder(
    data: str | Path,
    *,
    out: str | Path,
    labels: str | Path | None = None,
    label_column: str | None = None,
    config: Config | str | Path | None = None,
    size: int | None = None,
    mode: TrainMode | str = TrainMode.AUTO,
    loss: SupervisedLoss | str = SupervisedLoss.MULTISIMILARITY,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-4,
    weight_decay: float = 1e-4,
    temperature: float = 0.1,
    seed: int = 0,
    val_split: float = 0.15,
    patience: int = 10,
    select_metric: str = "knn_acc@11",
    flips: bool = False,
    augment: float = 1.0,
    steps_per_epoch: int | None = None,
    head_epochs: int | None = None,
    freeze_norm: bool | None = None,
    resume: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> TrainReport:
    """Fine-tune EfficientNet-Lite0 for retrieval on an npz file or a DICOM archive.

    Parameters
    ----------
    data : str or Path
        A MedMNIST-format ``.npz`` (its ``train`` split trains, ``val`` selects; ``test`` is never
        read), or a DICOM file or archive folder.
    out : str or Path
        The checkpoint to write (``.pt``); the other files go beside it (see the module docstring).
    labels : str or Path, optional
        For an archive: a CSV of labels per file or series (as ``medsearch index --labels``).
    label_column : str, optional
        The column of ``labels`` to learn (needed when it has several).
    config : Config, str or Path, optional
        Preprocessing (and a starting ``encoder.checkpoint``, if any); a TOML file or a preset.
    size : int, optional
        Overrides ``preprocess.size`` (encoder input in pixels; 28-64 keeps a CPU run to minutes).
    mode : TrainMode or str, default "auto"
        ``supervised``, ``selfsupervised``, or ``auto`` (supervised when labels are at hand).
    loss : SupervisedLoss or str, default "multisimilarity"
        Loss of a supervised run: ``multisimilarity``, ``supcon`` or ``classifier``.
    epochs : int, default 20
        Passes over the training images (at most; see ``patience``).
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
    select_metric : str, default "knn_acc@11"
        Validation metric that picks the best epoch of a supervised run; one of :data:`VAL_METRICS`.
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

    Returns
    -------
    TrainReport

    Raises
    ------
    InvalidStudyError
        The data is missing, unreadable, has no train split, or holds no decodable image.
    ConfigError
        Bad options; labels missing where a supervised run needs them; too few images or classes;
        a resume state written with other settings (give another ``out`` or ``resume=False``).
    """
    started = time.perf_counter()
    data = Path(data)
    out = Path(out)
    mode, loss = _enum(TrainMode, mode, "mode"), _enum(SupervisedLoss, loss, "loss")
    _check_options(out, epochs, batch_size, lr, val_split, patience, augment, steps_per_epoch, temperature)
    cfg = config if isinstance(config, Config) else load_config(config)
    if size is not None:
        cfg = cfg.replace(preprocess={"size": int(size)})
    if cfg.encoder.name.lower() != DEFAULT_ENCODER:
        raise ConfigError(
            f"medsearch train fine-tunes {DEFAULT_ENCODER} only, not {cfg.encoder.name!r}; "
            f"set encoder.name = \"{DEFAULT_ENCODER}\" in the config"
        )
    if not data.exists():
        raise InvalidStudyError(f"{data} does not exist; give a MedMNIST-format .npz file or a DICOM archive folder")
    is_npz = data.is_file() and data.suffix.lower() == ".npz"
    if labels is not None and is_npz:
        raise ConfigError(f"{data} carries its own labels; --labels goes with a DICOM archive")
    if labels is not None and not Path(labels).is_file():
        raise ConfigError(f"labels file {labels} does not exist; give a CSV with one row per file or series")

    has_labels = is_npz or labels is not None
    if mode is TrainMode.AUTO:
        mode = TrainMode.SUPERVISED if has_labels else TrainMode.SELFSUPERVISED
    if mode is TrainMode.SUPERVISED and not has_labels:
        raise ConfigError(
            f"supervised training needs labels; give --labels CSV for {data}, or use --mode selfsupervised"
        )
    if head_epochs is None:  # one epoch for SimCLR's new projection head (see the module docstring)
        head_epochs = 1 if mode is TrainMode.SELFSUPERVISED and epochs > 1 else 0
    if not 0 <= head_epochs < epochs:
        raise ConfigError(f"head_epochs must be at least 0 and below epochs ({epochs}), got {head_epochs}")
    if head_epochs and mode is TrainMode.SUPERVISED and loss is not SupervisedLoss.CLASSIFIER:
        raise ConfigError(f"the {loss.value} loss has no head to train alone; give head_epochs 0, or loss classifier")
    if select_metric not in VAL_METRICS:
        raise ConfigError(f"select_metric must be one of {', '.join(VAL_METRICS)}, got {select_metric!r}")

    run_device = resolve_device(device)
    _seed_everything(seed)
    if is_npz:
        dataset = _load_npz(data, cfg, val_split, seed, progress)
    else:
        dataset = _load_archive(data, labels, label_column, cfg, val_split, seed, progress)
    _check_data(dataset, mode, data, batch_size)

    encoder_cfg = cfg.encoder
    start_encoder = load_encoder(Config(encoder=encoder_cfg).replace(encoder={"device": "cpu"}).encoder)
    settings = _Settings(
        mode=mode.value,
        loss=loss.value if mode is TrainMode.SUPERVISED else "ntxent",
        epochs=int(epochs),
        batch_size=int(batch_size),
        lr=float(lr),
        weight_decay=float(weight_decay),
        temperature=float(temperature),
        seed=int(seed),
        val_split=float(val_split),
        patience=int(patience),
        select_metric=select_metric if mode is TrainMode.SUPERVISED else "val_loss",
        flips=bool(flips),
        augment=float(augment),
        steps_per_epoch=steps_per_epoch,
        preprocess=cfg.to_dict()["preprocess"],
        start_weights_sha256=start_encoder.info.weights_sha256,
        head_epochs=int(head_epochs),
        freeze_norm=bool(freeze_norm if freeze_norm is not None else mode is TrainMode.SELFSUPERVISED),
    )
    trainer = _Trainer(start_encoder.net, dataset, settings, run_device)
    paths = _paths(out)
    resumed_from = trainer.maybe_resume(paths["last"], dataset.sha256) if resume else 0
    stopped_early = trainer.fit(paths, progress=progress)

    weights_sha = _file_sha256(paths["best"])
    final_cfg = cfg.replace(encoder={"checkpoint": str(paths["best"].resolve())})
    _atomic_write_text(paths["toml"], _config_toml(final_cfg, data))
    report = TrainReport(
        checkpoint=paths["best"],
        last_checkpoint=paths["last"],
        metadata_path=paths["json"],
        config_path=paths["toml"],
        data=str(data),
        mode=settings.mode,
        loss=settings.loss,
        select_metric=settings.select_metric,
        epochs=settings.epochs,
        epochs_completed=trainer.epoch,
        best_epoch=trainer.best_epoch,
        best_value=float(trainer.best_value[0]),
        history=trainer.history,
        resumed_from_epoch=resumed_from,
        stopped_early=stopped_early,
        device=run_device,
        n_train=dataset.train.n_cases,
        n_val=dataset.val.n_cases,
        data_sha256=dataset.sha256,
        weights_sha256=weights_sha,
        seconds=time.perf_counter() - started,
        settings=asdict(settings),
    )
    metadata = {
        "format": _FORMAT,
        **report.to_dict(),
        "classes": dataset.classes,
        "config": final_cfg.to_dict(),
        "train_seconds_total": round(trainer.train_seconds, 2),
        "torch": torch.__version__,
    }
    _atomic_write_text(paths["json"], json.dumps(metadata, indent=2) + "\n")
    return report


class _Trainer:
    """The training state of one run: the network, its heads, the optimizer, the history."""

    def __init__(self, start: nn.Module, data: _Data, settings: _Settings, device: str) -> None:
        self.data = data
        self.settings = settings
        self.device = torch.device(device)
        torch.manual_seed(settings.seed)
        # A copy: the encoder cache of load_encoder must keep the weights it was loaded with.
        self.net = copy.deepcopy(start).float().train().to(self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.supervised = settings.mode == TrainMode.SUPERVISED.value
        self.head = self._head().to(self.device)
        self.loss_fn, self.miner = self._loss()
        params = [
            {"params": list(self.net.parameters()), "lr": settings.lr},
            {"params": list(self.head.parameters()), "lr": settings.lr * 10},
        ]
        self.optimizer = torch.optim.AdamW(params, weight_decay=settings.weight_decay)
        self.steps = settings.steps_per_epoch or max(1, math.ceil(self.data.train.images.shape[0] / settings.batch_size))
        total = self.steps * settings.epochs
        warmup = min(self.steps, max(1, total // 10))
        # The encoder waits while the head learns alone, then warms up over a whole epoch: Adam's
        # first steps move every weight by about the learning rate, whatever its gradient.
        held = self.steps * settings.head_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [functools.partial(_warm_cosine, start=held, warmup=self.steps if held else warmup, total=total),
             functools.partial(_warm_cosine, start=0, warmup=warmup, total=total)],
        )
        self.augment = _augmentation(settings.flips, settings.augment)
        self.epoch = 0
        self.best_epoch = 0
        self.best_value: tuple[float, float] = (-math.inf, -math.inf)
        self.history: list[dict[str, Any]] = []
        self.bad_epochs = 0
        self.train_seconds = 0.0

    # -- parts

    def _head(self) -> nn.Module:
        s = self.settings
        if s.mode == TrainMode.SELFSUPERVISED.value:
            # SimCLR's projection head: the loss acts on its output, so the pooled features keep
            # what the augmentations would otherwise strip out. Dropped after training.
            return nn.Sequential(nn.Linear(1280, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))
        if s.loss == SupervisedLoss.CLASSIFIER.value:
            return nn.Linear(1280, len(self.data.classes))
        return nn.Identity()

    def _loss(self) -> tuple[Callable[..., torch.Tensor], Any]:
        from pytorch_metric_learning import losses, miners

        s = self.settings
        if s.mode == TrainMode.SELFSUPERVISED.value:
            return losses.NTXentLoss(temperature=s.temperature), None
        if s.loss == SupervisedLoss.MULTISIMILARITY.value:
            return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
        if s.loss == SupervisedLoss.SUPCON.value:
            return losses.SupConLoss(temperature=s.temperature), None
        # Batches are class-balanced already: plain cross-entropy.
        return nn.CrossEntropyLoss(), None

    # -- resume and save

    def state(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "settings": asdict(self.settings),
            "data_sha256": self.data.sha256,
            "epoch": self.epoch,
            "model": self._weights(),
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_epoch": self.best_epoch,
            "best_value": list(self.best_value),
            "bad_epochs": self.bad_epochs,
            "history": json.dumps(self.history),
            "train_seconds": self.train_seconds,
            # Each epoch re-seeds from (seed, epoch); torch's state is kept for code outside the loop.
            "rng_torch": torch.get_rng_state(),
        }

    def _weights(self) -> dict[str, torch.Tensor]:
        # The EfficientNet inside the encoder's pooling wrapper: what load_encoder loads strictly.
        return {k: v.detach().cpu().contiguous() for k, v in self.net.model.state_dict().items()}

    def maybe_resume(self, path: Path, sha256: str) -> int:
        if not path.is_file():
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file
            raise ConfigError(f"cannot read the resume state {path} ({_first_line(e)}); delete it or pass --no-resume") from e
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ConfigError(f"{path} is not a medsearch training state; delete it or pass --no-resume")
        # settings added since a state was written take their defaults (the behaviour of that time)
        defaults = {f.name: f.default for f in fields(_Settings) if f.default is not MISSING}
        theirs, ours = {**defaults, **dict(state["settings"])}, asdict(self.settings)
        theirs_epochs, ours_epochs = theirs.pop("epochs"), ours.pop("epochs")
        changed = sorted(k for k in ours if theirs.get(k) != ours[k])
        if changed or state.get("data_sha256") != sha256:
            what = ", ".join(changed) if changed else "the data"
            raise ConfigError(
                f"{path} was written by a run with other settings ({what}); pass --no-resume to start over, or another --out"
            )
        if theirs_epochs != ours_epochs:
            raise ConfigError(
                f"{path} was written by a run of {theirs_epochs} epochs, not {ours_epochs} (the learning-rate "
                "schedule depends on it); use the same --epochs, or pass --no-resume"
            )
        self.net.model.load_state_dict(state["model"], strict=True)
        self.head.load_state_dict(state["head"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.best_epoch = int(state["best_epoch"])
        self.best_value = (float(state["best_value"][0]), float(state["best_value"][1]))
        self.bad_epochs = int(state["bad_epochs"])
        self.history = json.loads(state["history"])
        self.train_seconds = float(state["train_seconds"])
        torch.set_rng_state(state["rng_torch"])
        log.info("resuming %s after epoch %d", path, self.epoch)
        return self.epoch

    # -- the loop

    def fit(self, paths: dict[str, Path], *, progress: bool) -> bool:
        s = self.settings
        if self.epoch >= s.epochs or (s.patience and self.bad_epochs >= s.patience):
            if not paths["best"].is_file():
                _atomic_torch_save(self._weights(), paths["best"])
            return self.epoch < s.epochs
        bar = tqdm(total=s.epochs, initial=self.epoch, desc=f"training ({s.mode})", unit="epoch", disable=not progress)
        stopped = False
        try:
            while self.epoch < s.epochs:
                t0 = time.perf_counter()
                loss = self._train_epoch(self.epoch, bar)
                record: dict[str, Any] = {"epoch": self.epoch + 1, "loss": round(loss, 5)}
                record.update(self._validate(self.epoch))
                record["seconds"] = round(time.perf_counter() - t0, 2)
                self.train_seconds += record["seconds"]
                self.epoch += 1
                self.history.append(record)
                value = self._score(record)
                if value > self.best_value:
                    self.best_value, self.best_epoch, self.bad_epochs = value, self.epoch, 0
                    _atomic_torch_save(self._weights(), paths["best"])
                else:
                    self.bad_epochs += 1
                _atomic_torch_save(self.state(), paths["last"])
                bar.update(1)
                shown = {"loss": f"{loss:.4f}", s.select_metric: f"{record.get(s.select_metric, float('nan')):.4f}"}
                bar.set_postfix(shown, refresh=True)
                log.info("epoch %d: %s", self.epoch, record)
                if s.patience and self.bad_epochs >= s.patience and self.epoch < s.epochs:
                    log.info("no better %s for %d epochs: stopping", s.select_metric, s.patience)
                    stopped = True
                    break
        finally:
            bar.close()
        return stopped

    def _score(self, record: dict[str, Any]) -> tuple[float, float]:
        s = self.settings
        if s.select_metric == "val_loss":
            return (-float(record["val_loss"]), 0.0)
        # A gallery smaller than the metric's k (a tiny archive) scores at the largest k it allows.
        name = next((m for m in (s.select_metric, "map_hits@5", "hit@1") if m in record), None)
        return (float(record[name]) if name else 0.0, float(record.get("precision@10", 0.0)))

    def _seed_epoch(self, epoch: int) -> np.random.Generator:
        seed = self.settings.seed * 100_003 + epoch
        torch.manual_seed(seed)
        random.seed(seed)
        self.augment.set_random_state(seed=seed % (2**32))  # type: ignore[attr-defined]
        return np.random.default_rng([self.settings.seed, epoch])

    def _batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Row indices of each step: class-balanced for supervised runs, shuffled otherwise."""
        s = self.settings
        train = self.data.train
        n_rows = train.images.shape[0]
        if not self.supervised:
            order = np.concatenate([rng.permutation(n_rows) for _ in range(math.ceil(self.steps * s.batch_size / n_rows) + 1)])
            return [order[i * s.batch_size : (i + 1) * s.batch_size] for i in range(self.steps)]
        row_labels = train.labels[train.case]
        classes = [np.flatnonzero(row_labels == c) for c in range(len(self.data.classes))]
        classes = [c for c in classes if c.size]
        per_class = max(2, s.batch_size // len(classes))
        streams = []
        for rows in classes:
            reps = math.ceil(self.steps * per_class / rows.size) + 1
            streams.append(np.concatenate([rng.permutation(rows) for _ in range(reps)]))
        return [np.concatenate([st[i * per_class : (i + 1) * per_class] for st in streams]) for i in range(self.steps)]

    def _views(self, rows: np.ndarray) -> torch.Tensor:
        images = self.data.train.images[torch.as_tensor(rows)]
        if self.settings.augment > 0:
            images = torch.stack([self.augment(img) for img in images])
        return images

    def _forward(self, images01: torch.Tensor, *, fixed: bool = False) -> torch.Tensor:
        x = _normalize(images01).to(self.device, non_blocking=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fixed):
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return self.net(x).float()
            return self.net(x.contiguous(memory_format=torch.channels_last))

    def _train_epoch(self, epoch: int, bar: tqdm) -> float:
        rng = self._seed_epoch(epoch)
        fixed = epoch < self.settings.head_epochs  # the head learns alone: the encoder is as loaded
        self.net.train(not fixed)
        if self.settings.freeze_norm:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        self.head.train()
        train = self.data.train
        total, n = 0.0, 0
        for step, rows in enumerate(self._batches(rng)):
            if self.supervised:
                feats = self._forward(self._views(rows), fixed=fixed)
                labels = torch.as_tensor(train.labels[train.case[rows]], device=self.device)
                if self.settings.loss == SupervisedLoss.CLASSIFIER.value:
                    loss = self.loss_fn(self.head(feats), labels)
                else:
                    pairs = self.miner(feats, labels) if self.miner is not None else None
                    loss = self.loss_fn(feats, labels, pairs)
            else:
                views = torch.cat([self._views(rows), self._views(rows)])
                z = self.head(self._forward(views, fixed=fixed))
                ids = torch.arange(len(rows), device=self.device).repeat(2)
                loss = self.loss_fn(z, ids)
            if not torch.isfinite(loss):
                raise MedsearchError(
                    f"the training loss became {loss.item()} at epoch {epoch + 1}; lower --lr and start again with --no-resume"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += float(loss.detach()) * len(rows)
            n += len(rows)
            bar.set_postfix({"step": f"{step + 1}/{self.steps}", "loss": f"{total / n:.4f}"}, refresh=False)
        return total / max(n, 1)

    @torch.no_grad()
    def _embed(self, split: _Split) -> np.ndarray:
        """Case embeddings exactly as indexing makes them: pool the slices, then L2-normalize."""
        self.net.eval()
        out = []
        for start in range(0, split.images.shape[0], 256):
            feats = self._forward(split.images[start : start + 256])
            out.append(torch.nn.functional.normalize(feats.float(), dim=1).cpu().numpy())
        vectors = np.concatenate(out)
        pooled = np.zeros((split.n_cases, vectors.shape[1]), dtype=np.float32)
        if self.settings.preprocess.get("pool") == "max":
            pooled[:] = -np.inf
            np.maximum.at(pooled, split.case, vectors)
        else:
            np.add.at(pooled, split.case, vectors)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _validate(self, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if not self.supervised:
            out["val_loss"] = round(self._val_ssl_loss(epoch), 5)
        train, val = self.data.train, self.data.val
        if not (val.labels >= 0).any() or not (train.labels >= 0).any():
            return out
        g_rows = np.flatnonzero(train.labels >= 0)
        if g_rows.size > _VAL_GALLERY:
            g_rows = np.sort(np.random.default_rng(self.settings.seed).choice(g_rows, _VAL_GALLERY, replace=False))
        q_rows = np.flatnonzero(val.labels >= 0)
        gallery = self._embed(_subset(train, g_rows))
        queries = self._embed(_subset(val, q_rows))
        g_lab, q_lab = train.labels[g_rows], val.labels[q_rows]
        k = min(max(_VAL_KS), g_rows.size)
        sims = queries @ gallery.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        n_rel = np.bincount(g_lab, minlength=len(self.data.classes))[q_lab]
        ks = tuple(x for x in _VAL_KS if x <= k)
        names = [m for m in VAL_METRICS if int(m.rsplit("@", 1)[1]) <= k]
        values = compute_metrics(g_lab[top], q_lab, n_rel, ks=ks, names=names)
        out.update({name: round(float(v.mean()), 5) for name, v in values.items()})
        return out

    @torch.no_grad()
    def _val_ssl_loss(self, epoch: int) -> float:
        """NT-Xent on augmented pairs of validation images, with fixed randomness (label-free)."""
        self.net.eval()
        self.head.eval()
        state = torch.get_rng_state()
        self.augment.set_random_state(seed=self.settings.seed + 7919)  # type: ignore[attr-defined]
        val = self.data.val
        total, n = 0.0, 0
        for start in range(0, val.images.shape[0], self.settings.batch_size):
            rows = np.arange(start, min(start + self.settings.batch_size, val.images.shape[0]))
            if rows.size < 2:
                continue
            imgs = val.images[torch.as_tensor(rows)]
            views = torch.cat([torch.stack([self.augment(i) for i in imgs]), torch.stack([self.augment(i) for i in imgs])])
            z = self.head(self._forward(views))
            loss = self.loss_fn(z, torch.arange(rows.size, device=self.device).repeat(2))
            total += float(loss) * rows.size
            n += rows.size
        # The next epoch re-seeds the augmentations; only torch's generator is given back.
        torch.set_rng_state(state)
        return total / max(n, 1)


# --------------------------------------------------------------------------------------------------
# helpers


def _warm_cosine(step: int, *, start: int, warmup: int, total: int) -> float:
    """Learning-rate factor: 0 before ``start``, then a linear warm-up and a cosine down to ``total``."""
    if step < start:
        return 0.0
    step -= start
    span = max(1, total - start)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, span) / span))


def _subset(split: _Split, cases: np.ndarray) -> _Split:
    """The cases ``cases`` of a split (in that order), renumbered 0..n-1."""
    keep = np.flatnonzero(np.isin(split.case, cases))
    renumber = np.full(split.n_cases, -1, dtype=np.int64)
    renumber[cases] = np.arange(cases.shape[0])
    return _Split(images=split.images[torch.as_tensor(keep)], case=renumber[split.case[keep]], labels=split.labels[cases])


def _normalize(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (1 or 3 channels) -> the 3-channel [-1, 1] input EfficientNet-Lite expects."""
    if images01.shape[1] == 1:
        images01 = images01.expand(-1, 3, -1, -1)
    return (images01 - 0.5) / 0.5


def _check_options(
    out: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    val_split: float,
    patience: int,
    augment: float,
    steps_per_epoch: int | None,
    temperature: float,
) -> None:
    if out.suffix != ".pt":
        raise ConfigError(f"the checkpoint {out} must end in .pt (the config, record and resume state go beside it)")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the checkpoint file to write, e.g. {out / 'encoder.pt'}")
    if int(epochs) < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if int(batch_size) < 4:
        raise ConfigError(f"batch size must be at least 4, got {batch_size}")
    if not 0 < float(lr) < 1:
        raise ConfigError(f"learning rate must be between 0 and 1, got {lr}")
    if not 0 < float(val_split) < 1:
        raise ConfigError(f"val_split must be between 0 and 1 (a fraction), got {val_split}")
    if int(patience) < 0:
        raise ConfigError(f"patience must be 0 (never stop early) or more, got {patience}")
    if float(augment) < 0:
        raise ConfigError(f"augment must be 0 (none) or more, got {augment}")
    if steps_per_epoch is not None and int(steps_per_epoch) < 1:
        raise ConfigError(f"steps per epoch must be at least 1, got {steps_per_epoch}")
    if float(temperature) <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")


def _check_data(data: _Data, mode: TrainMode, source: Path, batch_size: int) -> None:
    train, val = data.train, data.val
    if train.n_cases < 4:
        raise ConfigError(f"{source} has only {train.n_cases} training image(s); give at least 4 (better hundreds)")
    if val.n_cases < 1:
        raise ConfigError(f"{source} leaves no image for validation; give more data or a larger val_split")
    if mode is TrainMode.SUPERVISED:
        counts = np.bincount(train.labels[train.labels >= 0], minlength=len(data.classes))
        present = counts[counts > 0]
        if present.size < 2:
            raise ConfigError(
                f"{source}: supervised training needs at least 2 classes in the training images, found "
                f"{present.size}; use --mode selfsupervised"
            )
        if present.min() < 2:
            raise ConfigError(
                f"{source}: a class has only {int(present.min())} training image; give at least 2 per class"
            )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {
        "best": out,
        "last": Path(f"{stem}.last.pt"),
        "json": Path(f"{stem}.json"),
        "toml": Path(f"{stem}.toml"),
    }


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _config_toml(cfg: Config, data: Path) -> str:
    d = cfg.to_dict()
    lines = [
        f"# Written by medsearch train on {data.name}: the preprocessing it was trained with and its weights.",
        "# Give this file to medsearch index / query / evaluate as --config.",
    ]
    for section in ("preprocess", "encoder", "index"):
        lines.append(f"\n[{section}]")
        for key, value in d[section].items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}") from None


def _shell(value: str | Path) -> str:
    import shlex

    return shlex.quote(str(value))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
