"""Retrieval evaluation: how well an encoder, a preprocessing and an index find cases of the same label.

Three inputs, one pipeline:

* :func:`evaluate_npz`: a MedMNIST-format ``.npz`` file. The gallery split (default ``train``) and
  the query split (default ``test``) are embedded through the same preprocessing and encoder as
  ``medsearch index``/``query`` (each image is a volume of one slice, or a 3D volume).
* :func:`evaluate_index`: an index built with a labels CSV. Every labeled case queries all the
  others (leave-one-out); with ``exclude_same_patient`` the cases of the query's patient
  pseudonym are left out too, so a patient's second slice does not count as a find.
* :func:`evaluate_queries`: a folder of query studies with a labels CSV, against an index.

Each embeds (or reads) vectors and calls :func:`evaluate_embeddings`, which searches an exact
(flat) faiss index through :class:`~medsearch.store.IndexStore` and scores the ranked labels with
:mod:`medsearch.metrics`. It asks for ``max(k, R)`` results per query (``R`` = relevant items in
the gallery, for MAP@R and R-precision) plus the number of excluded items, and counts
``n_relevant`` over the whole gallery searched (minus excluded items), so recall, AP and MAP@R have
the right denominators. MRR is exact too: a query whose first hit lies beyond those results is
ranked against the whole gallery.

Protocols (:data:`PROTOCOLS`) fix the splits, cut-offs and headline metrics of a published
evaluation so that a number from medsearch can stand beside the paper's; see ``docs/benchmarks.md``.

Distances: the gallery index uses the config's ``index.metric``; embeddings are unit-length, so
cosine and L2 give the same ranking.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from tqdm import tqdm  # plain text bars: notebooks need no widget package

from medsearch.config import Config, EncoderConfig, Metric, load_config
from medsearch.deid import SiteKey, case_id, patient_pseudonym
from medsearch.encoders import Encoder, load_encoder, resolve_device
from medsearch.errors import ConfigError, InvalidStudyError, KeyFileError
from medsearch.io import (
    LoadFailure,
    NpzLayout,
    NpzSplit,
    find_files,
    load_npz_split,
    load_volume,
    scan,
)
from medsearch.pipeline import encoder_input
from medsearch.metrics import (
    METRICS,
    bootstrap_cis,
    compute_metrics,
    confusion_matrix,
    knn_predict,
    paired_test,
    reciprocal_rank,
    summarize,
)
from medsearch.search import Searcher, embed_volume, labels_for_case, read_labels
from medsearch.store import IndexStore

__all__ = [
    "PROTOCOLS",
    "EvaluationReport",
    "EvaluationResult",
    "Protocol",
    "ProtocolSpec",
    "compare_results",
    "embed_npz_split",
    "evaluate_embeddings",
    "evaluate_index",
    "evaluate_npz",
    "evaluate_queries",
    "parse_encoder_spec",
    "save_figure",
]

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
# Precision@k curves in the figure and the report run to at least this rank.
_CURVE_K = 20
# Bound the (queries x results) arrays held at once while scoring.
_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------
# protocols


class Protocol(str, enum.Enum):
    """Published evaluation protocols, by their preset name."""

    MAHBOD2024 = "mahbod2024"
    MEDMNISTPLUS = "medmnistplus"


@dataclass(frozen=True)
class ProtocolSpec:
    """What a protocol fixes: splits, cut-offs, the metrics the paper reports, and its source.

    Attributes
    ----------
    name : str
        Preset name (``--protocol``).
    gallery_split, query_split : str
        Splits of the MedMNIST file searched and used as queries.
    ks : tuple of int
        Cut-offs; every ``@k`` metric is computed at each.
    main_metric : str
        The metric of the paired test when encoders are compared.
    headline : tuple of str
        The metrics the paper reports, in its order.
    vote_k : int
        Voters of the majority vote behind the confusion matrix.
    source : str
        Where the protocol is defined.
    """

    name: str
    gallery_split: str
    query_split: str
    ks: tuple[int, ...]
    main_metric: str
    headline: tuple[str, ...]
    vote_k: int
    source: str


#: The protocol presets. Sources and published figures: ``../shared/BENCHMARKS.md``.
PROTOCOLS: Mapping[Protocol, ProtocolSpec] = {
    # Mahbod et al. (2024), "Evaluating pre-trained convolutional neural networks and foundation
    # models as feature extractors for content-based medical image retrieval", arXiv 2409.09430,
    # code masih4/MedImageRetrieval: frozen features, queries = test, gallery = train, top 5.
    # Their ACC@k is hit@k, mMV@k the lenient majority vote, mAP@k the mean precision over hit ranks.
    Protocol.MAHBOD2024: ProtocolSpec(
        name="mahbod2024",
        gallery_split="train",
        query_split="test",
        ks=(1, 5),
        main_metric="map_hits@5",
        headline=("map_hits@5", "mmv@5", "hit@1"),
        vote_k=5,
        source="Mahbod et al. 2024, arXiv 2409.09430 (mAP@5 / mMV@5 / ACC@1; test vs train)",
    ),
    # Doerrich et al. (2024), "Rethinking model prototyping through the MedMNIST+ dataset
    # collection", arXiv 2404.15786: k-NN classification on frozen features, k = 11, support =
    # train, queries = test; a tie of the vote goes to the nearest tied label.
    Protocol.MEDMNISTPLUS: ProtocolSpec(
        name="medmnistplus",
        gallery_split="train",
        query_split="test",
        ks=(1, 11),
        main_metric="knn_acc@11",
        headline=("knn_acc@11",),
        vote_k=11,
        source="Doerrich et al. 2024 (MedMNIST+), arXiv 2404.15786 (k-NN accuracy, k = 11; test vs train)",
    ),
}


def _protocol(protocol: Protocol | str | None) -> ProtocolSpec | None:
    if protocol is None or protocol == "" or protocol == "none":
        return None
    try:
        return PROTOCOLS[Protocol(protocol)]
    except ValueError:
        names = ", ".join(p.value for p in Protocol)
        raise ConfigError(f"unknown protocol {protocol!r}; use one of: {names} (or none)") from None


def _ks(ks: Iterable[int] | None, spec: ProtocolSpec | None) -> tuple[int, ...]:
    """The protocol's cut-offs together with any asked for, sorted and unique."""
    wanted: set[int] = set(spec.ks) if spec else set()
    given = list(ks) if ks is not None else []
    for k in given:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"every k must be a whole number >= 1, got {k!r}")
    wanted.update(int(k) for k in given)
    if not wanted:
        wanted.update(DEFAULT_KS)
    return tuple(sorted(wanted))


def _metric_names(ks: Sequence[int]) -> list[str]:
    """JSON names of every metric, in :data:`~medsearch.metrics.METRICS` order, expanded over ``ks``."""
    names: list[str] = []
    for pattern in METRICS:
        if pattern.endswith("@k"):
            names.extend(pattern[:-1] + str(k) for k in ks)
        else:
            names.append(pattern)
    return names


def _default_headline(ks: Sequence[int]) -> tuple[str, ...]:
    k = max(ks)
    return ("hit@1" if 1 in ks else f"hit@{k}", f"precision@{k}", f"map@{k}", f"mmv@{k}", f"knn_acc@{k}", "map@r", "mrr")


# --------------------------------------------------------------------------------------------------
# results


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
        _write_text(Path(path), json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")

    def save_csv(self, path: str | Path) -> None:
        _write_text(Path(path), self.to_frame().to_csv(index=False))

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


# --------------------------------------------------------------------------------------------------
# the core: vectors and labels in, scores out


def evaluate_embeddings(
    gallery: ArrayLike,
    gallery_labels: ArrayLike,
    queries: ArrayLike,
    query_labels: ArrayLike,
    *,
    ks: Iterable[int] | None = None,
    metric: Metric | str = Metric.COSINE,
    query_rows: ArrayLike | None = None,
    gallery_groups: ArrayLike | None = None,
    query_groups: ArrayLike | None = None,
    protocol: Protocol | str | None = None,
    main_metric: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    dataset: str = "embeddings",
    encoder: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Search the gallery with each query vector and score the ranked labels.

    Parameters
    ----------
    gallery : array_like, shape (N, d)
        Gallery embeddings; they go into an exact faiss index.
    gallery_labels : array_like, shape (N,)
        Label of each gallery item (ints or strs).
    queries : array_like, shape (Q, d)
        Query embeddings.
    query_labels : array_like, shape (Q,)
        Label of each query, of the same kind as ``gallery_labels``.
    ks : iterable of int, optional
        Cut-offs; joined with the protocol's. Default (1, 5, 10) without a protocol.
    metric : Metric or str, default "cosine"
        Distance of the gallery index.
    query_rows : array_like of int, shape (Q,), optional
        Leave-one-out: the gallery row that is the query itself (-1 for none); it is never
        retrieved and not counted as relevant.
    gallery_groups, query_groups : array_like of str, shape (N,) and (Q,), optional
        Group of each item (a patient pseudonym): gallery items of the query's group are never
        retrieved and not counted as relevant. An empty string or None is no group.
    protocol : Protocol or str, optional
        A preset of :data:`PROTOCOLS`, for its cut-offs, headline and main metric.
    main_metric : str, optional
        Metric of paired tests; default the protocol's, else ``map@r``.
    n_resamples : int, default 1000
        Bootstrap resamples of the 95% intervals.
    seed : int, default 0
        Seed of the bootstrap.
    dataset : str
        Name recorded in the result.
    encoder : mapping, optional
        Encoder description recorded in the result (name, weights hash...).
    settings : mapping, optional
        Extra settings recorded in the result.

    Returns
    -------
    EvaluationResult

    Raises
    ------
    ConfigError
        Mismatched shapes, labels of different kinds, no query, a ``k`` larger than the gallery
        left after exclusions, or an unknown main metric.
    """
    started = time.perf_counter()
    spec = _protocol(protocol)
    ks = _ks(ks, spec)
    gallery = np.ascontiguousarray(np.asarray(gallery, dtype=np.float32))
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    g_values, q_values = np.asarray(gallery_labels), np.asarray(query_labels)
    _check_arrays(gallery, g_values, queries, q_values)
    n_gallery, n_queries = gallery.shape[0], queries.shape[0]

    vocabulary, codes = _label_codes(g_values, q_values)
    g_lab, q_lab = codes[:n_gallery], codes[n_gallery:]
    n_labels = vocabulary.shape[0]
    rows = _query_rows(query_rows, n_queries, n_gallery)
    g_grp, q_grp = _group_codes(gallery_groups, query_groups, n_gallery, n_queries)

    # Relevant items and excluded items per query, counted over the whole gallery.
    n_relevant = np.bincount(g_lab, minlength=n_labels)[q_lab].astype(np.int64)
    n_excluded = np.zeros(n_queries, dtype=np.int64)
    in_group = q_grp >= 0
    if in_group.any():
        n_groups = int(max(g_grp.max(initial=-1), q_grp.max(initial=-1))) + 1
        grouped = g_grp >= 0
        group_size = np.bincount(g_grp[grouped], minlength=n_groups)
        group_label = np.bincount(g_grp[grouped] * n_labels + g_lab[grouped], minlength=n_groups * n_labels)
        n_excluded[in_group] += group_size[q_grp[in_group]]
        n_relevant[in_group] -= group_label[q_grp[in_group] * n_labels + q_lab[in_group]]
    has_self = rows >= 0
    self_rows = np.where(has_self, rows, 0)
    self_extra = has_self & ~(in_group & (g_grp[self_rows] == q_grp))
    n_excluded += self_extra
    n_relevant -= self_extra & (g_lab[self_rows] == q_lab)
    n_available = n_gallery - n_excluded

    k_max = max(ks)
    smallest = int(n_available.min())
    if k_max > smallest:
        where = "after leaving out each query's own cases" if n_excluded.any() else ""
        raise ConfigError(
            f"k = {k_max} is larger than the gallery searched ({smallest} items{' ' + where if where else ''}); "
            "use a smaller -k"
        )
    spec_main = main_metric or (spec.main_metric if spec else "map@r")
    names = _metric_names(ks)
    if spec_main not in names:
        raise ConfigError(f"main metric {spec_main!r} is not computed; choose one of: {', '.join(names)}")
    vote_k = spec.vote_k if spec else k_max
    curve_k = min(max(k_max, _CURVE_K), smallest)
    need = int(max(k_max, curve_k, n_relevant.max(initial=0)))
    fetch = int(min(n_gallery, need + n_excluded.max(initial=0)))

    store = _exact_store(gallery, Metric(metric))
    at_k = [n for n in names if "@" in n and n != "map@r"]
    per_query: dict[str, list[np.ndarray]] = {n: [] for n in names}
    predictions: list[np.ndarray] = []
    curve_sum = np.zeros((n_labels, curve_k), dtype=np.float64)
    search_s = metrics_s = 0.0
    chunk = max(1, _CHUNK_ELEMENTS // max(fetch, 1))
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        t0 = time.perf_counter()
        hits = store.search(queries[start:stop], fetch)
        ids = _drop_excluded(hits.ids, rows[start:stop], g_grp, q_grp[start:stop])[:, :need]
        t1 = time.perf_counter()
        search_s += t1 - t0
        # Rows whose own cases are many end with excluded items once their gallery runs out:
        # give those places a label no query has.
        available = np.arange(need) < n_available[start:stop, None]
        retrieved = np.where(available, g_lab[ids], -1)
        q = q_lab[start:stop]
        rel = retrieved == q[:, None]
        n_rel = n_relevant[start:stop]
        values = compute_metrics(retrieved[:, :k_max], q, n_rel, ks=ks, names=at_k)
        r_cols = int(max(n_rel.max(initial=0), 1))
        values.update(compute_metrics(retrieved[:, :r_cols], q, n_rel, names=["map@r", "r_precision"]))
        values["mrr"] = _exact_reciprocal_rank(
            store, queries[start:stop], retrieved, q, n_rel, rows[start:stop], g_lab, g_grp, q_grp[start:stop]
        )
        for name in names:
            per_query[name].append(values[name])
        predictions.append(knn_predict(retrieved[:, :vote_k], vote_k))
        curve = np.cumsum(rel[:, :curve_k], axis=1) / np.arange(1, curve_k + 1)
        np.add.at(curve_sum, q, curve)
        metrics_s += time.perf_counter() - t1

    t2 = time.perf_counter()
    values_all = {name: np.concatenate(parts) for name, parts in per_query.items()}
    label_values = vocabulary[q_lab]
    summary = summarize(values_all, label_values)
    predicted = vocabulary[np.concatenate(predictions)]
    classes = np.unique(np.concatenate([q_lab, np.concatenate(predictions)]))
    matrix = confusion_matrix(label_values, predicted, labels=vocabulary[classes])
    support_codes, support_counts = np.unique(q_lab, return_counts=True)
    curve_per_class = {
        _plain(vocabulary[c]): (curve_sum[c] / n).tolist() for c, n in zip(support_codes, support_counts, strict=True)
    }
    t3 = time.perf_counter()
    ci95 = bootstrap_cis(values_all, n_resamples=n_resamples, seed=seed)
    t4 = time.perf_counter()
    metrics_s += t3 - t2
    headline = spec.headline if spec else _default_headline(ks)
    return EvaluationResult(
        dataset=dataset,
        protocol=spec.name if spec else "custom",
        encoder=dict(encoder or {}),
        n_gallery=n_gallery,
        n_queries=n_queries,
        ks=ks,
        main_metric=spec_main,
        headline=tuple(headline),
        metrics=summary["metrics"],
        macro=summary["macro"],
        per_class=summary["per_class"],
        support=summary["support"],
        ci95=ci95,
        confusion={
            "method": f"majority vote of the top {vote_k} (ties to the nearest tied label)",
            "k": vote_k,
            "labels": [_plain(v) for v in vocabulary[classes]],
            "matrix": matrix.tolist(),
        },
        precision_curve={
            "k": list(range(1, curve_k + 1)),
            "all": (curve_sum.sum(axis=0) / n_queries).tolist(),
            "per_class": curve_per_class,
        },
        settings={
            "protocol_source": spec.source if spec else "",
            "metric": Metric(metric).value,
            "n_queries_without_relevant": int((n_relevant == 0).sum()),
            "results_per_query": need,
            **dict(settings or {}),
        },
        timings={
            "search_s": search_s,
            "metrics_s": metrics_s,
            "bootstrap_s": t4 - t3,
            "evaluate_s": time.perf_counter() - started,
        },
        per_query=values_all,
        query_labels=label_values,
        predictions=predicted,
    )


def _check_arrays(gallery: np.ndarray, g_values: np.ndarray, queries: np.ndarray, q_values: np.ndarray) -> None:
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise ConfigError(f"gallery must be a non-empty (N, d) array of embeddings, got shape {gallery.shape}")
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise ConfigError(f"queries must be a non-empty (Q, d) array of embeddings, got shape {queries.shape}")
    if queries.shape[1] != gallery.shape[1]:
        raise ConfigError(f"queries have dimension {queries.shape[1]} but the gallery {gallery.shape[1]}; embed both with one encoder")
    for name, values, n in (("gallery_labels", g_values, gallery.shape[0]), ("query_labels", q_values, queries.shape[0])):
        if values.ndim != 1 or values.shape[0] != n:
            raise ConfigError(f"{name} must hold one label per row ({n}), got shape {values.shape}")


def _label_codes(g_values: np.ndarray, q_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    text = {"U", "S", "O"}
    if (g_values.dtype.kind in text) != (q_values.dtype.kind in text):
        raise ConfigError(
            f"gallery labels are {g_values.dtype} but query labels {q_values.dtype}; "
            "labels must be of the same kind (both strings or both numbers)"
        )
    try:
        vocabulary, codes = np.unique(np.concatenate([g_values, q_values]), return_inverse=True)
    except TypeError as e:
        raise ConfigError(f"labels cannot be compared ({e}); pass strings or numbers") from e
    return vocabulary, codes.reshape(-1).astype(np.int64)


def _query_rows(query_rows: ArrayLike | None, n_queries: int, n_gallery: int) -> np.ndarray:
    if query_rows is None:
        return np.full(n_queries, -1, dtype=np.int64)
    rows = np.asarray(query_rows, dtype=np.int64)
    if rows.shape != (n_queries,) or rows.max(initial=-1) >= n_gallery or rows.min(initial=-1) < -1:
        raise ConfigError(f"query_rows must hold one gallery row (or -1) per query, each below {n_gallery}")
    return rows


def _group_codes(
    gallery_groups: ArrayLike | None, query_groups: ArrayLike | None, n_gallery: int, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    if gallery_groups is None and query_groups is None:
        return np.full(n_gallery, -1, dtype=np.int64), np.full(n_queries, -1, dtype=np.int64)
    if gallery_groups is None or query_groups is None:
        raise ConfigError("give both gallery_groups and query_groups, or neither")
    g = np.asarray(["" if pd.isna(v) else str(v) for v in np.asarray(gallery_groups, dtype=object)], dtype=object)
    q = np.asarray(["" if pd.isna(v) else str(v) for v in np.asarray(query_groups, dtype=object)], dtype=object)
    if g.shape != (n_gallery,) or q.shape != (n_queries,):
        raise ConfigError("gallery_groups and query_groups must hold one group per gallery item and per query")
    vocabulary, codes = np.unique(np.concatenate([g, q]).astype(str), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    if vocabulary.shape[0] and vocabulary[0] == "":
        codes = codes - 1  # the empty group becomes -1: no group
    return codes[:n_gallery], codes[n_gallery:]


def _exact_store(vectors: np.ndarray, metric: Metric) -> IndexStore:
    """An in-memory exact (flat) index of the gallery; never written to disk."""
    store = IndexStore.create(
        Path(tempfile.gettempdir()) / "medsearch-evaluate-in-memory",
        dim=vectors.shape[1],
        metric=metric,
        encoder={},
        preprocess={},
    )
    store.add(vectors, pd.DataFrame({"case_id": [str(i) for i in range(vectors.shape[0])]}))
    return store


def _drop_excluded(ids: np.ndarray, rows: np.ndarray, g_grp: np.ndarray, q_grp: np.ndarray) -> np.ndarray:
    """Move each query's own row and the rows of its group to the end of its result list."""
    excluded = ids == rows[:, None]
    if (q_grp >= 0).any():
        excluded |= (g_grp[ids] == q_grp[:, None]) & (q_grp[:, None] >= 0)
    if not excluded.any():
        return ids
    order = np.argsort(excluded, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)


def _exact_reciprocal_rank(
    store: IndexStore,
    queries: np.ndarray,
    retrieved: np.ndarray,
    q_lab: np.ndarray,
    n_relevant: np.ndarray,
    rows: np.ndarray,
    g_lab: np.ndarray,
    g_grp: np.ndarray,
    q_grp: np.ndarray,
) -> np.ndarray:
    """1 / rank of the first hit over the whole gallery (not only the results fetched)."""
    rr = reciprocal_rank(retrieved, q_lab)
    late = np.flatnonzero((rr == 0) & (n_relevant > 0))
    if late.size:
        # The first hit lies beyond the results fetched: rank these few queries against everything.
        hits = store.search(queries[late], len(store))
        ids = _drop_excluded(hits.ids, rows[late], g_grp, q_grp[late])
        rel = g_lab[ids] == q_lab[late, None]
        rr[late] = 1.0 / (rel.argmax(axis=1) + 1.0)
    return rr


# --------------------------------------------------------------------------------------------------
# embedding


def parse_encoder_spec(spec: str | EncoderConfig, base: EncoderConfig | None = None) -> EncoderConfig:
    """An encoder config from ``"name"`` or ``"name:checkpoint"``, other settings from ``base``.

    Examples
    --------
    >>> parse_encoder_spec("resnet18:weights/r18.pt").checkpoint
    'weights/r18.pt'
    """
    base = base or EncoderConfig()
    if isinstance(spec, EncoderConfig):
        return spec
    name, _, checkpoint = str(spec).partition(":")
    if not name.strip():
        raise ConfigError(f"encoder {spec!r} has no name; give NAME or NAME:CHECKPOINT, e.g. efficientnet-lite0")
    return _replace_encoder(base, name=name.strip(), checkpoint=checkpoint.strip())


def _replace_encoder(base: EncoderConfig, **changes: Any) -> EncoderConfig:
    return Config(encoder=base).replace(encoder=changes).encoder


def embed_npz_split(
    split: NpzSplit,
    encoder: Encoder,
    config: Config,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    modality: str = "OT",
    images_per_batch: int = 64,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Embed images of a split exactly as :func:`medsearch.search.embed_volume` embeds a case.

    Each image is preprocessed on its own with :func:`~medsearch.transforms.preprocess_volume`
    (the same call as ``embed_volume``); the encoder then takes the slices of ``images_per_batch``
    images at once, and each image's slice vectors are pooled and normalized as ``embed_volume``
    does. The result equals ``embed_volume`` on each image up to float rounding.

    Parameters
    ----------
    split : NpzSplit
        Images to embed.
    encoder : Encoder
        A loaded encoder.
    config : Config
        Preprocessing (and the 3D encoder's volume shape).
    indices : sequence of int, optional
        Rows to embed, in this order (default: all).
    modality : str, default "OT"
        Modality the pipeline assumes (``"OT"``: percentile intensity scaling).
    images_per_batch : int, default 64
        Images preprocessed and sent to the encoder together.
    progress : bool
        Show a progress bar on stderr.
    timings : dict, optional
        Filled with ``preprocess_s``, ``encode_s`` and ``images`` (added to what it holds).

    Returns
    -------
    numpy.ndarray, shape (n, dim)
        Unit-length float32 rows.
    """
    info = encoder.info
    order = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.zeros((order.shape[0], encoder.dim), dtype=np.float32)
    timings = timings if timings is not None else {}
    bar = tqdm(total=order.shape[0], desc=f"embedding {split.split}", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, order.shape[0], max(1, images_per_batch)):
            batch_rows = order[start : start + images_per_batch]
            t0 = time.perf_counter()
            tensors = []
            for volume in split.volumes(batch_rows, modality=modality):
                tensors.append(encoder_input(volume, info, config))
            t1 = time.perf_counter()
            vectors = encoder.embed(torch.cat(tensors))
            t2 = time.perf_counter()
            counts = np.array([t.shape[0] for t in tensors])
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
            if config.preprocess.pool == "max":
                pooled = np.maximum.reduceat(vectors, offsets, axis=0)
            else:
                pooled = np.add.reduceat(vectors, offsets, axis=0) / counts[:, None]
            norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[start : start + len(batch_rows)] = pooled / norms
            timings["preprocess_s"] = timings.get("preprocess_s", 0.0) + t1 - t0
            timings["encode_s"] = timings.get("encode_s", 0.0) + t2 - t1
            timings["images"] = timings.get("images", 0) + len(batch_rows)
            timings["encoder_inputs"] = timings.get("encoder_inputs", 0) + int(counts.sum())
            bar.update(len(batch_rows))
    finally:
        bar.close()
    return out


def _embed_cached(
    split: NpzSplit,
    indices: np.ndarray | None,
    encoder: Encoder,
    config: Config,
    *,
    modality: str,
    images_per_batch: int,
    progress: bool,
    timings: dict[str, float],
    cache_dir: Path | None,
) -> np.ndarray:
    """:func:`embed_npz_split`, read from or written to ``cache_dir`` when one is given."""
    if cache_dir is None:
        return embed_npz_split(
            split, encoder, config, indices=indices, modality=modality,
            images_per_batch=images_per_batch, progress=progress, timings=timings,
        )
    key = {
        "data": split.sha256(),
        "split": split.split,
        "layout": split.layout.value,
        "rows": None if indices is None else hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
        "encoder": encoder.info.to_dict(),
        "device": encoder.device.type,
        "preprocess": config.preprocess_hash(),
        "volume_shape": list(config.encoder.volume_shape),
        "modality": modality,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{split.path.stem}-{split.split}-{digest}.npy"
    if path.is_file():
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            log.warning("embedding cache file %s is unreadable; embedding again", path)
        else:
            n = len(split) if indices is None else len(indices)
            if vectors.shape == (n, encoder.dim):
                timings["cache_hits"] = timings.get("cache_hits", 0) + 1
                return vectors
    vectors = embed_npz_split(
        split, encoder, config, indices=indices, modality=modality,
        images_per_batch=images_per_batch, progress=progress, timings=timings,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, vectors)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write the embedding cache in {cache_dir} ({e.strerror}); give a writable --cache folder") from e
    return vectors


# --------------------------------------------------------------------------------------------------
# the three inputs


def evaluate_npz(
    path: str | Path,
    *,
    protocol: Protocol | str | None = None,
    gallery_split: str | None = None,
    query_split: str | None = None,
    ks: Iterable[int] | None = None,
    config: Config | str | Path | None = None,
    encoders: Sequence[str | EncoderConfig] | None = None,
    modality: str = "OT",
    layout: NpzLayout | str | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int | None = 64,
    main_metric: str | None = None,
    n_resamples: int = 1000,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Evaluate retrieval on a MedMNIST-format ``.npz``: query split against gallery split.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file (see :mod:`medsearch.io.npz`).
    protocol : Protocol or str, optional
        ``"mahbod2024"`` or ``"medmnistplus"`` (see :data:`PROTOCOLS`); sets the splits, cut-offs
        and headline metrics.
    gallery_split, query_split : str, optional
        Default ``train`` and ``test`` (or the protocol's, which may not be changed). The same
        split for both gives leave-one-out within that split.
    ks : iterable of int, optional
        Cut-offs, added to the protocol's; default (1, 5, 10) without a protocol.
    config : Config, str or Path, optional
        Preprocessing and encoder settings (a TOML file or preset name; default ``default``).
    encoders : sequence of str or EncoderConfig, optional
        Several encoders (``"name"`` or ``"name:checkpoint"``) to compare on the same split; the
        first is the baseline. Default: the config's encoder.
    modality : str, default "OT"
        Modality the preprocessing assumes; ``OT`` scales intensities by percentiles.
    layout : NpzLayout or str, optional
        Image layout; inferred by default (see :func:`~medsearch.io.load_npz_split`).
    limit : int, optional
        Evaluate a seeded random subset of this many queries (a quick run).
    seed : int, default 0
        Seed of the subset and of the bootstrap.
    batch_size : int, default 64
        Images per encoder call. Larger batches are faster on a CPU; the embeddings do not depend
        on it (``None``: the config's ``encoder.batch_size``).
    main_metric : str, optional
        Metric of the paired test (default: the protocol's, else ``map@r``).
    n_resamples : int, default 1000
        Bootstrap resamples of the 95% intervals.
    cache_dir : str or Path, optional
        Keep embeddings here, keyed by data, encoder and preprocessing hashes; nothing is cached
        without it.
    progress : bool
        Progress bars on stderr while embedding.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    InvalidStudyError
        The file or a split is missing or malformed.
    ConfigError
        Bad options: unknown protocol, splits that contradict it, ``k`` larger than the gallery,
        an unknown encoder or checkpoint.
    """
    started = time.perf_counter()
    path = Path(path)
    spec = _protocol(protocol)
    if spec is not None:
        for given, fixed, what in ((gallery_split, spec.gallery_split, "gallery"), (query_split, spec.query_split, "query")):
            if given is not None and given != fixed:
                raise ConfigError(
                    f"protocol {spec.name} uses the {fixed} split as {what}, not {given}; "
                    "drop the split option or the protocol"
                )
    gallery_name = gallery_split or (spec.gallery_split if spec else "train")
    query_name = query_split or (spec.query_split if spec else "test")
    ks_all = _ks(ks, spec)
    cfg = config if isinstance(config, Config) else load_config(config)
    encoder_configs = _encoder_configs(encoders, cfg.encoder, batch_size)

    t0 = time.perf_counter()
    gallery = load_npz_split(path, gallery_name, layout=layout)
    queries = gallery if query_name == gallery_name else load_npz_split(path, query_name, layout=layout)
    q_rows = _subsample(len(queries), limit, seed)
    load_s = time.perf_counter() - t0
    loo = query_name == gallery_name

    results = []
    for enc_cfg in encoder_configs:
        encoder = load_encoder(enc_cfg)
        run_cfg = Config(preprocess=cfg.preprocess, encoder=enc_cfg, index=cfg.index)
        timings: dict[str, float] = {"load_s": load_s}

        options: dict[str, Any] = {
            "modality": modality,
            "images_per_batch": enc_cfg.batch_size,
            "progress": progress,
            "timings": timings,
            "cache_dir": Path(cache_dir) if cache_dir else None,
        }
        g_vectors = _embed_cached(gallery, None, encoder, run_cfg, **options)
        q_vectors = g_vectors[q_rows] if loo else _embed_cached(queries, q_rows, encoder, run_cfg, **options)
        result = evaluate_embeddings(
            g_vectors,
            gallery.labels,
            q_vectors,
            queries.labels[q_rows],
            ks=ks_all,
            metric=cfg.index.metric,
            query_rows=q_rows if loo else None,
            protocol=spec.name if spec else None,
            main_metric=main_metric,
            n_resamples=n_resamples,
            seed=seed,
            dataset=path.name,
            encoder=_encoder_record(encoder, enc_cfg),
            settings={
                "input": "npz",
                "gallery_split": gallery_name,
                "query_split": query_name,
                "leave_one_out": loo,
                "layout": gallery.layout.value,
                "image_shape": list(gallery.images.shape[1:]),
                "modality": modality,
                "preprocess": run_cfg.to_dict()["preprocess"],
                "limit": limit,
                "seed": seed,
            },
        )
        result.timings = {**timings, **result.timings, "total_s": time.perf_counter() - started}
        results.append(result)
    return EvaluationReport(results, compare_results(results, metric=main_metric, seed=seed))


def evaluate_index(
    index_dir: str | Path,
    *,
    label: str | None = None,
    exclude_same_patient: bool = False,
    ks: Iterable[int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    main_metric: str | None = None,
    n_resamples: int = 1000,
) -> EvaluationReport:
    """Leave-one-out evaluation of an index built with labels.

    Every labeled case queries all other labeled cases of the index (exact search on the stored
    vectors); cases without a label take no part. With ``exclude_same_patient`` the cases of the
    query's patient pseudonym are left out as well, so that another slice or series of the same
    patient does not count as a find: real archives hold several images per patient.

    Parameters
    ----------
    index_dir : str or Path
        An index built with ``labels=`` (``medsearch index --labels``).
    label : str, optional
        The label column; may be left out when the index has exactly one.
    exclude_same_patient : bool, default False
        Leave out every case of the query's patient, not only the query itself.
    ks, limit, seed, main_metric, n_resamples
        As :func:`evaluate_npz`.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    IndexNotFoundError, IndexCorruptError
        ``index_dir`` is not a readable index.
    ConfigError
        No such label column, fewer than two labeled cases, or ``k`` larger than the cases left.
    """
    started = time.perf_counter()
    store = IndexStore.open(index_dir)
    column = _label_column(label, store)
    labels, keep = _case_labels(store.cases[column])
    if keep.sum() < 2:
        raise ConfigError(f"index {index_dir} has {int(keep.sum())} case(s) labeled in {column!r}; leave-one-out needs at least 2")
    vectors = store.vectors()[keep]
    groups = None
    if exclude_same_patient:
        if "patient" not in store.cases:
            raise ConfigError(f"index {index_dir} has no patient column; rebuild it with this medsearch version to exclude same-patient cases")
        groups = store.cases["patient"].to_numpy(dtype=object)[keep]
    q_rows = _subsample(int(keep.sum()), limit, seed)
    result = evaluate_embeddings(
        vectors,
        labels,
        vectors[q_rows],
        labels[q_rows],
        ks=ks,
        metric=store.metric,
        query_rows=q_rows,
        gallery_groups=groups,
        query_groups=None if groups is None else groups[q_rows],
        main_metric=main_metric,
        n_resamples=n_resamples,
        seed=seed,
        dataset=str(index_dir),
        encoder={k: store.manifest["encoder"].get(k) for k in ("name", "dim", "weights_sha256")},
        settings={
            "input": "index",
            "label": column,
            "leave_one_out": True,
            "exclude_same_patient": exclude_same_patient,
            "n_cases": len(store),
            "n_unlabeled": int((~keep).sum()),
            "n_patients": None if groups is None else len(set(groups)),
            "preprocess": store.manifest.get("preprocess", {}),
            "limit": limit,
            "seed": seed,
        },
    )
    result.timings["total_s"] = time.perf_counter() - started
    return EvaluationReport([result])


def evaluate_queries(
    query_folder: str | Path,
    labels_csv: str | Path,
    index_dir: str | Path,
    *,
    label: str | None = None,
    label_key: str | None = None,
    key: SiteKey | str | Path | None = None,
    exclude_same_patient: bool = False,
    ks: Iterable[int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    main_metric: str | None = None,
    n_resamples: int = 1000,
    progress: bool = False,
) -> EvaluationReport:
    """Evaluate an index with a folder of labeled query studies.

    Each case (series) under ``query_folder`` is embedded with the index's own settings and
    searched against the labeled cases of the index; its label comes from ``labels_csv``, matched
    as ``medsearch index --labels`` matches (by file name, relative path or SeriesInstanceUID).
    Query cases without a label or that cannot be decoded are skipped and counted.

    With the site key the index was built with (``key``, or the default key when it matches), a
    query that is itself in the index never retrieves its own case, and with
    ``exclude_same_patient`` never a case of its patient.

    Parameters
    ----------
    query_folder : str or Path
        Studies to use as queries (any depth).
    labels_csv : str or Path
        Labels per file or series of the query studies.
    index_dir : str or Path
        The index to search; it must hold the same label column.
    label : str, optional
        The label column; may be left out when the index has exactly one.
    label_key : str, optional
        Column of ``labels_csv`` naming the file or series (as for ``medsearch index``).
    key : SiteKey, str or Path, optional
        The index's site key (for case ids and patient pseudonyms of the queries).
    exclude_same_patient : bool, default False
        Leave out gallery cases of the query's patient (needs the key).
    ks, limit, seed, main_metric, n_resamples, progress
        As :func:`evaluate_npz`.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    InvalidStudyError
        The folder holds no labeled, decodable query case.
    ConfigError
        Labels file or column missing, or ``k`` larger than the labeled gallery.
    KeyFileError
        ``exclude_same_patient`` without the index's site key.
    IndexNotFoundError, IndexCorruptError, EncoderMismatchError
        As :class:`~medsearch.search.Searcher`.
    """
    started = time.perf_counter()
    query_folder = Path(query_folder)
    if not query_folder.exists():
        raise InvalidStudyError(f"query folder {query_folder} does not exist; give a folder of labeled studies")
    searcher = Searcher(index_dir)
    store = searcher.store
    column = _label_column(label, store)
    table = read_labels(labels_csv, label_key, [column])
    site_key = _matching_key(key, store, required=exclude_same_patient)

    found = scan(find_files(query_folder))
    vectors, labels, case_ids, patients = [], [], [], []
    skipped: dict[str, int] = {"unlabeled": 0, "undecodable": 0, "files_not_images": len(found.skipped)}
    t0 = time.perf_counter()
    for case in tqdm(found.cases, desc="embedding queries", unit="case", disable=not progress, leave=False):
        value = labels_for_case(case, table, query_folder).get(column)
        if value is None or str(value).strip() == "":
            skipped["unlabeled"] += 1
            continue
        try:
            volume, _ = load_volume(case)
        except LoadFailure:
            skipped["undecodable"] += 1
            continue
        vectors.append(embed_volume(volume, searcher.encoder, searcher.config))
        labels.append(str(value))
        if site_key is not None:
            case_ids.append(case_id(site_key, case.study_uid, case.series_uid, case.part))
            patients.append(patient_pseudonym(site_key, case.header))
    embed_s = time.perf_counter() - t0
    if not vectors:
        raise InvalidStudyError(
            f"no labeled query case found in {query_folder} ({skipped['unlabeled']} unlabeled, "
            f"{skipped['undecodable']} undecodable); check that {labels_csv} names these files"
        )
    pick = _subsample(len(vectors), limit, seed)
    q_vectors = np.stack(vectors)[pick]
    q_labels = np.asarray(labels, dtype=str)[pick]

    g_labels, keep = _case_labels(store.cases[column])
    g_vectors = store.vectors()[keep]
    g_ids = store.cases["case_id"].to_numpy(dtype=object)[keep]
    query_rows = None
    gallery_groups = query_groups = None
    if site_key is not None:
        position = {cid: i for i, cid in enumerate(g_ids)}
        query_rows = np.array([position.get(case_ids[i], -1) for i in pick], dtype=np.int64)
        if exclude_same_patient:
            if "patient" not in store.cases:
                raise ConfigError(f"index {index_dir} has no patient column; rebuild it with this medsearch version to exclude same-patient cases")
            gallery_groups = store.cases["patient"].to_numpy(dtype=object)[keep]
            query_groups = np.asarray(patients, dtype=object)[pick]
    result = evaluate_embeddings(
        g_vectors,
        g_labels,
        q_vectors,
        q_labels,
        ks=ks,
        metric=store.metric,
        query_rows=query_rows,
        gallery_groups=gallery_groups,
        query_groups=query_groups,
        main_metric=main_metric,
        n_resamples=n_resamples,
        seed=seed,
        dataset=str(query_folder),
        encoder={k: store.manifest["encoder"].get(k) for k in ("name", "dim", "weights_sha256")},
        settings={
            "input": "queries",
            "index": str(index_dir),
            "label": column,
            "exclude_own_case": site_key is not None,
            "exclude_same_patient": exclude_same_patient,
            "n_queries_in_index": int((query_rows >= 0).sum()) if query_rows is not None else None,
            "skipped": skipped,
            "limit": limit,
            "seed": seed,
        },
    )
    result.timings.update({"embed_s": embed_s, "total_s": time.perf_counter() - started})
    return EvaluationReport([result])


def _encoder_configs(
    encoders: Sequence[str | EncoderConfig] | None, base: EncoderConfig, batch_size: int | None
) -> list[EncoderConfig]:
    configs = [parse_encoder_spec(e, base) for e in encoders] if encoders else [base]
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        configs = [_replace_encoder(c, batch_size=int(batch_size)) for c in configs]
    seen = set()
    for c in configs:
        label = (c.name.lower(), c.checkpoint)
        if label in seen:
            raise ConfigError(f"encoder {c.name}{':' + c.checkpoint if c.checkpoint else ''} is given twice; give each once")
        seen.add(label)
    return configs


def _encoder_record(encoder: Encoder, config: EncoderConfig) -> dict[str, Any]:
    info = encoder.info
    record: dict[str, Any] = {"name": info.name, "dim": info.dim, "weights_sha256": info.weights_sha256}
    if config.checkpoint:
        record["checkpoint"] = config.checkpoint
    record["device"] = resolve_device(config.device)
    # The runtime (torch or ONNX Runtime) gives the same embedding space; record it for timings.
    record["runtime"] = str(getattr(encoder, "runtime", "torch"))
    return record


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All rows, or a seeded random subset of ``limit`` rows in ascending order."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def _label_column(label: str | None, store: IndexStore) -> str:
    columns = list(store.manifest.get("label_columns", []))
    if label is None:
        if len(columns) == 1:
            return columns[0]
        if not columns:
            raise ConfigError(
                f"index {store.path} holds no labels; build it with --labels LABELS.csv to evaluate it"
            )
        raise ConfigError(f"index {store.path} holds several label columns ({', '.join(columns)}); pick one with --label")
    if label not in store.cases:
        raise ConfigError(
            f"index {store.path} has no label column {label!r}; its label columns: {', '.join(columns) or 'none'}"
        )
    return label


def _case_labels(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Labels as strings (``True`` -> ``"True"``) and the mask of cases that have one."""
    keep = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
    return values[keep].astype(str).to_numpy(dtype=str), keep


def _matching_key(key: SiteKey | str | Path | None, store: IndexStore, *, required: bool) -> SiteKey | None:
    """The site key the index was built with, or None when it is not at hand (and not required)."""
    try:
        site_key = key if isinstance(key, SiteKey) else SiteKey.load(key)
    except KeyFileError:
        if required or key is not None:
            raise
        return None
    if site_key.check_value() != store.manifest.get("key_check"):
        if required or key is not None:
            raise KeyFileError(
                f"index {store.path} was built with another site key than {site_key}; give the key it was "
                "built with (--key) to recognize the queries' own cases and patients"
            )
        return None
    return site_key


# --------------------------------------------------------------------------------------------------
# figure


def save_figure(report: EvaluationReport | EvaluationResult, path: str | Path) -> None:
    """Write a PNG: per encoder, precision@k curves per class and the majority-vote confusion matrix.

    Drawn with matplotlib's Agg canvas (no display, and no change to pyplot's backend).

    Raises
    ------
    ConfigError
        The path does not end in ``.png`` or cannot be written.
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
        raise ConfigError(f"cannot write figure {path} ({e.strerror}); give a writable path") from e


# --------------------------------------------------------------------------------------------------
# helpers


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, enum.Enum)):
        return str(value.value if isinstance(value, enum.Enum) else value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror}); give a writable path") from e

