"""What an evaluation returns: one encoder's scores, a report of several, their tables and figure.

:class:`EvaluationResult` holds the scores of one encoder on one gallery and query set;
:class:`EvaluationReport` holds one or more results on the same queries with the paired tests
between them (:func:`compare_results`), and writes them as JSON, CSV or a PNG (:func:`save_figure`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsearch._files import public_mode, write_text
from medsearch._json import json_default
from medsearch.errors import ConfigError, WriteError
from medsearch.metrics import paired_test

__all__ = ["EvaluationReport", "EvaluationResult", "compare_results", "save_figure"]


@dataclass
class EvaluationResult:
    """The scores of one encoder on one gallery and query set.

    ``metrics`` are means over queries (micro); ``macro`` the means of the per-class means;
    ``per_class`` and ``support`` per query label; ``ci95`` percentile-bootstrap 95% intervals of
    ``metrics`` (queries resampled). ``per_query`` keeps the per-query values, for paired tests.
    """

    dataset: str
    protocol: str
    encoder: dict[str, Any]
    n_gallery: int
    n_queries: int
    ks: tuple[int, ...]
    main_metric: str
    headline: tuple[str, ...]
    metrics: dict[str, float]
    macro: dict[str, float]
    per_class: dict[Any, dict[str, float]]
    support: dict[Any, int]
    ci95: dict[str, tuple[float, float]]
    confusion: dict[str, Any]
    precision_curve: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    query_labels: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def name(self) -> str:
        """The encoder's short label: its name, with the checkpoint file name when there is one."""
        name = str(self.encoder.get("name", "encoder"))
        checkpoint = self.encoder.get("checkpoint")
        return f"{name}:{Path(checkpoint).name}" if checkpoint else name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``dataset, protocol, encoder, n_gallery, n_queries, metrics, per_class,
        ci95`` and the rest (``macro, support, confusion, precision_curve, settings, timings``)."""
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "encoder": dict(self.encoder),
            "n_gallery": self.n_gallery,
            "n_queries": self.n_queries,
            "ks": list(self.ks),
            "main_metric": self.main_metric,
            "headline": list(self.headline),
            "metrics": dict(self.metrics),
            "macro": dict(self.macro),
            "per_class": {str(k): dict(v) for k, v in self.per_class.items()},
            "support": {str(k): v for k, v in self.support.items()},
            "ci95": {k: [lo, hi] for k, (lo, hi) in self.ci95.items()},
            "confusion": self.confusion,
            "precision_curve": self.precision_curve,
            "settings": self.settings,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (metric, scope) with ``value`` and, for ``all``, the 95% interval.

        ``scope`` is ``all`` (mean over queries), ``macro``, or ``class=<label>``.
        """
        rows: list[dict[str, Any]] = []
        for name, value in self.metrics.items():
            low, high = self.ci95.get(name, (float("nan"), float("nan")))
            rows.append(self._row(name, "all", value, self.n_queries, low, high))
            rows.append(self._row(name, "macro", self.macro[name], self.n_queries))
            for label, values in self.per_class.items():
                rows.append(self._row(name, f"class={label}", values[name], self.support[label]))
        return pd.DataFrame(rows)

    def _row(self, metric: str, scope: str, value: float, n: int, low: float = float("nan"), high: float = float("nan")) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "encoder": self.name,
            "metric": metric,
            "scope": scope,
            "value": value,
            "ci95_low": low,
            "ci95_high": high,
            "n_queries": n,
            "n_gallery": self.n_gallery,
        }


@dataclass
class EvaluationReport:
    """Results of one or more encoders on the same queries, and the paired tests between them.

    ``comparisons[i]`` compares ``results[i + 1]`` with ``results[0]`` (the baseline) on the main
    metric: ``mean_diff`` is other minus baseline.
    """

    results: list[EvaluationResult]
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def result(self) -> EvaluationResult:
        """The first (baseline) result."""
        return self.results[0]

    def to_dict(self) -> dict[str, Any]:
        """The baseline's :meth:`EvaluationResult.to_dict`, plus ``comparisons`` and ``other_encoders``."""
        out = self.results[0].to_dict()
        out["comparisons"] = [dict(c) for c in self.comparisons]
        out["other_encoders"] = [r.to_dict() for r in self.results[1:]]
        return out

    def to_frame(self) -> pd.DataFrame:
        """Every result's :meth:`EvaluationResult.to_frame`, stacked."""
        return pd.concat([r.to_frame() for r in self.results], ignore_index=True)

    def save_json(self, path: str | Path) -> None:
        _write_report(Path(path), json.dumps(self.to_dict(), indent=2, default=json_default) + "\n")

    def save_csv(self, path: str | Path) -> None:
        _write_report(Path(path), self.to_frame().to_csv(index=False))

    def save_figure(self, path: str | Path) -> None:
        """See :func:`save_figure`."""
        save_figure(self, path)


def compare_results(
    results: Sequence[EvaluationResult], *, metric: str | None = None, n_resamples: int = 10000, seed: int = 0
) -> list[dict[str, Any]]:
    """Paired tests of each result against the first, on the same queries.

    Parameters
    ----------
    results : sequence of EvaluationResult
        Results on the same queries in the same order (e.g. several encoders on one split).
    metric : str, optional
        Per-query metric to compare; default the first result's ``main_metric``.
    n_resamples, seed
        As :func:`medsearch.metrics.paired_test`.

    Returns
    -------
    list of dict
        One per result after the first: ``metric``, ``baseline``, ``encoder``, ``baseline_mean``,
        ``encoder_mean`` and the fields of :func:`~medsearch.metrics.paired_test` (``mean_diff`` =
        encoder minus baseline, ``ci95``, ``p_value``, ``p_value_wilcoxon``, ``n``, ``method``).

    Raises
    ------
    ConfigError
        The results were computed on other queries, or lack the metric.
    """
    if len(results) < 2:
        return []
    base = results[0]
    metric = metric or base.main_metric
    out = []
    for other in results[1:]:
        if other.n_queries != base.n_queries or not np.array_equal(other.query_labels, base.query_labels):
            raise ConfigError("results to compare must come from the same queries; evaluate the encoders on the same split")
        if metric not in base.per_query or metric not in other.per_query:
            raise ConfigError(f"metric {metric!r} was not computed; choose one of: {', '.join(base.per_query)}")
        test = paired_test(other.per_query[metric], base.per_query[metric], n_resamples=n_resamples, seed=seed)
        out.append({
            "metric": metric,
            "baseline": base.name,
            "encoder": other.name,
            "baseline_mean": base.metrics[metric],
            "encoder_mean": other.metrics[metric],
            **test,
        })
    return out


def save_figure(report: EvaluationReport | EvaluationResult, path: str | Path) -> None:
    """Write a PNG: per encoder, precision@k curves per class and the majority-vote confusion matrix.

    Drawn with matplotlib's Agg canvas (no display, and no change to pyplot's backend).

    Raises
    ------
    ConfigError
        The path does not end in ``.png``.
    WriteError
        The file cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"figure file {path} must end in .png")
    results = report.results if isinstance(report, EvaluationReport) else [report]
    fig = Figure(figsize=(11, 4.2 * len(results)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 2, squeeze=False)
    for (curve_ax, matrix_ax), result in zip(axes, results, strict=True):
        curve = result.precision_curve
        ks = curve["k"]
        for label, values in curve["per_class"].items():
            curve_ax.plot(ks, values, marker="o", markersize=3, label=f"{label} (n={result.support.get(label, '?')})")
        curve_ax.plot(ks, curve["all"], color="black", linestyle="--", label="all queries")
        curve_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        curve_ax.set_xlabel("k (rank)")
        curve_ax.set_ylabel("precision@k")
        curve_ax.set_ylim(0, 1.02)
        curve_ax.set_title(f"{result.name}: precision@k per class", fontsize=10)
        curve_ax.grid(alpha=0.3)
        curve_ax.legend(fontsize=8, title="query label", title_fontsize=8)

        matrix = np.asarray(result.confusion["matrix"])
        labels = [str(v) for v in result.confusion["labels"]]
        matrix_ax.imshow(matrix, cmap="Blues")
        matrix_ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0)
        matrix_ax.set_yticks(range(len(labels)), labels)
        matrix_ax.set_xlabel(f"predicted (majority of top {result.confusion['k']})")
        matrix_ax.set_ylabel("true label")
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            matrix_ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
        matrix_ax.set_title(f"{result.dataset} ({result.protocol}): confusion of the vote", fontsize=10)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise WriteError(f"cannot write figure {path} ({e.strerror}); give a writable path") from e


def _write_report(path: Path, text: str) -> None:
    """Write a JSON or CSV report atomically; an OSError becomes a one-line :class:`WriteError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text, mode=public_mode())
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror}); give a writable path") from e
