"""Which encoder a run writes: the candidates, scored on the same queries, and a rule that keeps noise out.

Every run has the frozen encoder, at the input size of the config it started from (the default
224 px), as its first candidate; the frozen encoder at the recipe's input size when that differs
(``frozen-resized``) and the trained ones (adapters, a fine-tuned network) join it, each with its per-query values of the validation metrics on the *same* queries
against the same galleries, so that two candidates can be compared query by query.
:func:`choose` then applies the rule:

1. Any other candidate *qualifies* only when its gain over the frozen encoder is above zero beyond
   the noise: the percentile bootstrap interval of the mean per-query gain (queries resampled in
   pairs, :func:`medsearch.metrics.bootstrap_ci`) lies above zero. The interval is 95%, widened
   for the number of other candidates (Bonferroni), so that trying more of them does not make a
   lucky one more likely to pass.
2. Among the frozen encoder and the qualifying candidates, the best mean wins, unless a simpler
   one (frozen < frozen at another size < linear adapter < MLP adapter < fine-tuned network) is
   within the noise of it: then the simplest such one.

:class:`Choice` holds the chosen candidate, a table with every candidate's means, interval and
gain, and one sentence that says what was chosen and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsearch.errors import ConfigError
from medsearch.metrics import bootstrap_ci, compute_metrics
from medsearch.train.options import VAL_METRICS

__all__ = ["COMPLEXITY", "Candidate", "Choice", "choose", "pool_rows", "score_queries"]

_VAL_KS = (1, 5, 10, 11)
# Queries searched at once: the similarity block stays (_QUERY_BLOCK x gallery) floats.
_QUERY_BLOCK = 1024

#: How complex each kind of candidate is: ties go to the lower.
COMPLEXITY = {"frozen": 0, "frozen-resized": 1, "adapter-linear": 2, "adapter-mlp": 3, "fine-tuned": 4, "self-supervised": 4}


@dataclass
class Candidate:
    """One encoder the run could write, with its per-query validation values.

    Attributes
    ----------
    name : str
        A key of :data:`COMPLEXITY`.
    values : dict of str to numpy.ndarray
        Per-query values of each metric, for the same queries (in the same order) as every other
        candidate of the run.
    detail : dict
        What else describes it (epochs, adapter kind, ...), copied into the report.
    """

    name: str
    values: dict[str, np.ndarray]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def complexity(self) -> int:
        return COMPLEXITY[self.name]

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values[metric]))


@dataclass
class Choice:
    """The chosen candidate, every candidate's scores, and the sentence that explains the choice."""

    chosen: Candidate
    metric: str
    table: list[dict[str, Any]]
    verdict: str

    @property
    def frozen_chosen(self) -> bool:
        return self.chosen.name == "frozen"


def pool_rows(vectors: np.ndarray, case: np.ndarray, n_cases: int, how: str = "mean") -> np.ndarray:
    """Case vectors from row (slice) vectors, as indexing makes them: pool each case's rows, then L2-normalize."""
    pooled = np.zeros((n_cases, vectors.shape[1]), dtype=np.float32)
    if how == "max":
        pooled[:] = -np.inf
        np.maximum.at(pooled, case, vectors)
    else:
        np.add.at(pooled, case, vectors)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def score_queries(
    gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    """Per-query values of :data:`~medsearch.train.options.VAL_METRICS` (cosine, exact search).

    Metrics whose ``k`` exceeds the gallery are left out (a tiny archive scores at the ks it allows).
    """
    k = min(max(_VAL_KS), gallery.shape[0])
    top = np.concatenate([
        np.argsort(-(queries[start : start + _QUERY_BLOCK] @ gallery.T), axis=1, kind="stable")[:, :k]
        for start in range(0, queries.shape[0], _QUERY_BLOCK)
    ]) if queries.shape[0] else np.zeros((0, k), dtype=np.int64)
    n_rel = np.bincount(gallery_labels, minlength=n_classes)[query_labels]
    ks = tuple(x for x in _VAL_KS if x <= k)
    names = [m for m in VAL_METRICS if int(m.rsplit("@", 1)[1]) <= k]
    return compute_metrics(gallery_labels[top], query_labels, n_rel, ks=ks, names=names)


def _interval(diff: np.ndarray, alpha: float, seed: int, n_resamples: int) -> tuple[float, float]:
    if not np.any(diff):
        return 0.0, 0.0
    return bootstrap_ci(diff, n_resamples=n_resamples, alpha=alpha, seed=seed)


def choose(candidates: list[Candidate], metric: str, *, seed: int = 0, n_resamples: int = 2000) -> Choice:
    """Apply the rule of this module to ``candidates`` (the frozen one first) on ``metric``.

    Raises
    ------
    ConfigError
        No frozen candidate first, a candidate without ``metric``, or candidates scored on
        different queries.
    """
    if not candidates or candidates[0].name != "frozen":
        raise ConfigError("the first candidate must be the frozen encoder")
    frozen = candidates[0]
    n = frozen.values[metric].shape[0] if metric in frozen.values else 0
    for c in candidates:
        if metric not in c.values or c.values[metric].shape != (n,) or n == 0:
            raise ConfigError(f"candidate {c.name} has no per-query {metric} values for the {n} validation queries")
    trained = candidates[1:]
    alpha = 0.05 / max(1, len(trained))
    gains: dict[int, tuple[float, float, float]] = {}
    for i, c in enumerate(candidates):
        diff = c.values[metric] - frozen.values[metric]
        low, high = _interval(diff, alpha, seed, n_resamples)
        gains[i] = (float(diff.mean()), low, high)
    qualifying = [0] + [i for i in range(1, len(candidates)) if gains[i][1] > 0]
    best = min(qualifying, key=lambda i: (-candidates[i].mean(metric), candidates[i].complexity))
    chosen = best
    for i in sorted(qualifying, key=lambda i: (candidates[i].complexity, -candidates[i].mean(metric))):
        if i == best:
            break
        diff = candidates[best].values[metric] - candidates[i].values[metric]
        if _interval(diff, 0.05, seed, n_resamples)[0] <= 0:
            chosen = i
            break

    table = []
    for i, c in enumerate(candidates):
        low, high = bootstrap_ci(c.values[metric], n_resamples=n_resamples, seed=seed)
        gain, g_low, g_high = gains[i]
        table.append({
            "candidate": c.name,
            **c.detail,
            "metrics": {name: round(float(np.mean(v)), 5) for name, v in c.values.items()},
            "ci95": [round(low, 5), round(high, 5)],
            "gain_over_frozen": round(gain, 5),
            "gain_interval": [round(g_low, 5), round(g_high, 5)],
            "gain_confidence": round(1 - alpha, 4) if i else None,
            "beats_frozen": bool(i in qualifying and i > 0),
            "chosen": i == chosen,
        })
    verdict = _verdict(candidates, gains, metric, chosen, best, alpha)
    return Choice(chosen=candidates[chosen], metric=metric, table=table, verdict=verdict)


def _verdict(
    candidates: list[Candidate], gains: dict[int, tuple[float, float, float]], metric: str, chosen: int, best: int, alpha: float
) -> str:
    frozen = candidates[0]
    name = "the frozen encoder" + (f" ({frozen.detail['size']} px)" if "size" in frozen.detail else "")
    level = f"{100 * (1 - alpha):.1f}".rstrip("0").rstrip(".")
    if chosen == 0:
        if len(candidates) == 1:
            return f"only {name} was scored ({metric} {frozen.mean(metric):.4f}): writing the frozen config"
        top = max(range(1, len(candidates)), key=lambda i: candidates[i].mean(metric))
        gain, low, high = gains[top]
        return (
            f"no candidate beats {name} by more than the noise: the best, {candidates[top].name}, "
            f"scores {metric} {candidates[top].mean(metric):.4f} against {frozen.mean(metric):.4f} "
            f"(gain {gain:+.4f}, {level}% interval {low:+.4f} to {high:+.4f}); writing the frozen config"
        )
    c = candidates[chosen]
    gain, low, high = gains[chosen]
    text = (
        f"{c.name} beats {name}: {metric} {c.mean(metric):.4f} against {frozen.mean(metric):.4f} "
        f"(gain {gain:+.4f}, {level}% interval {low:+.4f} to {high:+.4f})"
    )
    if chosen != best:
        text += f"; {candidates[best].name} scores {candidates[best].mean(metric):.4f}, not beyond the noise, so the simpler one is kept"
    return text
