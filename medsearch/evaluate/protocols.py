"""Published evaluation protocols, and the cut-offs and metric names an evaluation reports.

A protocol (:data:`PROTOCOLS`) fixes the splits, cut-offs and headline metrics of a published
evaluation so that a number from medsearch can stand beside the paper's; the current figures are in
``docs/benchmarks/retrieval.md``. Without a protocol an evaluation reports :data:`DEFAULT_KS`.

:func:`resolve_protocol`, :func:`resolve_ks`, :func:`metric_names` and :func:`default_headline` turn
the options of an evaluation into what the scoring core computes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medsearch.errors import ConfigError
from medsearch.metrics import METRICS

__all__ = [
    "DEFAULT_KS",
    "PROTOCOLS",
    "Protocol",
    "ProtocolSpec",
    "default_headline",
    "metric_names",
    "resolve_ks",
    "resolve_protocol",
]

DEFAULT_KS = (1, 5, 10)


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


def resolve_protocol(protocol: Protocol | str | None) -> ProtocolSpec | None:
    """The preset of ``protocol``; None for no protocol (``None``, ``""`` or ``"none"``).

    Raises
    ------
    ConfigError
        An unknown protocol name.
    """
    if protocol is None or protocol == "" or protocol == "none":
        return None
    try:
        return PROTOCOLS[Protocol(protocol)]
    except ValueError:
        names = ", ".join(p.value for p in Protocol)
        raise ConfigError(f"unknown protocol {protocol!r}; use one of: {names} (or none)") from None


def resolve_ks(ks: Iterable[int] | None, spec: ProtocolSpec | None) -> tuple[int, ...]:
    """The protocol's cut-offs together with any asked for, sorted and unique.

    Raises
    ------
    ConfigError
        A cut-off that is not a whole number >= 1.
    """
    wanted: set[int] = set(spec.ks) if spec else set()
    given = list(ks) if ks is not None else []
    for k in given:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"every k must be a whole number >= 1, got {k!r}")
    wanted.update(int(k) for k in given)
    if not wanted:
        wanted.update(DEFAULT_KS)
    return tuple(sorted(wanted))


def metric_names(ks: Sequence[int]) -> list[str]:
    """JSON names of every metric, in :data:`~medsearch.metrics.METRICS` order, expanded over ``ks``."""
    names: list[str] = []
    for pattern in METRICS:
        if pattern.endswith("@k"):
            names.extend(pattern[:-1] + str(k) for k in ks)
        else:
            names.append(pattern)
    return names


def default_headline(ks: Sequence[int]) -> tuple[str, ...]:
    """The metrics a report puts first when no protocol names its own."""
    k = max(ks)
    return ("hit@1" if 1 in ks else f"hit@{k}", f"precision@{k}", f"map@{k}", f"mmv@{k}", f"knn_acc@{k}", "map@r", "mrr")
