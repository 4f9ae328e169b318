"""Retrieval evaluation: how well an encoder, a preprocessing and an index find cases of the same label.

Three inputs (``runners``), one scoring core (``scoring``):

* :func:`evaluate_npz`: a MedMNIST-format ``.npz`` file, query split against gallery split, with one
  or several encoders (``npz``: batched embedding and its cache).
* :func:`evaluate_index`: leave-one-out over the labeled cases of an index.
* :func:`evaluate_queries`: a folder of labeled query studies against an index.

:func:`evaluate_regions` (``regions``) measures something else: whether a slab cut from a series of
an index finds that series first, and the place it was cut (region queries).

Each embeds (or reads) vectors and calls :func:`evaluate_embeddings`, which searches an exact index
and scores the ranked labels with :mod:`medsearch.metrics`. ``protocols`` holds the presets of
published evaluations (:data:`PROTOCOLS`); ``results`` the :class:`EvaluationResult` and
:class:`EvaluationReport` objects, their JSON and CSV tables, :func:`compare_results` (paired tests)
and :func:`save_figure`. The current figures are in ``docs/benchmarks/retrieval.md``.
"""

from __future__ import annotations

from medsearch.evaluate.npz import embed_npz_split, parse_encoder_spec
from medsearch.evaluate.protocols import DEFAULT_KS, PROTOCOLS, Protocol, ProtocolSpec
from medsearch.evaluate.regions import RegionReport, evaluate_regions
from medsearch.evaluate.results import EvaluationReport, EvaluationResult, compare_results, save_figure
from medsearch.evaluate.runners import evaluate_index, evaluate_npz, evaluate_queries
from medsearch.evaluate.scoring import evaluate_embeddings

__all__ = [
    "DEFAULT_KS",
    "EvaluationReport",
    "EvaluationResult",
    "PROTOCOLS",
    "Protocol",
    "ProtocolSpec",
    "RegionReport",
    "compare_results",
    "embed_npz_split",
    "evaluate_embeddings",
    "evaluate_index",
    "evaluate_npz",
    "evaluate_queries",
    "evaluate_regions",
    "parse_encoder_spec",
    "save_figure",
]
