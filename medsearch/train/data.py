"""The images a training run learns from and is validated on, preprocessed once and kept in memory.

Two steps, so that the recipe can read the data before choosing the input size:
:func:`find_cases` reads a MedMNIST-format ``.npz`` (its ``train`` split trains, ``val`` validates;
``test`` is never read) or a DICOM archive's headers with an optional labels CSV, holding out a
seeded fraction of the *patients* for validation so that slices of one patient never sit on both
sides; :meth:`Cases.profile` says what the recipe needs (sizes, classes, image side).
:func:`load_cases` then preprocesses every case with the same
:func:`medsearch.embedding.encoder_input` as indexing, so the preprocessing an index records is the
one the network was trained on; an adapter run passes ``embed`` and keeps only the frozen encoder's
features, a chunk of images at a time. :func:`check_data` refuses a set too small or too poor in
classes to train on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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
from medsearch.io import CaseRef, LoadFailure, NpzSplit, find_files, load_npz_split, load_volume, npz_splits, scan
from medsearch.io.labels import labels_for_case, read_labels  # the index's own label matching
from medsearch.train.options import TrainMode, TrainOptions
from medsearch.train.recipe import DataProfile

__all__ = ["Cases", "Embed", "Split", "TrainData", "check_data", "find_cases", "load_cases"]

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Preprocessed images of one side (train or val), kept in memory between epochs.

    ``images`` are ``(M, c, size, size)`` in [0, 1] (``c`` = 1 for gray, 3 for RGB), or for an
    adapter run the encoder's ``(M, dim)`` features of them: one row per slice the encoder sees;
    ``case`` gives each row's case, ``labels`` each case's label code (-1 without a label).
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


#: Embeds a batch of encoder inputs (an adapter run keeps these features instead of the images).
Embed = Callable[[torch.Tensor], np.ndarray]


@dataclass
class Cases:
    """The cases of a run, split into train and val, with their labels, before any pixel is preprocessed.

    What :func:`find_cases` learns from an npz's arrays or an archive's headers alone: enough for
    the recipe (:meth:`profile`) to choose the input size before :func:`load_cases` preprocesses
    at it.
    """

    source: Path
    classes: list[str]
    train_labels: np.ndarray
    val_labels: np.ndarray
    image_side: int
    inputs_per_case: int
    sha256: str
    # an npz: (split, rows) for train and val; an archive: the cases and their rows on each side
    npz_parts: list[tuple[NpzSplit, np.ndarray]] = field(default_factory=list)
    archive_cases: list[CaseRef] = field(default_factory=list)
    archive_labels: list[Any] = field(default_factory=list)
    archive_rows: tuple[list[int], list[int]] = ([], [])

    def profile(self) -> DataProfile:
        labeled = self.train_labels[self.train_labels >= 0]
        counts = tuple(int(c) for c in np.bincount(labeled, minlength=len(self.classes))) if labeled.size else ()
        return DataProfile(
            n_train=int(self.train_labels.shape[0]),
            n_val=int(self.val_labels.shape[0]),
            class_counts=counts,
            image_side=self.image_side,
            inputs_per_case=self.inputs_per_case,
        )


def find_cases(path: Path, options: TrainOptions, *, slices: int) -> Cases:
    """The cases of an npz (its train and val splits; ``test`` is never read) or of a DICOM archive.

    ``slices`` is the number of slices a volume gives the encoder (for the time estimates).

    Raises
    ------
    InvalidStudyError
        The npz has no train split, or the archive holds no DICOM image.
    ConfigError
        The labels file has several label columns and none is chosen, labels no case, or the
        archive holds too few patients to split.
    """
    if path.is_file() and path.suffix.lower() == ".npz":
        return _npz_cases(path, options, slices)
    return _archive_cases(path, options, slices)


def _npz_cases(path: Path, options: TrainOptions, slices: int) -> Cases:
    val_split, seed = options.val_split, options.seed
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
    codes = [_codes([str(v) for v in split.labels[rows]], classes) for split, rows in parts]
    volume = train.layout.value == "volume"
    side = int(max(train.images.shape[-3:-1] if train.layout.value == "rgb" else train.images.shape[-2:]))
    return Cases(
        source=path, classes=classes, train_labels=codes[0], val_labels=codes[1], image_side=side,
        inputs_per_case=slices if volume else 1, sha256=digest.hexdigest(), npz_parts=parts,
    )


def _archive_cases(path: Path, options: TrainOptions, slices: int) -> Cases:
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
    cases = list(found.cases)
    values: list[Any] = [None] * len(cases)
    if table is not None:
        values = [labels_for_case(case, table, path)[table.columns[0]] for case in cases]
        labeled = [i for i, v in enumerate(values) if v is not None and str(v) != ""]
        if not labeled:
            raise ConfigError(f"no case of {path} has a label in {labels}; check that its key column names these files")
        if len(labeled) < len(values):
            log.warning("%d case(s) of %s have no label in %s and are left out", len(values) - len(labeled), path, labels)
        cases = [cases[i] for i in labeled]
        values = [values[i] for i in labeled]
    if not cases:
        raise InvalidStudyError(f"no DICOM image found in {path}; give a folder of DICOM studies")
    groups = [patient_pseudonym(split_key, case.header) for case in cases]
    unique_groups = np.asarray(sorted(set(groups)))
    g_train, g_val = _holdout(np.arange(unique_groups.shape[0]), val_split, seed)
    val_groups = set(unique_groups[g_val])
    rows_val = [i for i, g in enumerate(groups) if g in val_groups]
    rows_train = [i for i, g in enumerate(groups) if g not in val_groups]
    classes = sorted({str(v) for v in values if v is not None})
    codes = _codes(values, classes)
    sides = [max(int(getattr(c.header, "Rows", 0) or 0), int(getattr(c.header, "Columns", 0) or 0)) for c in cases]
    many = sum(len(c.files) > 1 for c in cases) > len(cases) / 2
    return Cases(
        source=path, classes=classes, train_labels=codes[rows_train], val_labels=codes[rows_val],
        image_side=int(np.median(sides)) if sides else 0, inputs_per_case=slices if many else 1, sha256="",
        archive_cases=cases, archive_labels=values, archive_rows=(rows_train, rows_val),
    )


def load_cases(
    cases: Cases, config: Config, *, embed: Embed | None = None, info: EncoderInfo | None = None, progress: bool = False
) -> TrainData:
    """Preprocess the cases as indexing does; keep the images, or with ``embed`` their features only.

    ``info`` is the encoder's (what input it takes): EfficientNet-Lite0's by default.

    Raises
    ------
    InvalidStudyError
        No case of an archive can be decoded.
    """
    if cases.npz_parts:
        sides = []
        for split, rows in cases.npz_parts:
            volumes = split.volumes(rows)
            tensors = (
                _preprocess(v, config, info)
                for v in tqdm(volumes, total=len(rows), desc=f"preprocessing {split.split}", unit="img", disable=not progress, leave=False)
            )
            sides.append(_collect(tensors, gray=split.layout.value != "rgb", embed=embed))
        parts = [(images, case, labels) for (images, case), labels in zip(sides, (cases.train_labels, cases.val_labels), strict=True)]
        sha = cases.sha256
    else:
        parts, sha = _load_archive(cases, config, embed=embed, info=info, progress=progress)
    train, val = (Split(images=images, case=case, labels=labels) for images, case, labels in parts)
    return TrainData(train=train, val=val, classes=cases.classes, sha256=sha, source=str(cases.source))


def _load_archive(
    cases: Cases, config: Config, *, embed: Embed | None, info: EncoderInfo | None, progress: bool
) -> tuple[list[tuple[torch.Tensor, np.ndarray, np.ndarray]], str]:
    digest = hashlib.sha256()
    loaded: dict[int, tuple[torch.Tensor, bool]] = {}
    for i, case in enumerate(tqdm(cases.archive_cases, desc="loading cases", unit="case", disable=not progress, leave=False)):
        try:
            volume, _ = load_volume(case)
        except LoadFailure:
            continue
        tensor = _preprocess(volume, config, info)
        digest.update(tensor.numpy().tobytes())
        digest.update(str(cases.archive_labels[i]).encode())
        loaded[i] = (tensor, volume.rgb)
    if not loaded:
        raise InvalidStudyError(f"no decodable image found in {cases.source}; give a folder of DICOM studies")
    rgb = any(is_rgb for _, is_rgb in loaded.values())
    codes = _codes(cases.archive_labels, cases.classes)
    parts = []
    for rows in cases.archive_rows:
        kept = [i for i in rows if i in loaded]
        images, case = _collect((loaded[i][0] for i in kept), gray=not rgb, embed=embed)
        parts.append((images, case, codes[kept]))
    return parts, digest.hexdigest()


def _collect(tensors: Iterable[torch.Tensor], *, gray: bool, embed: Embed | None) -> tuple[torch.Tensor, np.ndarray]:
    """The rows of one side: the images in [0, 1] (:func:`_prepare`), or their features, in chunks."""
    if embed is None:
        return _prepare(list(tensors), gray=gray)
    rows: list[torch.Tensor] = []
    case: list[int] = []
    chunk: list[torch.Tensor] = []
    for i, tensor in enumerate(tensors):
        chunk.append(tensor)
        case.extend([i] * tensor.shape[0])
        if len(chunk) >= _EMBED_CASES:
            rows.append(torch.from_numpy(embed(torch.cat(chunk))))
            chunk.clear()
    if chunk:
        rows.append(torch.from_numpy(embed(torch.cat(chunk))))
    if not rows:
        return torch.zeros((0, 1)), np.zeros(0, dtype=np.int64)
    return torch.cat(rows), np.asarray(case, dtype=np.int64)


# Cases sent to the encoder together when a run keeps features (memory stays that of one chunk).
_EMBED_CASES = 64


# What EfficientNet-Lite0 takes (2D, 3 channels, [-1, 1]): EncoderInfo's defaults; the hash is unused here.
_LITE0_INPUT = EncoderInfo(name=DEFAULT_ENCODER, dim=1280, weights_sha256="")


def _preprocess(volume: Any, config: Config, info: EncoderInfo | None = None) -> torch.Tensor:
    """The encoder input exactly as indexing builds it (:func:`medsearch.embedding.encoder_input`); Lite0's by default."""
    return encoder_input(volume, info or _LITE0_INPUT, config)


def _holdout(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``rows`` into (keep, held out), with at least one on each side."""
    if rows.shape[0] < 2:
        raise ConfigError(f"only {rows.shape[0]} case(s)/patient(s) to split into train and validation; give more data")
    order = np.random.default_rng(seed).permutation(rows)
    n_val = min(max(1, int(round(fraction * rows.shape[0]))), rows.shape[0] - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_data(train_labels: np.ndarray, val_labels: np.ndarray, mode: TrainMode, source: Path) -> None:
    """Refuse a set with too few training or validation cases, or (with labels to learn) too few per class.

    ``train_labels`` and ``val_labels`` hold a label code per case (-1 without a label), as
    :class:`Cases` and :class:`Split` keep them.

    Raises
    ------
    ConfigError
        With what is missing and what to give instead.
    """
    if train_labels.shape[0] < 4:
        raise ConfigError(f"{source} has only {train_labels.shape[0]} training image(s); give at least 4 (better hundreds)")
    if val_labels.shape[0] < 1:
        raise ConfigError(f"{source} leaves no image for validation; give more data or a larger val_split")
    if mode in (TrainMode.SUPERVISED, TrainMode.ADAPTER):
        counts = np.bincount(train_labels[train_labels >= 0], minlength=1)
        present = counts[counts > 0]
        if present.size < 2:
            raise ConfigError(
                f"{source}: {mode.value} training needs at least 2 classes in the training images, found "
                f"{present.size}; use --mode selfsupervised"
            )
        if present.min() < 2:
            raise ConfigError(
                f"{source}: a class has only {int(present.min())} training image; give at least 2 per class"
            )
