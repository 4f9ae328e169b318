"""The training loop of one run: the network, its heads and losses, the schedule, checkpoints, resume.

:class:`Trainer` takes the loaded data and the :class:`RunSettings` (everything that decides a
run's result, as resolved from :class:`~medsearch.train.options.TrainOptions`), validates the
network as loaded (epoch 0: the frozen candidate), trains epoch by epoch, validates after each
(validation cases query the training cases; :func:`medsearch.train.select.score_queries`), keeps
the per-query values of epoch 0 and of the best epoch for the final choice, and writes the best
weights and the resume state atomically. A deadline stops it when the next epoch would pass it.

Randomness is re-seeded at the start of every epoch from ``(seed, epoch)``, so a resumed run repeats
exactly the epochs an uninterrupted run would have. A resume state written with other settings or
data is refused.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medsearch import _files
from medsearch.errors import ConfigError, MedsearchError, WriteError, first_line
from medsearch.train.augment import Augmentation
from medsearch.train.data import Split, TrainData
from medsearch.train.options import SupervisedLoss, TrainMode
from medsearch.train.recipe import VAL_GALLERY
from medsearch.train.select import pool_rows, score_queries

__all__ = ["FORMAT", "RunSettings", "Trainer"]

log = logging.getLogger(__name__)

#: Version of the resume state and of the JSON record a run writes.
FORMAT = 2


@dataclass(frozen=True)
class RunSettings:
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


class Trainer:
    """The training state of one run: the network, its heads, the optimizer, the history."""

    def __init__(self, start: nn.Module, data: TrainData, settings: RunSettings, device: str) -> None:
        self.data = data
        self.settings = settings
        self.device = torch.device(device)
        torch.manual_seed(settings.seed)
        # A copy: the encoder cache of load_encoder must keep the weights it was loaded with.
        self.net = copy.deepcopy(start).float().train().to(self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
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
        self.augment = Augmentation(settings.flips, settings.augment)
        self.epoch = 0
        self.best_epoch = 0
        self.best_value: tuple[float, float] = (-math.inf, -math.inf)
        self.history: list[dict[str, Any]] = []
        self.bad_epochs = 0
        self.train_seconds = 0.0
        # Per-query validation values of the network as loaded (epoch 0) and at the best epoch:
        # what the run's choice between the frozen and the trained encoder compares.
        self.start_values: dict[str, list[float]] = {}
        self.best_values: dict[str, list[float]] = {}
        self.stopped_by_budget = False
        self._last_values: dict[str, list[float]] = {}
        self._best_weights: dict[str, torch.Tensor] | None = None

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
            "format": FORMAT,
            "settings": asdict(self.settings),
            "data_sha256": self.data.sha256,
            "epoch": self.epoch,
            "model": self._weights(),
            # the best epoch's weights too: the run may withdraw <out>.pt when it keeps the frozen
            # encoder, and a later resume must still know the best epoch
            "best_model": self._best_weights if self._best_weights is not None else self._weights(),
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_epoch": self.best_epoch,
            "best_value": list(self.best_value),
            "bad_epochs": self.bad_epochs,
            "history": json.dumps(self.history),
            "start_values": json.dumps(self.start_values),
            "best_values": json.dumps(self.best_values),
            "train_seconds": self.train_seconds,
            # Each epoch re-seeds from (seed, epoch); torch's state is kept for code outside the loop.
            "rng_torch": torch.get_rng_state(),
        }

    def _weights(self) -> dict[str, torch.Tensor]:
        # The EfficientNet inside the encoder's pooling wrapper: what load_encoder loads strictly.
        return {k: v.detach().cpu().contiguous() for k, v in self.net.get_submodule("model").state_dict().items()}

    def maybe_resume(self, path: Path, sha256: str) -> int:
        if not path.is_file():
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file
            raise ConfigError(f"cannot read the resume state {path} ({first_line(e)}); delete it or pass --no-resume") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a training state of this medsearch version; delete it or pass --no-resume")
        # settings added since a state was written take their defaults (the behaviour of that time)
        defaults = {f.name: f.default for f in fields(RunSettings) if f.default is not MISSING}
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
        self.net.get_submodule("model").load_state_dict(state["model"], strict=True)
        self._best_weights = state["best_model"]
        self.head.load_state_dict(state["head"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.best_epoch = int(state["best_epoch"])
        self.best_value = (float(state["best_value"][0]), float(state["best_value"][1]))
        self.bad_epochs = int(state["bad_epochs"])
        self.history = json.loads(state["history"])
        self.start_values = json.loads(state["start_values"])
        self.best_values = json.loads(state["best_values"])
        self.train_seconds = float(state["train_seconds"])
        torch.set_rng_state(state["rng_torch"])
        log.info("resuming %s after epoch %d", path, self.epoch)
        return self.epoch

    # -- the loop

    def fit(self, paths: dict[str, Path], *, progress: bool, deadline: float | None = None) -> bool:
        """Train up to ``settings.epochs``; True when it stopped early (patience, or ``deadline`` passed).

        Before the first epoch the network as loaded is validated and recorded as epoch 0: the
        frozen candidate. ``deadline`` is a ``time.perf_counter()`` value: the run stops when the
        next epoch, as long as the last one, would end after it.
        """
        s = self.settings
        if self.epoch == 0 and not self.history:
            t0 = time.perf_counter()
            start: dict[str, Any] = {"epoch": 0, "loss": None}
            start.update(self._validate(0, frozen=True))
            start["seconds"] = round(time.perf_counter() - t0, 2)
            self.start_values = self._last_values
            self.history.append(start)
            log.info("epoch 0 (the encoder as loaded): %s", start)
        if self.epoch >= s.epochs or (s.patience and self.bad_epochs >= s.patience):
            if not paths["best"].is_file():
                _save(self._best_weights if self._best_weights is not None else self._weights(), paths["best"])
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
                    self.best_values = self._last_values
                    self._best_weights = self._weights()
                    _save(self._best_weights, paths["best"])
                else:
                    self.bad_epochs += 1
                _save(self.state(), paths["last"])
                bar.update(1)
                shown = {"loss": f"{loss:.4f}", s.select_metric: f"{record.get(s.select_metric, float('nan')):.4f}"}
                bar.set_postfix(shown, refresh=True)
                log.info("epoch %d: %s", self.epoch, record)
                if s.patience and self.bad_epochs >= s.patience and self.epoch < s.epochs:
                    log.info("no better %s for %d epochs: stopping", s.select_metric, s.patience)
                    stopped = True
                    break
                if deadline is not None and self.epoch < s.epochs and time.perf_counter() + record["seconds"] > deadline:
                    log.info("the next epoch would pass the time budget: stopping after epoch %d", self.epoch)
                    stopped = self.stopped_by_budget = True
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
        self.augment.set_random_state(seed=seed % (2**32))
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
    def _embed(self, split: Split) -> np.ndarray:
        """Case embeddings exactly as indexing makes them: pool the slices, then L2-normalize."""
        self.net.eval()
        out = []
        for start in range(0, split.images.shape[0], 256):
            feats = self._forward(split.images[start : start + 256])
            out.append(torch.nn.functional.normalize(feats.float(), dim=1).cpu().numpy())
        return pool_rows(np.concatenate(out), split.case, split.n_cases, str(self.settings.preprocess.get("pool", "mean")))

    def validation_cases(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled training cases searched (at most a seeded :data:`VAL_GALLERY`) and the val cases querying."""
        train, val = self.data.train, self.data.val
        g_rows = np.flatnonzero(train.labels >= 0)
        if g_rows.size > VAL_GALLERY:
            g_rows = np.sort(np.random.default_rng(self.settings.seed).choice(g_rows, VAL_GALLERY, replace=False))
        return g_rows, np.flatnonzero(val.labels >= 0)

    def _validate(self, epoch: int, *, frozen: bool = False) -> dict[str, float]:
        """Validation means (val cases query training cases); the per-query values go to ``_last_values``.

        ``frozen``: the network as loaded, before any training (no self-supervised val loss: its
        projection head is not trained yet).
        """
        out: dict[str, float] = {}
        self._last_values = {}
        if not self.supervised and not frozen:
            out["val_loss"] = round(self._val_ssl_loss(epoch), 5)
        train, val = self.data.train, self.data.val
        if not (val.labels >= 0).any() or not (train.labels >= 0).any():
            return out
        g_rows, q_rows = self.validation_cases()
        gallery = self._embed(_subset(train, g_rows))
        queries = self._embed(_subset(val, q_rows))
        values = score_queries(gallery, train.labels[g_rows], queries, val.labels[q_rows], len(self.data.classes))
        self._last_values = {name: [round(float(x), 6) for x in v] for name, v in values.items()}
        out.update({name: round(float(v.mean()), 5) for name, v in values.items()})
        return out

    @torch.no_grad()
    def _val_ssl_loss(self, epoch: int) -> float:
        """NT-Xent on augmented pairs of validation images, with fixed randomness (label-free)."""
        self.net.eval()
        self.head.eval()
        state = torch.get_rng_state()
        self.augment.set_random_state(seed=self.settings.seed + 7919)
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


def _warm_cosine(step: int, *, start: int, warmup: int, total: int) -> float:
    """Learning-rate factor: 0 before ``start``, then a linear warm-up and a cosine down to ``total``."""
    if step < start:
        return 0.0
    step -= start
    span = max(1, total - start)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, span) / span))


def _subset(split: Split, cases: np.ndarray) -> Split:
    """The cases ``cases`` of a split (in that order), renumbered 0..n-1."""
    keep = np.flatnonzero(np.isin(split.case, cases))
    renumber = np.full(split.n_cases, -1, dtype=np.int64)
    renumber[cases] = np.arange(cases.shape[0])
    return Split(images=split.images[torch.as_tensor(keep)], case=renumber[split.case[keep]], labels=split.labels[cases])


def _normalize(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (1 or 3 channels) -> the 3-channel [-1, 1] input EfficientNet-Lite expects."""
    if images01.shape[1] == 1:
        images01 = images01.expand(-1, 3, -1, -1)
    return (images01 - 0.5) / 0.5


def _save(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, creating its folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _files.write_with(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or first_line(e)}); give --out a writable folder") from e
