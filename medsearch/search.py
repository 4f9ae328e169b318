"""The query side: open an index with its encoder and find the cases most similar to a study.

These functions are the Python API and what the CLI calls::

    from medsearch import build_index, query
    report = build_index("archive/", "my-index", labels="labels.csv")
    result = query("study/", "my-index", k=5)
    result.to_frame()

:class:`Searcher` keeps an index and its encoder open for many queries; :func:`query` is one query;
:func:`index_info` says what an index holds. Building an index lives in :mod:`medsearch.indexing`,
which this module does not import: ``medsearch.search.build_index`` and ``IndexReport`` still work,
loaded from there on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medsearch._json import plain
from medsearch.config import Config, as_config, config_for_index
from medsearch.embedding import embed_volume
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError
from medsearch.filters import Filter, parse_filters
from medsearch.io import Volume, load_study
from medsearch.sharing import LinkTable
from medsearch.store import MANIFEST, IndexStore

if TYPE_CHECKING:  # for type checkers only: at run time, __getattr__ (below) loads them on first use
    from medsearch.indexing import IndexReport as IndexReport
    from medsearch.indexing import build_index as build_index

__all__ = [
    "Match",
    "QueryResult",
    "Searcher",
    "embed_volume",
    "index_info",
    "query",
]

# Names of the building side that callers have imported from here; see __getattr__.
_INDEXING = frozenset({"IndexReport", "build_index"})


def __getattr__(name: str) -> Any:
    """``build_index`` and ``IndexReport`` from :mod:`medsearch.indexing`, imported only when asked for."""
    if name in _INDEXING:
        import medsearch.indexing

        return getattr(medsearch.indexing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Match:
    """One retrieved case. ``distance``: lower is closer (see the index manifest's ``distance``)."""

    rank: int
    case_id: str
    distance: float
    metadata: dict[str, Any]
    source: dict[str, Any] | None = None  # only after QueryResult.resolve() with a link table

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "case_id": self.case_id, "distance": self.distance, "metadata": self.metadata}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass
class QueryResult:
    """The ranked cases most similar to one study."""

    query: dict[str, Any]
    results: list[Match]
    distance: str = ""
    labels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "distance": self.distance, "results": [m.to_dict() for m in self.results]}

    def resolve(self, links: str | Path) -> QueryResult:
        """The same result with each match's source location, from a link table (``index --links``).

        Raises
        ------
        ConfigError
            The link table is missing or not one.
        """
        path = Path(links)
        if not path.is_file():
            raise ConfigError(f"link table {path} does not exist; it is written by: medsearch index ... --links FILE")
        table = LinkTable(path)
        matches = [replace(m, source=table.resolve(m.case_id) or {"files": []}) for m in self.results]
        return replace(self, results=matches)

    def to_frame(self) -> pd.DataFrame:
        """A table: rank, case_id, distance, then one column per metadata field."""
        rows = [{"rank": m.rank, "case_id": m.case_id, "distance": m.distance, **m.metadata} for m in self.results]
        return pd.DataFrame(rows)


def query(
    study: str | Path,
    index_dir: str | Path,
    *,
    k: int = 10,
    config: Config | str | Path | None = None,
    where: str | Filter | Sequence[str | Filter] | None = None,
    volume: Volume | None = None,
) -> QueryResult:
    """The ``k`` cases of an index most similar to a study (a DICOM file or a series folder).

    ``where`` keeps only the cases whose metadata match every filter, e.g.
    ``["modality=CT", "age>=60", "Contrast=True"]`` (see :mod:`medsearch.filters`); ``k`` results
    still come back whenever ``k`` cases match. ``volume``: the study as
    :func:`~medsearch.io.load_study` already decoded it (e.g. to draw it on a result sheet too), so
    that it is not decoded again; ``study`` is then only recorded in the result.

    Raises
    ------
    InvalidStudyError
        The study is missing, not DICOM, has no image, or several series.
    IndexNotFoundError, IndexCorruptError
        ``index_dir`` is not a readable index.
    EncoderMismatchError
        ``config`` differs from the settings the index was built with.
    FilterError
        A filter is malformed, names a field the index lacks, or compares text as a number.
    """
    return Searcher(index_dir, config=config).search(study, k=k, where=where, volume=volume)


def _manifest_stamp(index_dir: Path) -> tuple[int, int, int] | None:
    """What changes when a commit replaces the manifest (it is written anew, then renamed over)."""
    try:
        st = os.stat(index_dir / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Searcher:
    """An open index with its encoder, for many queries in a row (a notebook, a service)."""

    def __init__(self, index_dir: str | Path, *, config: Config | str | Path | None = None) -> None:
        self.index_dir = Path(index_dir)
        self._own_config = config is not None
        self._seen = _manifest_stamp(self.index_dir)
        self.store = IndexStore.open(index_dir)
        self.config = config_for_index(self.store.manifest.config) if config is None else as_config(config)
        self.encoder = load_encoder(self.config.encoder, input_size=self.config.preprocess.size)
        self._adopt(self.store)

    def _adopt(self, store: IndexStore) -> None:
        store.check_compatible(self.encoder.info.to_dict(), self.config.to_dict()["preprocess"])
        if self._own_config:  # a config's search knobs apply to this searcher (not written to the index)
            store.configure(ef_search=self.config.index.ef_search, nprobe=self.config.index.nprobe)
        self.store = store

    def refresh(self) -> bool:
        """Load the index again if ``medsearch index`` has committed to it since; True when it did.

        A long-lived searcher (``medsearch serve``, a notebook) calls this between queries: it costs
        one ``stat`` when nothing changed. Each commit is a consistent snapshot, so a query sees the
        index before or after a commit, never a mix.

        Raises
        ------
        IndexNotFoundError, IndexCorruptError, EncoderMismatchError
            The index on disk can no longer be opened with this searcher's encoder and settings; the
            searcher keeps the index it had, and the next call tries again.
        """
        stamp = _manifest_stamp(self.index_dir)
        if stamp == self._seen:
            return False
        store = IndexStore.open(self.index_dir)
        if store.manifest.files == self.store.manifest.files:  # names and checksums
            self._seen = stamp
            return False
        self._adopt(store)
        self._seen = stamp
        return True

    def info(self) -> dict[str, Any]:
        """What the loaded index holds, as :func:`index_info` says (without opening it again)."""
        return _store_info(self.store, self.index_dir)

    def search(
        self,
        study: str | Path,
        *,
        k: int = 10,
        where: str | Filter | Sequence[str | Filter] | None = None,
        volume: Volume | None = None,
    ) -> QueryResult:
        """The ``k`` cases most similar to a study, among those matching ``where`` (see :func:`query`).

        Raises
        ------
        ConfigError
            ``k`` is below 1.
        FilterError
            A bad filter (checked before the study is read).
        InvalidStudyError
            The study is missing, not DICOM, has no image, or several series.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        filters = parse_filters(where)
        self.store.matching(filters)  # a bad filter fails before the study is decoded and encoded
        if volume is None:
            volume = load_study(study)[1]
        vector = embed_volume(volume, self.encoder, self.config)
        info: dict[str, Any] = {"path": str(study), "modality": volume.modality, "n_slices": int(volume.pixels.shape[0])}
        if filters:
            info["where"] = [str(f) for f in filters]
        return self.search_vector(vector, k=k, where=filters, query=info)

    def search_vector(
        self,
        vector: np.ndarray,
        *,
        k: int = 10,
        where: str | Filter | Sequence[str | Filter] | None = None,
        query: dict[str, Any] | None = None,
    ) -> QueryResult:
        """The ``k`` cases nearest to an embedding, among those matching ``where``.

        Raises
        ------
        FilterError
            A filter is malformed or names a field the index lacks.
        """
        hits = self.store.search(vector[None, :], k, where=where)
        found = hits.ids[0][hits.ids[0] >= 0]
        # only the rows returned: the whole table would cost more than the search on a large index
        records = self.store.cases.iloc[found].to_dict(orient="records")
        matches = []
        for rank, (record, distance) in enumerate(zip(records, hits.distances[0]), start=1):
            record = {k: plain(v) for k, v in record.items()}
            cid = record.pop("case_id")
            matches.append(Match(rank=rank, case_id=cid, distance=round(float(distance), 6), metadata=record))
        return QueryResult(
            query=query or {},
            results=matches,
            distance=self.store.manifest.distance,
            labels=list(self.store.manifest.label_columns),
        )


def index_info(index_dir: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """What an index holds: counts, encoder, metric, preprocessing, label columns, and per-field tallies.

    With ``verify``, every data file is hashed and compared with the manifest's SHA-256, even the
    files this machine verified before (an ordinary open checks sizes, and hashes only files that
    changed since they were last verified); ``"verified"`` lists the files checked.

    Raises
    ------
    IndexNotFoundError
        ``index_dir`` holds no index.
    IndexCorruptError
        A data file is missing, truncated or does not match its checksum (the message names it).
    """
    return _store_info(IndexStore.open(index_dir, verify=verify), index_dir, verify=verify)


def _store_info(store: IndexStore, index_dir: str | Path, *, verify: bool = False) -> dict[str, Any]:
    m = store.manifest
    cases = store.cases
    tallies = {
        col: {str(k): int(v) for k, v in cases[col].fillna("unknown").value_counts().head(12).items()}
        for col in ("modality", "body_part", "sex", "age_band", "manufacturer")
        if col in cases
    }
    return {
        "index_dir": str(index_dir),
        "cases": len(store),
        "dim": m.dim,
        "metric": m.metric.value,
        "distance": m.distance,
        "index": {k: m.index.to_dict()[k] for k in ("type", "requested", "params", "ef_search", "nprobe", "memory_budget_mb", "note")},
        "encoder": {k: m.encoder.get(k) for k in ("name", "dim", "weights_sha256")},
        "preprocess": m.preprocess,
        "label_columns": m.label_columns,
        "updated": m.updated,
        "last_run": m.last_run or {},
        "tallies": tallies,
        "verified": sorted(entry.name for entry in m.files.values()) if verify else [],
    }
