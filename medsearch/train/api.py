"""The entry point of training: :func:`train_encoder`, and :class:`TrainReport`, what a run did and wrote.

:func:`train_encoder` checks the settings and the data, reads what the recipe needs
(:func:`~medsearch.train.data.find_cases`), picks what was not given
(:func:`~medsearch.train.recipe.pick_recipe`: mode, input size, epochs, loss), runs an adapter or a
network run (:mod:`medsearch.train.runs`), each of which ends by choosing between the frozen encoder
and what it trained, and writes beside ``out`` a TOML config ready for
``medsearch index/query/evaluate`` and a JSON record of the run.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsearch import _files
from medsearch.config import Config, load_config
from medsearch.encoders import DEFAULT_ENCODER, load_encoder, resolve_device
from medsearch.errors import ConfigError, InvalidStudyError, WriteError, first_line
from medsearch.train.data import check_data, find_cases
from medsearch.train.options import SupervisedLoss, TrainMode, TrainOptions
from medsearch.train.recipe import Machine, Recipe, pick_recipe
from medsearch.train.runs import Outcome, run_adapter, run_network
from medsearch.train.trainer import FORMAT, RunSettings

__all__ = ["TrainReport", "train_encoder"]

_SETTINGS = frozenset(f.name for f in fields(TrainOptions))


@dataclass
class TrainReport:
    """What a training run did, chose and wrote.

    Attributes
    ----------
    config_path, metadata_path : Path
        The ready-to-use TOML config (the chosen encoder) and the JSON record.
    chosen : str
        The candidate written: ``frozen``, ``adapter-linear``, ``adapter-mlp``, ``fine-tuned`` or
        ``self-supervised``.
    verdict : str
        One sentence: what was chosen, against the frozen encoder, and why.
    candidates : list of dict
        Per candidate: its validation metrics (means), the 95% bootstrap interval of the selection
        metric, its gain over the frozen encoder with that gain's interval, and whether it was chosen.
    recipe : dict
        Mode, input size, epochs, loss, folds, budget and estimate, and a reason for each choice.
    checkpoint, adapter : Path or None
        The fine-tuned weights (``encoder.checkpoint``) or the adapter file (``encoder.adapter``)
        the config uses; None when it does not use one.
    last_checkpoint : Path or None
        A network run's resume state.
    history : list of dict
        A network run's validation per epoch, epoch 0 being the encoder as loaded: ``epoch``,
        ``loss``, ``val_loss`` (self-supervised), the :data:`~medsearch.train.options.VAL_METRICS`,
        ``seconds``.
    weights_sha256 : str
        Of the file the config uses (the adapter, the checkpoint, or the frozen weights).
    seconds, budget_s : float
        The run's wall time, and the budget it planned within.
    """

    config_path: Path
    metadata_path: Path
    chosen: str
    verdict: str
    candidates: list[dict[str, Any]]
    recipe: dict[str, Any]
    checkpoint: Path | None
    adapter: Path | None
    last_checkpoint: Path | None
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
    stopped_by_budget: bool
    device: str
    n_train: int
    n_val: int
    data_sha256: str
    weights_sha256: str
    seconds: float
    budget_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def follow_up(self, *, labels: str | Path | None = None) -> list[str]:
        """The commands that use the chosen encoder on the same data."""
        config = _shell(self.config_path)
        if self.data.endswith(".npz"):
            data = _shell(self.data)
            return [
                f"medsearch evaluate {data} --config {config} --protocol mahbod2024",
                f"medsearch evaluate {data} --config {config} --protocol medmnistplus",
            ]
        index = _shell(self.config_path.with_suffix("")) + "-index"
        labels_part = f" --labels {_shell(labels)}" if labels else ""
        return [
            f"medsearch index {_shell(self.data)} --index {index} --config {config}{labels_part}",
            f"medsearch query STUDY --index {index}",
        ]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("checkpoint", "adapter", "last_checkpoint", "metadata_path", "config_path"):
            out[key] = None if out[key] is None else str(out[key])
        out["seconds"] = round(self.seconds, 2)
        out["best_value"] = None if not np.isfinite(self.best_value) else self.best_value
        return out


def train_encoder(data: str | Path, out: str | Path, *, options: TrainOptions | None = None, **settings: Any) -> TrainReport:
    """Adapt the encoder to an npz file or a DICOM archive, never leaving it worse than frozen.

    Parameters
    ----------
    data : str or Path
        A MedMNIST-format ``.npz`` (its ``train`` split trains, ``val`` validates; ``test`` is never
        read), or a DICOM file or archive folder.
    out : str or Path
        Where the run's files go: ``runs/site`` (or ``runs/site.pt``) writes ``runs/site.toml``,
        ``runs/site.json`` and, as the choice requires, ``runs/site.adapter.pt`` or the fine-tuned
        weights ``runs/site.pt`` (see :mod:`medsearch.train`).
    options : TrainOptions, optional
        How to train (default: ``TrainOptions()``: the recipe chooses).
    **settings
        Fields of :class:`~medsearch.train.options.TrainOptions` that override ``options``
        (``epochs=30``, ``mode="adapter"``, ``labels="labels.csv"``, ...).

    Returns
    -------
    TrainReport

    Raises
    ------
    InvalidStudyError
        The data is missing, unreadable, has no train split, or holds no decodable image.
    ConfigError
        Bad or unknown settings; labels missing where an adapter or supervised run needs them; too
        few images or classes; a resume state written with other settings (give another ``out``
        or ``resume=False``).
    WriteError
        A file beside ``out`` cannot be written.
    """
    started = time.perf_counter()
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigError(
            f"unknown training setting(s) {', '.join(map(repr, unknown))}; the settings are: {', '.join(sorted(_SETTINGS))}"
        )
    options = replace(options or TrainOptions(), **settings)
    data = Path(data)
    paths = _paths(Path(out))
    config, labels = options.config, options.labels
    cfg = config if isinstance(config, Config) else load_config(config)
    if cfg.encoder.adapter:  # a run adapts the network, never an adapter on top of another
        cfg = cfg.replace(encoder={"adapter": "", "adapter_sha256": ""})
    if not data.exists():
        raise InvalidStudyError(f"{data} does not exist; give a MedMNIST-format .npz file or a DICOM archive folder")
    is_npz = data.is_file() and data.suffix.lower() == ".npz"
    if labels is not None and is_npz:
        raise ConfigError(f"{data} carries its own labels; --labels goes with a DICOM archive")
    if labels is not None and not Path(labels).is_file():
        raise ConfigError(f"labels file {labels} does not exist; give a CSV with one row per file or series")
    if options.mode is TrainMode.SUPERVISED and not (is_npz or labels is not None):
        raise ConfigError(
            f"supervised training needs labels; give --labels CSV for {data}, or use --mode selfsupervised"
        )

    run_device = resolve_device(options.device)
    _seed_everything(options.seed)
    cases = find_cases(data, options, slices=cfg.preprocess.slices)
    given_size = options.size if options.size is not None else (cfg.preprocess.size if config is not None else None)
    recipe = pick_recipe(
        cases.profile(), Machine(device=run_device, cores=os.cpu_count() or 2), budget_minutes=options.budget_minutes,
        mode=options.mode, size=given_size, epochs=options.epochs, loss=options.loss,
    )
    # The frozen candidate is the encoder as the user would run it without training: the config
    # given (or the default), at the size given; the recipe's own choice of size must earn its place.
    start_cfg = cfg.replace(preprocess={"size": int(options.size)}) if options.size is not None else cfg
    cfg = cfg.replace(preprocess={"size": recipe.size})
    check_data(cases.train_labels, cases.val_labels, recipe.mode, data)
    deadline = started + recipe.budget_s
    if recipe.mode is TrainMode.ADAPTER:
        outcome = run_adapter(cases, cfg, options, recipe, paths, start=start_cfg, device=run_device, deadline=deadline)
    else:
        run = _run_settings(cfg, options, recipe)
        outcome = run_network(cases, cfg, options, recipe, paths, run=run, start=start_cfg, device=run_device, deadline=deadline)

    _write_text(paths["toml"], _config_toml(outcome.config, data))
    report = _report(data, paths, recipe, outcome, options, run_device, time.perf_counter() - started)
    metadata = {
        "format": FORMAT,
        **report.to_dict(),
        "classes": outcome.classes,
        "config": outcome.config.to_dict(),
        "train_seconds_total": round(outcome.train_seconds, 2),
        "torch": torch.__version__,
    }
    _write_text(paths["json"], json.dumps(metadata, indent=2) + "\n")
    return report


def _run_settings(cfg: Config, options: TrainOptions, recipe: Recipe) -> RunSettings:
    """What decides a network run's result (a resume must find the same), resolved from the recipe."""
    if cfg.encoder.name.lower() != DEFAULT_ENCODER:
        raise ConfigError(
            f"medsearch train fine-tunes {DEFAULT_ENCODER} only, not {cfg.encoder.name!r}; "
            f"set encoder.name = \"{DEFAULT_ENCODER}\" in the config, or use --mode adapter"
        )
    mode, loss, epochs = recipe.mode, recipe.loss, recipe.epochs
    head_epochs = options.head_epochs
    if head_epochs is None:  # one epoch for SimCLR's new projection head (see medsearch.train)
        head_epochs = 1 if mode is TrainMode.SELFSUPERVISED and epochs > 1 else 0
    if head_epochs >= epochs:
        raise ConfigError(f"head_epochs must be at least 0 and below epochs ({epochs}), got {head_epochs}")
    if head_epochs and mode is TrainMode.SUPERVISED and loss is not SupervisedLoss.CLASSIFIER:
        raise ConfigError(f"the {loss.value} loss has no head to train alone; give head_epochs 0, or loss classifier")
    start = load_encoder(cfg.replace(encoder={"device": "cpu"}).encoder)
    freeze_norm = options.freeze_norm
    return RunSettings(
        mode=mode.value,
        loss=loss.value if mode is TrainMode.SUPERVISED else "ntxent",
        epochs=int(epochs),
        batch_size=int(options.batch_size),
        lr=float(options.lr),
        weight_decay=float(options.weight_decay),
        temperature=float(options.temperature),
        seed=int(options.seed),
        val_split=float(options.val_split),
        patience=int(options.patience),
        select_metric=options.select_metric if mode is TrainMode.SUPERVISED else "val_loss",
        flips=bool(options.flips),
        augment=float(options.augment),
        steps_per_epoch=options.steps_per_epoch,
        preprocess=cfg.to_dict()["preprocess"],
        start_weights_sha256=start.info.weights_sha256,
        head_epochs=int(head_epochs),
        freeze_norm=bool(freeze_norm if freeze_norm is not None else mode is TrainMode.SELFSUPERVISED),
    )


def _report(
    data: Path, paths: dict[str, Path], recipe: Recipe, outcome: Outcome, options: TrainOptions, device: str, seconds: float
) -> TrainReport:
    choice = outcome.choice
    chosen = choice.chosen.name if choice is not None else ("fine-tuned" if recipe.mode is TrainMode.SUPERVISED else "self-supervised")
    return TrainReport(
        config_path=paths["toml"],
        metadata_path=paths["json"],
        chosen=chosen,
        verdict=outcome.verdict,
        candidates=choice.table if choice is not None else [],
        recipe=recipe.to_dict(),
        checkpoint=outcome.checkpoint,
        adapter=outcome.adapter,
        last_checkpoint=outcome.last_checkpoint,
        data=str(data),
        mode=recipe.mode.value,
        loss=str(outcome.settings.get("loss", recipe.loss.value)),
        select_metric=choice.metric if choice is not None else str(outcome.settings.get("select_metric", options.select_metric)),
        epochs=recipe.epochs,
        epochs_completed=outcome.epochs_completed,
        best_epoch=outcome.best_epoch,
        best_value=outcome.best_value,
        history=outcome.history,
        resumed_from_epoch=outcome.resumed_from_epoch,
        stopped_early=outcome.stopped_early,
        stopped_by_budget=outcome.stopped_by_budget,
        device=device,
        n_train=outcome.n_train,
        n_val=outcome.n_val,
        data_sha256=outcome.data_sha256,
        weights_sha256=outcome.weights_sha256,
        seconds=seconds,
        budget_s=recipe.budget_s,
        settings=outcome.settings,
        details=outcome.details,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _paths(out: Path) -> dict[str, Path]:
    """The run's files: ``out`` names them with or without its ``.pt``.

    Raises
    ------
    ConfigError
        ``out`` has another suffix, or is a folder.
    """
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the name of the run's files, e.g. {out / 'encoder'}")
    if out.suffix not in ("", ".pt"):
        raise ConfigError(f"--out {out} must end in .pt or have no suffix (the config, record and weights go beside it)")
    stem = out.with_suffix("") if out.suffix == ".pt" else out
    return {
        "best": Path(f"{stem}.pt"),
        "adapter": Path(f"{stem}.adapter.pt"),
        "last": Path(f"{stem}.last.pt"),
        "json": Path(f"{stem}.json"),
        "toml": Path(f"{stem}.toml"),
    }


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _files.write_text(path, text)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or first_line(e)}); give --out a writable folder") from e


def _config_toml(cfg: Config, data: Path) -> str:
    d = cfg.to_dict()
    lines = [
        f"# Written by medsearch train on {data.name}: the preprocessing and the encoder it chose.",
        "# Give this file to medsearch index / query / evaluate as --config.",
    ]
    for section in ("preprocess", "encoder", "index"):
        lines.append(f"\n[{section}]")
        for key, value in d[section].items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _shell(value: str | Path) -> str:
    return shlex.quote(str(value))
