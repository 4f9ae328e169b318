"""Adapter runs: embed every image once with the frozen encoder, then train small projections on the features.

The training and validation cases are pooled and split into ``folds`` folds, stratified by label.
For each fold, every adapter kind (``linear``, ``mlp``) trains on the features of the other folds,
and is scored after each length of :data:`~medsearch.train.recipe.ADAPTER_EPOCHS` epochs: the
fold's cases query the other folds' cases (each side through the same adapter, slice vectors pooled
per case as indexing pools them). The frozen features are scored the same way, so every candidate
has a value for every case of train and val, on the same queries against the same galleries:
:func:`medsearch.train.select.choose` compares them query by query. Each kind keeps the length
with the best mean; the chosen kind is then trained again on all the cases, as ``members``
projections with different seeds whose outputs the :class:`~medsearch.encoders.Adapter` averages.

Training is on the cached features only: a step is a matrix product on a batch of 128 rows, so
one CPU thread runs it (more threads only contend on a shared 2-core machine). Batches hold as many
rows of each class. The losses are pytorch-metric-learning's Multi-Similarity (with its miner) or
supervised contrastive loss, on the adapter's normalized output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medsearch.encoders import ADAPTER_KINDS, Adapter
from medsearch.errors import ConfigError
from medsearch.train.data import TrainData
from medsearch.train.options import SupervisedLoss
from medsearch.train.select import Candidate, pool_rows, score_queries

__all__ = ["AdapterSettings", "CrossValidation", "best_lengths", "cross_validate", "fit_adapter", "fit_final"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSettings:
    """How adapters are trained (every field is recorded in the run's JSON)."""

    lengths: tuple[int, ...]
    folds: int
    loss: str = SupervisedLoss.MULTISIMILARITY.value
    kinds: tuple[str, ...] = ADAPTER_KINDS
    out_dim: int = 256
    hidden: int = 512
    members: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    seed: int = 0
    pool: str = "mean"

    def __post_init__(self) -> None:
        if self.loss == SupervisedLoss.CLASSIFIER.value:
            raise ConfigError("an adapter learns with the multisimilarity or supcon loss; the classifier loss is for --mode supervised")
        if self.folds < 2:
            raise ConfigError(f"cross-validation needs at least 2 folds, got {self.folds}")


@dataclass
class CrossValidation:
    """The candidates scored by cross-validation, and what it covered."""

    candidates: list[Candidate]
    n_queries: int
    folds_done: int
    seconds: float
    stopped_by_budget: bool


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pooled_data(data: TrainData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train and val together: row features, each row's case (renumbered), each case's label (labelled cases only)."""
    rows, cases, labels = [], [], []
    offset = 0
    for split in (data.train, data.val):
        keep = split.labels >= 0
        renumber = np.full(split.n_cases, -1, dtype=np.int64)
        renumber[keep] = offset + np.arange(int(keep.sum()))
        row_keep = keep[split.case]
        rows.append(split.images.numpy()[row_keep])
        cases.append(renumber[split.case[row_keep]])
        labels.append(split.labels[keep])
        offset += int(keep.sum())
    return np.concatenate(rows).astype(np.float32), np.concatenate(cases), np.concatenate(labels)


def _folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per case, stratified: each class's cases dealt round the folds in a seeded order."""
    fold = np.empty(labels.shape[0], dtype=np.int64)
    rng = np.random.default_rng([seed, 17])
    start = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (start + np.arange(idx.size)) % folds
        start = (start + idx.size) % folds
    return fold


def _loss(settings: AdapterSettings) -> tuple[Any, Any]:
    from pytorch_metric_learning import losses, miners

    if settings.loss == SupervisedLoss.SUPCON.value:
        return losses.SupConLoss(temperature=settings.temperature), None
    return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)


def fit_adapter(
    rows: np.ndarray, row_labels: np.ndarray, kind: str, settings: AdapterSettings, *, seed: int, lengths: tuple[int, ...]
) -> dict[int, Adapter]:
    """Train one projection of ``kind`` on ``rows``; its weights after each epoch count in ``lengths``.

    An epoch is as many class-balanced batches as it takes to see ``len(rows)`` rows.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adapter = Adapter(kind, rows.shape[1], settings.out_dim, hidden=settings.hidden)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn, miner = _loss(settings)
    x = torch.from_numpy(rows)
    by_class = [np.flatnonzero(row_labels == c) for c in np.unique(row_labels)]
    # a small set takes smaller batches, so that an epoch is several steps, not one
    batch_size = min(settings.batch_size, max(16, rows.shape[0] // 4))
    per_class = max(2, batch_size // len(by_class))
    steps = max(1, math.ceil(rows.shape[0] / (per_class * len(by_class))))
    snapshots: dict[int, Adapter] = {}
    with _one_thread():
        for epoch in range(1, max(lengths) + 1):
            adapter.train()
            for _ in range(steps):
                batch = np.concatenate([rng.choice(c, per_class, replace=c.size < per_class) for c in by_class])
                out = adapter(x[torch.as_tensor(batch)])
                labels = torch.as_tensor(row_labels[batch])
                loss = loss_fn(out, labels, miner(out, labels)) if miner is not None else loss_fn(out, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if epoch in lengths:
                snapshot = Adapter(kind, rows.shape[1], settings.out_dim, hidden=settings.hidden)
                snapshot.load_state_dict(adapter.state_dict())
                snapshots[epoch] = snapshot.eval()
    return snapshots


def cross_validate(
    data: TrainData,
    settings: AdapterSettings,
    *,
    sizes: tuple[int, ...] | None = None,
    reference: TrainData | None = None,
    deadline: float | None = None,
) -> CrossValidation:
    """Score the frozen features and every adapter kind and length on ``settings.folds`` folds of train + val.

    ``reference``: the same cases embedded by the frozen encoder at the input size of the config
    the run started from, when the recipe chose another; it is then the ``frozen`` candidate, and
    ``data``'s own frozen features ``frozen-resized``. ``sizes``: the input size of each frozen
    candidate (the run's last), recorded in the candidates' details.
    Stops after the fold in progress when ``deadline`` (a ``time.perf_counter()`` value) has passed;
    the candidates then hold the queries of the folds done (at least one).
    """
    started = time.perf_counter()
    rows, case, labels = _pooled_data(data)
    references: list[np.ndarray] = []
    if reference is not None:
        ref_rows, ref_case, ref_labels = _pooled_data(reference)
        if not np.array_equal(ref_labels, labels):
            raise ConfigError("the reference embedding holds other cases than the run's; report this as a bug")
        references.append(pool_rows(ref_rows, ref_case, ref_labels.shape[0], settings.pool))
    n_classes = len(data.classes)
    row_labels = labels[case]
    fold = _folds(labels, settings.folds, settings.seed)
    lengths = tuple(sorted(settings.lengths))
    frozen_cases = pool_rows(rows, case, labels.shape[0], settings.pool)
    values: dict[tuple[str, int], dict[str, list[np.ndarray]]] = {}
    frozen_sets = [*references, frozen_cases]
    frozen: list[dict[str, list[np.ndarray]]] = [{} for _ in frozen_sets]
    queries: list[np.ndarray] = []
    done, stopped = 0, False
    for f in range(settings.folds):
        q_cases = np.flatnonzero(fold == f)
        g_cases = np.flatnonzero(fold != f)
        g_rows = np.isin(case, g_cases)
        queries.append(q_cases)
        for vectors, scores in zip(frozen_sets, frozen, strict=True):
            for name, v in score_queries(vectors[g_cases], labels[g_cases], vectors[q_cases], labels[q_cases], n_classes).items():
                scores.setdefault(name, []).append(v)
        for kind in settings.kinds:
            snapshots = fit_adapter(rows[g_rows], row_labels[g_rows], kind, settings, seed=settings.seed * 1000 + f, lengths=lengths)
            for length, adapter in snapshots.items():
                adapted = pool_rows(adapter.project(rows), case, labels.shape[0], settings.pool)
                scored = score_queries(adapted[g_cases], labels[g_cases], adapted[q_cases], labels[q_cases], n_classes)
                for name, v in scored.items():
                    values.setdefault((kind, length), {}).setdefault(name, []).append(v)
        done += 1
        log.info("adapter cross-validation: fold %d of %d done", done, settings.folds)
        if deadline is not None and time.perf_counter() > deadline and done < settings.folds:
            stopped = True
            break
    # a metric whose k exceeds a fold's gallery is left out of that fold: keep those every fold scored
    names = [n for n in frozen[0] if len(frozen[0][n]) == done]
    frozen_names = ["frozen", "frozen-resized"] if references else ["frozen"]
    frozen_sizes: list[dict[str, Any]] = [{"size": s} for s in sizes] if sizes else [{} for _ in frozen_names]
    candidates = [
        Candidate(name, {n: np.concatenate(scores[n]) for n in names}, detail)
        for name, scores, detail in zip(frozen_names, frozen, frozen_sizes, strict=True)
    ]
    for kind in settings.kinds:
        per_length = {length: {n: np.concatenate(values[(kind, length)][n]) for n in names} for length in lengths}
        size = {"size": sizes[-1]} if sizes else {}
        candidates.append(Candidate(f"adapter-{kind}", {}, {**size, "kind": kind, "by_length": per_length}))
    return CrossValidation(
        candidates=candidates,
        n_queries=int(sum(q.size for q in queries)),
        folds_done=done,
        seconds=time.perf_counter() - started,
        stopped_by_budget=stopped,
    )


def best_lengths(cv: CrossValidation, metric: str) -> list[Candidate]:
    """Each adapter kind at the length with the best mean ``metric`` (the shorter on a tie); frozen first."""
    out = [c for c in cv.candidates if c.name.startswith("frozen")]
    for c in cv.candidates[len(out):]:
        by_length: dict[int, dict[str, np.ndarray]] = c.detail["by_length"]
        means = {length: float(np.mean(v[metric])) for length, v in by_length.items()}
        length = min(means, key=lambda n: (-means[n], n))
        detail = {
            **({"size": c.detail["size"]} if "size" in c.detail else {}),
            "kind": c.detail["kind"],
            "epochs": length,
            "cv_by_epochs": {str(n): round(m, 5) for n, m in sorted(means.items())},
        }
        out.append(Candidate(c.name, by_length[length], detail))
    return out


def fit_final(data: TrainData, kind: str, epochs: int, settings: AdapterSettings) -> Adapter:
    """The chosen kind and length trained on every labelled case, as ``settings.members`` projections."""
    rows, case, labels = _pooled_data(data)
    members = [
        fit_adapter(rows, labels[case], kind, settings, seed=settings.seed * 1000 + 100 + m, lengths=(epochs,))[epochs]
        for m in range(settings.members)
    ]
    adapter = Adapter(kind, rows.shape[1], settings.out_dim, hidden=settings.hidden, members=settings.members)
    for head, member in zip(adapter.heads, members, strict=True):
        head.load_state_dict(member.heads[0].state_dict())
    return adapter.eval()
