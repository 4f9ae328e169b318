"""The two kinds of run, each ending with the choice between its candidates and the frozen encoder.

:func:`run_adapter` embeds every case once with the frozen encoder, cross-validates adapters on the
features (:mod:`medsearch.train.adapter`), chooses (:func:`medsearch.train.select.choose`) and, when
an adapter wins, trains it on all the cases and writes it. :func:`run_network` fine-tunes the
network (supervised or self-supervised, :class:`~medsearch.train.trainer.Trainer`), whose epoch 0
is the frozen encoder, and chooses between that and the best epoch on the val split. Both return an
:class:`Outcome`: the choice, the config to write and what else was written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsearch._files import sha256_file
from medsearch.config import Config
from medsearch.encoders import EncoderInfo, load_encoder, save_adapter
from medsearch.train.adapter import AdapterSettings, best_lengths, cross_validate, fit_final
from medsearch.train.data import Cases, TrainData, check_data, load_cases
from medsearch.train.options import TrainMode, TrainOptions
from medsearch.train.recipe import ADAPTER_EPOCHS, Recipe
from medsearch.train.select import Candidate, Choice, choose, pool_rows, score_queries
from medsearch.train.trainer import RunSettings, Trainer

__all__ = ["Outcome", "run_adapter", "run_network"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a run chose and wrote (besides the config and the record, which the caller writes)."""

    choice: Choice | None
    config: Config
    checkpoint: Path | None
    adapter: Path | None
    weights_sha256: str
    n_train: int
    n_val: int
    data_sha256: str
    classes: list[str]
    settings: dict[str, Any]
    verdict: str
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_completed: int = 0
    best_epoch: int = 0
    best_value: float = float("nan")
    resumed_from_epoch: int = 0
    stopped_early: bool = False
    stopped_by_budget: bool = False
    last_checkpoint: Path | None = None
    train_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def decision_metric(values: dict[str, Any], wanted: str) -> str:
    """``wanted`` when it was scored; else, for a gallery smaller than its k, the largest-k one that was."""
    for name in (wanted, "map_hits@5", "hit@1"):
        if name in values:
            return name
    return wanted


def _withdraw(path: Path, why: str) -> None:
    """Remove a file this run's naming produced that the written config no longer uses."""
    if path.is_file():
        path.unlink()
        log.info("removed %s: %s", path, why)


def _frozen_features(cases: Cases, cfg: Config, device: str, progress: bool) -> tuple[TrainData, EncoderInfo]:
    encoder = load_encoder(cfg.replace(encoder={"device": device}).encoder, input_size=cfg.preprocess.size)
    return load_cases(cases, cfg, embed=encoder.embed, info=encoder.info, progress=progress), encoder.info


def run_adapter(
    cases: Cases, cfg: Config, options: TrainOptions, recipe: Recipe, paths: dict[str, Path], *,
    start: Config, device: str, deadline: float,
) -> Outcome:
    """Embed once, cross-validate the adapters, choose, and write the adapter when one is chosen.

    ``start`` is the config the run started from: when the recipe chose another input size, the
    frozen encoder at ``start``'s size is embedded too and is the ``frozen`` candidate.
    """
    t0 = time.perf_counter()
    data, info = _frozen_features(cases, cfg, device, options.progress)
    reference = None
    sizes: tuple[int, ...] = (cfg.preprocess.size,)
    if start.preprocess.size != cfg.preprocess.size:
        reference, _ = _frozen_features(cases, start, device, options.progress)
        sizes = (start.preprocess.size, cfg.preprocess.size)
    embed_seconds = time.perf_counter() - t0
    check_data(data.train.labels, data.val.labels, TrainMode.ADAPTER, cases.source)
    settings = AdapterSettings(
        lengths=ADAPTER_EPOCHS if options.epochs is None else (int(options.epochs),),
        folds=recipe.folds,
        loss=recipe.loss.value,
        seed=int(options.seed),
        pool=cfg.preprocess.pool,
        temperature=float(options.temperature),
    )
    cv = cross_validate(data, settings, sizes=sizes, reference=reference, deadline=deadline)
    metric = decision_metric(cv.candidates[0].values, options.select_metric)
    candidates = best_lengths(cv, metric)
    choice = choose(candidates, metric, seed=int(options.seed))
    chosen = choice.chosen
    final_cfg = start if chosen.name == "frozen" else cfg
    adapter_path: Path | None = None
    weights_sha = info.weights_sha256
    if chosen.name.startswith("adapter-"):
        adapter = fit_final(data, chosen.detail["kind"], int(chosen.detail["epochs"]), settings)
        record = {
            "data": str(cases.source), "data_sha256": data.sha256, "encoder": info.to_dict(),
            "preprocess": cfg.to_dict()["preprocess"], "settings": asdict(settings), "epochs": chosen.detail["epochs"],
        }
        weights_sha = save_adapter(adapter, paths["adapter"], record=record)
        adapter_path = paths["adapter"]
        final_cfg = cfg.replace(encoder={"adapter": str(adapter_path.resolve()), "adapter_sha256": weights_sha})
    else:
        _withdraw(paths["adapter"], "the frozen encoder was chosen")
    return Outcome(
        choice=choice,
        config=final_cfg,
        checkpoint=None,
        adapter=adapter_path,
        weights_sha256=weights_sha,
        n_train=data.train.n_cases,
        n_val=data.val.n_cases,
        data_sha256=data.sha256,
        classes=data.classes,
        settings={**asdict(settings), "mode": TrainMode.ADAPTER.value, "select_metric": metric},
        verdict=choice.verdict,
        epochs_completed=int(chosen.detail.get("epochs", 0)),
        stopped_by_budget=cv.stopped_by_budget,
        details={
            "embed_seconds": round(embed_seconds, 2),
            "cross_validation": {
                "folds": settings.folds,
                "folds_done": cv.folds_done,
                "queries": cv.n_queries,
                "seconds": round(cv.seconds, 2),
                "stopped_by_budget": cv.stopped_by_budget,
            },
            "feature_dim": int(data.train.images.shape[1]),
        },
    )


def _reference_values(reference: TrainData, trainer: Trainer, pool: str) -> dict[str, np.ndarray]:
    """The frozen encoder at the start config's size, scored on the trainer's own validation search."""
    g_rows, q_rows = trainer.validation_cases()
    train, val = reference.train, reference.val
    gallery = pool_rows(train.images.numpy(), train.case, train.n_cases, pool)[g_rows]
    queries = pool_rows(val.images.numpy(), val.case, val.n_cases, pool)[q_rows]
    return score_queries(gallery, train.labels[g_rows], queries, val.labels[q_rows], len(reference.classes))


def run_network(
    cases: Cases, cfg: Config, options: TrainOptions, recipe: Recipe, paths: dict[str, Path], *, run: RunSettings,
    start: Config, device: str, deadline: float,
) -> Outcome:
    """Fine-tune from epoch 0 (the frozen encoder), then choose between it and the best epoch.

    ``start`` is the config the run started from: when the recipe chose another input size, the
    frozen encoder at ``start``'s size is scored on the same validation search too, as the
    ``frozen`` candidate (epoch 0 is then ``frozen-resized``).
    """
    data = load_cases(cases, cfg, progress=options.progress)
    check_data(data.train.labels, data.val.labels, recipe.mode, cases.source)
    reference = None
    if start.preprocess.size != cfg.preprocess.size and (data.val.labels >= 0).any():
        reference, _ = _frozen_features(cases, start, "cpu", options.progress)
    start_encoder = load_encoder(cfg.replace(encoder={"device": "cpu"}).encoder)
    trainer = Trainer(start_encoder.net, data, run, device)
    resumed_from = trainer.maybe_resume(paths["last"], data.sha256) if options.resume else 0
    stopped_early = trainer.fit(paths, progress=options.progress, deadline=deadline)
    name = "fine-tuned" if recipe.mode is TrainMode.SUPERVISED else "self-supervised"
    epoch0, best = trainer.start_values, trainer.best_values
    choice: Choice | None = None
    frozen_chosen = False
    if epoch0 and best:
        metric = decision_metric(epoch0, options.select_metric)
        best_record = next((h for h in trainer.history if h.get("epoch") == trainer.best_epoch), {})
        detail = {"size": cfg.preprocess.size, "epochs": trainer.best_epoch, "of_epochs": trainer.epoch}
        if "val_loss" in best_record:
            detail["val_loss"] = best_record["val_loss"]
        candidates = [Candidate("frozen", {k: np.asarray(v) for k, v in epoch0.items()}, {"size": cfg.preprocess.size, "epochs": 0})]
        if reference is not None:
            candidates = [
                Candidate("frozen", _reference_values(reference, trainer, cfg.preprocess.pool), {"size": start.preprocess.size}),
                Candidate("frozen-resized", candidates[0].values, candidates[0].detail),
            ]
        candidates.append(Candidate(name, {k: np.asarray(v) for k, v in best.items()}, detail))
        choice = choose(candidates, metric, seed=int(options.seed))
        verdict = choice.verdict
        keep_trained = choice.chosen.name == name
        frozen_chosen = choice.frozen_chosen
    else:
        verdict = (
            f"no validation labels: the run cannot tell whether the {name} encoder beats the frozen one; "
            f"writing the {name} encoder (best epoch {trainer.best_epoch} by {run.select_metric})"
        )
        keep_trained = True
    if keep_trained:
        weights_sha = sha256_file(paths["best"])
        final_cfg = cfg.replace(encoder={"checkpoint": str(paths["best"].resolve())})
        checkpoint: Path | None = paths["best"]
    else:
        _withdraw(paths["best"], "the frozen encoder was chosen")
        weights_sha = start_encoder.info.weights_sha256
        final_cfg = start if frozen_chosen else cfg
        checkpoint = None
    return Outcome(
        choice=choice,
        config=final_cfg,
        checkpoint=checkpoint,
        adapter=None,
        weights_sha256=weights_sha,
        n_train=data.train.n_cases,
        n_val=data.val.n_cases,
        data_sha256=data.sha256,
        classes=data.classes,
        settings=asdict(run),
        verdict=verdict,
        history=trainer.history,
        epochs_completed=trainer.epoch,
        best_epoch=trainer.best_epoch,
        best_value=float(trainer.best_value[0]),
        resumed_from_epoch=resumed_from,
        stopped_early=stopped_early,
        stopped_by_budget=trainer.stopped_by_budget,
        last_checkpoint=paths["last"],
        train_seconds=trainer.train_seconds,
    )
