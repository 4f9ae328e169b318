"""The images a training run learns from and is validated on, preprocessed once and kept in memory.

:func:`load_npz` reads a MedMNIST-format ``.npz`` (its ``train`` split trains, ``val`` validates;
``test`` is never read), :func:`load_archive` a DICOM archive with an optional labels CSV, holding
out a seeded fraction of the *patients* for validation so that slices of one patient never sit on
both sides. Images go through the same :func:`medsearch.embedding.encoder_input` as indexing, so the
preprocessing an index records is the one the network was trained on. :func:`check_data` refuses a
set too small or too poor in classes to train on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medsearch.config import Config
from medsearch.deid import SiteKey, patient_pseudonym
from medsearch.embedding import encoder_input
from medsearch.encoders import DEFAULT_ENCODER, EncoderInfo
from medsearch.errors import ConfigError, InvalidStudyError
from medsearch.io import LoadFailure, find_files, load_npz_split, load_volume, npz_splits, scan
from medsearch.io.labels import labels_for_case, read_labels  # the index's own label matching
from medsearch.train.options import TrainMode, TrainOptions

__all__ = ["Split", "TrainData", "check_data", "load_archive", "load_npz"]

log = logging.getLogger(__name__)


@dataclass
class Split:
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
class TrainData:
    """Both sides of a run's data, the label names (codes index them), and a hash of what was read."""

    train: Split
    val: Split
    classes: list[str]
    sha256: str
    source: str


def _prepare(images: list[torch.Tensor], *, gray: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Back from the encoder's normalization ([-1, 1]) to [0, 1], where the augmentations work.

    A gray image keeps one of its three (equal) channels; :func:`medsearch.train.trainer._normalize`
    repeats it again.
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


def load_npz(path: Path, config: Config, options: TrainOptions) -> TrainData:
    """The train and val splits of a MedMNIST-format ``.npz`` (a seeded part of train when it has no val).

    Raises
    ------
    InvalidStudyError
        The file has no train split.
    """
    val_split, seed, progress = options.val_split, options.seed, options.progress
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
        sides.append(Split(images=images, case=case, labels=_codes([str(v) for v in split.labels[rows]], classes)))
    return TrainData(train=sides[0], val=sides[1], classes=classes, sha256=digest.hexdigest(), source=str(path))


def load_archive(path: Path, config: Config, options: TrainOptions) -> TrainData:
    """The decodable cases of a DICOM archive, split by patient, with the labels of ``options.labels``.

    Raises
    ------
    ConfigError
        The labels file has several label columns and none is chosen, labels no case, or the
        archive holds too few patients to split.
    InvalidStudyError
        No case of the archive can be decoded.
    """
    labels, label_column = options.labels, options.label_column
    val_split, seed, progress = options.val_split, options.seed, options.progress
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
        sides.append(Split(images=images, case=case, labels=_codes([values[i] for i in rows], classes)))
    return TrainData(train=sides[0], val=sides[1], classes=classes, sha256=digest.hexdigest(), source=str(path))


# What EfficientNet-Lite0 takes (2D, 3 channels, [-1, 1]): EncoderInfo's defaults; the hash is unused here.
_LITE0_INPUT = EncoderInfo(name=DEFAULT_ENCODER, dim=1280, weights_sha256="")


def _preprocess(volume: Any, config: Config) -> torch.Tensor:
    """The encoder input exactly as indexing builds it for Lite0 (:func:`medsearch.embedding.encoder_input`)."""
    return encoder_input(volume, _LITE0_INPUT, config)


def _holdout(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``rows`` into (keep, held out), with at least one on each side."""
    if rows.shape[0] < 2:
        raise ConfigError(f"only {rows.shape[0]} case(s)/patient(s) to split into train and validation; give more data")
    order = np.random.default_rng(seed).permutation(rows)
    n_val = min(max(1, int(round(fraction * rows.shape[0]))), rows.shape[0] - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_data(data: TrainData, mode: TrainMode, source: Path) -> None:
    """Refuse a set with too few training or validation images, or (supervised) too few per class.

    Raises
    ------
    ConfigError
        With what is missing and what to give instead.
    """
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
