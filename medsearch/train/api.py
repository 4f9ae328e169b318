"""The entry point of training: :func:`train_encoder`, and :class:`TrainReport`, what a run did and wrote.

:func:`train_encoder` checks the settings and the data, resolves what depends on the data (``auto``
mode, the head epochs, BatchNorm), loads the images, runs the :class:`~medsearch.train.trainer.Trainer`
and writes, beside the checkpoint ``out``, a TOML config ready for ``medsearch index/query/evaluate``
and a JSON record of the run.
"""

from __future__ import annotations

import json
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
from medsearch.train.data import check_data, load_archive, load_npz
from medsearch.train.options import SupervisedLoss, TrainMode, TrainOptions
from medsearch.train.trainer import FORMAT, RunSettings, Trainer

__all__ = ["TrainReport", "train_encoder"]

_SETTINGS = frozenset(f.name for f in fields(TrainOptions))


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
        Per epoch: ``epoch``, ``loss``, ``val_loss`` (self-supervised), the :data:`~medsearch.train.options.VAL_METRICS`,
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


def train_encoder(data: str | Path, out: str | Path, *, options: TrainOptions | None = None, **settings: Any) -> TrainReport:
    """Fine-tune EfficientNet-Lite0 for retrieval on an npz file or a DICOM archive.

    Parameters
    ----------
    data : str or Path
        A MedMNIST-format ``.npz`` (its ``train`` split trains, ``val`` selects; ``test`` is never
        read), or a DICOM file or archive folder.
    out : str or Path
        The checkpoint to write (``.pt``); the other files go beside it (see :mod:`medsearch.train`).
    options : TrainOptions, optional
        How to train (default: ``TrainOptions()``).
    **settings
        Fields of :class:`~medsearch.train.options.TrainOptions` that override ``options``
        (``epochs=30``, ``mode="selfsupervised"``, ``labels="labels.csv"``, ...).

    Returns
    -------
    TrainReport

    Raises
    ------
    InvalidStudyError
        The data is missing, unreadable, has no train split, or holds no decodable image.
    ConfigError
        Bad or unknown settings; labels missing where a supervised run needs them; too few images
        or classes; a resume state written with other settings (give another ``out`` or
        ``resume=False``).
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
    out = Path(out)
    if out.suffix != ".pt":
        raise ConfigError(f"the checkpoint {out} must end in .pt (the config, record and resume state go beside it)")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the checkpoint file to write, e.g. {out / 'encoder.pt'}")
    config, labels = options.config, options.labels
    cfg = config if isinstance(config, Config) else load_config(config)
    if options.size is not None:
        cfg = cfg.replace(preprocess={"size": int(options.size)})
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
    mode, loss, epochs = options.mode, options.loss, options.epochs
    if mode is TrainMode.AUTO:
        mode = TrainMode.SUPERVISED if has_labels else TrainMode.SELFSUPERVISED
    if mode is TrainMode.SUPERVISED and not has_labels:
        raise ConfigError(
            f"supervised training needs labels; give --labels CSV for {data}, or use --mode selfsupervised"
        )
    head_epochs = options.head_epochs
    if head_epochs is None:  # one epoch for SimCLR's new projection head (see medsearch.train)
        head_epochs = 1 if mode is TrainMode.SELFSUPERVISED and epochs > 1 else 0
    if head_epochs and mode is TrainMode.SUPERVISED and loss is not SupervisedLoss.CLASSIFIER:
        raise ConfigError(f"the {loss.value} loss has no head to train alone; give head_epochs 0, or loss classifier")

    run_device = resolve_device(options.device)
    _seed_everything(options.seed)
    dataset = load_npz(data, cfg, options) if is_npz else load_archive(data, cfg, options)
    check_data(dataset, mode, data)

    encoder_cfg = cfg.encoder
    start_encoder = load_encoder(Config(encoder=encoder_cfg).replace(encoder={"device": "cpu"}).encoder)
    freeze_norm = options.freeze_norm
    run = RunSettings(
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
        start_weights_sha256=start_encoder.info.weights_sha256,
        head_epochs=int(head_epochs),
        freeze_norm=bool(freeze_norm if freeze_norm is not None else mode is TrainMode.SELFSUPERVISED),
    )
    trainer = Trainer(start_encoder.net, dataset, run, run_device)
    paths = _paths(out)
    resumed_from = trainer.maybe_resume(paths["last"], dataset.sha256) if options.resume else 0
    stopped_early = trainer.fit(paths, progress=options.progress)

    weights_sha = _files.sha256_file(paths["best"])
    final_cfg = cfg.replace(encoder={"checkpoint": str(paths["best"].resolve())})
    _write_text(paths["toml"], _config_toml(final_cfg, data))
    report = TrainReport(
        checkpoint=paths["best"],
        last_checkpoint=paths["last"],
        metadata_path=paths["json"],
        config_path=paths["toml"],
        data=str(data),
        mode=run.mode,
        loss=run.loss,
        select_metric=run.select_metric,
        epochs=run.epochs,
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
        settings=asdict(run),
    )
    metadata = {
        "format": FORMAT,
        **report.to_dict(),
        "classes": dataset.classes,
        "config": final_cfg.to_dict(),
        "train_seconds_total": round(trainer.train_seconds, 2),
        "torch": torch.__version__,
    }
    _write_text(paths["json"], json.dumps(metadata, indent=2) + "\n")
    return report


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


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _files.write_text(path, text)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or first_line(e)}); give --out a writable folder") from e


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


def _shell(value: str | Path) -> str:
    return shlex.quote(str(value))
