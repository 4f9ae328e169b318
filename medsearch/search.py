"""Where loading, preprocessing, encoding and the store meet: index an archive, query a study.

These functions are the Python API and what the CLI calls::

    from medsearch import build_index, query
    report = build_index("archive/", "my-index", labels="labels.csv")
    result = query("study/", "my-index", k=5)
    result.to_frame()
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from medsearch.config import Config, IndexType, config_from_dict, load_config
from medsearch.deid import DeidOptions, SiteKey, case_metadata
from medsearch.encoders import Encoder, load_encoder
from medsearch.errors import ConfigError, IndexNotFoundError, KeyFileError, MedsearchError
from medsearch.filters import Filter, parse_filters
from medsearch.io import CaseRef, SkippedFile, Volume, find_files, load_study
from medsearch.pipeline import FILE_STATE, Chunk, IndexReport, encoder_input, index_files, pool_slices, write_atomic
from medsearch.sharing import LinkTable
from medsearch.store import MANIFEST, IndexStore, read_manifest

__all__ = [
    "IndexReport",
    "Match",
    "QueryResult",
    "Searcher",
    "build_index",
    "embed_volume",
    "index_info",
    "labels_for_case",
    "query",
    "read_labels",
]

log = logging.getLogger(__name__)

SKIP_REPORT = "skipped.csv"
# Files an index directory may hold before its first commit (or that are local to this machine).
_INDEX_LOCAL_FILES = frozenset({".lock", SKIP_REPORT, FILE_STATE, f"{FILE_STATE}-journal"})
_LABEL_KEYS = ("path", "file", "filename", "file_name", "dicom_name", "SeriesInstanceUID", "StudyInstanceUID")


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


def embed_volume(volume: Volume, encoder: Encoder, config: Config) -> np.ndarray:
    """One case embedding: encode the selected slices (or the volume, for a 3D encoder), then pool.

    Returns a ``(dim,)`` float32 vector of unit length. :func:`build_index` gives the same vectors
    (it encodes several cases per encoder call, with the same two steps).
    """
    vectors = encoder.embed(encoder_input(volume, encoder.info, config))
    return pool_slices(vectors, config.preprocess.pool)


def build_index(
    archive: str | Path,
    index_dir: str | Path,
    *,
    config: Config | str | Path | None = None,
    labels: str | Path | None = None,
    label_key: str | None = None,
    label_columns: Sequence[str] | None = None,
    key: SiteKey | str | Path | None = None,
    deid: DeidOptions | None = None,
    links: str | Path | None = None,
    index_type: IndexType | str | None = None,
    progress: bool = False,
    workers: int | None = None,
    commit_every: int = 64,
    commit_seconds: float = 60.0,
    case_timeout: float | None = 600.0,
    batch_images: int = 32,
    file_cache: bool = True,
    retry_skipped: bool = False,
    lock_timeout: float = 10.0,
) -> IndexReport:
    """Index every case of an archive folder (or add a new folder to an existing index).

    Headers are read first (in parallel); cases already in the index are not decoded again, and files
    unchanged since an earlier run (same size and modification time) are not even read again. The
    other cases are decoded and preprocessed in ``workers`` processes and encoded here, several per
    encoder call (see :mod:`medsearch.pipeline`); the vectors are those :func:`embed_volume` gives.
    Progress is committed in chunks, so an interrupted (even ``kill -9``) run loses at most one
    chunk, the index on disk is always a complete earlier state, and the same call finishes the job.

    Parameters
    ----------
    archive
        A DICOM file or a folder at any depth.
    index_dir
        The index directory; created when missing.
    config
        A :class:`Config`, a TOML file or a preset name; for an existing index it must match the
        settings the index was built with (default: those settings).
    labels, label_key, label_columns
        Optional sidecar CSV of labels per file or series. ``label_key`` is its column that names the
        file (path relative to the archive, or file name) or the SeriesInstanceUID; by default the first
        of ``path, file, filename, file_name, dicom_name, SeriesInstanceUID, StudyInstanceUID``.
        ``label_columns`` picks the columns to keep (default: all others).
    key
        The site key for pseudonyms (a :class:`SiteKey` or a key file path). By default the key from
        ``MEDSEARCH_SITE_KEY``/``MEDSEARCH_KEY_FILE`` or ``~/.config/medsearch/site.key``, created
        on the first run.
    links
        Optional link table (CSV, owner-only, outside the index directory) mapping each case id to
        its source files and UIDs, for users allowed to go back to the source.
    index_type
        ``auto``, ``flat``, ``hnsw`` or ``ivfpq`` (default: the config's ``index.index_type`` for a new
        index, the index's own for an existing one, which this converts when given another type).
    progress
        Show a live bar on stderr (files/s, cases/s, ETA, files skipped).
    workers
        Processes that read, decode and preprocess (default ``min(4, os.cpu_count())``; 0: all in
        this process).
    commit_every, commit_seconds
        Commit once this many new cases wait, or this many seconds after the last commit; commits of a
        large index are spaced out so that they take at most about a tenth of the run.
    case_timeout
        Seconds one case may take to decode before its worker is stopped and its files are skipped
        with ``decode_error`` (None: no limit). A case whose decoding crashes its worker is skipped too.
    batch_images
        Images (selected slices) per encoder call.
    file_cache
        Keep ``INDEX/local-file-state.sqlite`` (file paths, UIDs only as keyed pseudonyms: local to this
        machine, never exported) so that unchanged files are not read again.
    retry_skipped
        Decode again the cases whose files were all skipped by an earlier run (by default they are
        skipped again, with the same reasons, until a file changes).
    lock_timeout
        Seconds to wait for another process writing to the same index.

    Raises
    ------
    InvalidStudyError
        The archive path does not exist.
    ConfigError, EncoderMismatchError, KeyFileError
        Bad settings, or settings or key other than those of the existing index.
    MedsearchError
        Another process is writing to the index; worker processes cannot start.
    """
    started = time.perf_counter()
    archive, index_dir = Path(archive), Path(index_dir)
    site_key = key if isinstance(key, SiteKey) else SiteKey.load(key, create=True)
    deid = deid or DeidOptions()
    files = list(find_files(archive))
    discovered = time.perf_counter() - started
    link_table = LinkTable.for_index(links, index_dir) if links is not None else None
    _check_index_dir(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(index_dir / ".lock"))
    try:
        lock.acquire(timeout=lock_timeout)
    except Timeout:
        raise MedsearchError(
            f"another medsearch process is writing to {index_dir}; wait for it to finish, then run again"
        ) from None
    try:
        store, config = _open_for_writing(index_dir, config, site_key, index_type=index_type)
        encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
        store.check_compatible(encoder.info.to_dict(), config.to_dict()["preprocess"])
        label_table = read_labels(labels, label_key, label_columns) if labels else None
        labels_before = list(store.manifest.get("label_columns", []))
        if label_table is not None:
            store.manifest["label_columns"] = sorted(set(labels_before) | set(label_table.columns))
        # A new index is written even when it stays empty; an existing one only when something changes.
        must_commit = store.manifest.get("generation", 0) == 0 or store.manifest["label_columns"] != labels_before

        created = site_key.path if site_key.created and not isinstance(key, SiteKey) else None
        report = IndexReport(index_dir=index_dir, n_files=len(files), key_created=created)
        report.stage_seconds["discover"] = discovered
        index_files(
            files,
            root=archive,
            store=store,
            encoder=encoder,
            config=config,
            key=site_key,
            # runs in the worker processes: a partial of a module-level function pickles
            describe=functools.partial(_case_row, key=site_key, deid=deid, labels=label_table, archive=archive),
            commit=functools.partial(_flush, store, report=report, archive=archive, link_table=link_table),
            report=report,
            links=link_table,
            workers=workers,
            case_timeout=case_timeout,
            batch_images=batch_images,
            commit_every=commit_every,
            commit_seconds=commit_seconds,
            file_cache=file_cache,
            retry_skipped=retry_skipped,
            must_commit=must_commit,
            progress=progress,
        )
        report.n_cases_total = len(store)
        report.seconds = time.perf_counter() - started
        if not report.accounted:
            log.warning(
                "file counts do not add up: %d found, %d in added cases, %d already indexed, %d skipped",
                report.n_files, report.n_files_added, report.n_files_already_indexed, len(report.skipped),
            )
        return report
    finally:
        lock.release()


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
        self.config = _index_config(self.store.manifest) if config is None else _as_config(config)
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
        if store.manifest.get("files") == self.store.manifest.get("files"):  # names and checksums
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
            record = {k: _plain(v) for k, v in record.items()}
            cid = record.pop("case_id")
            matches.append(Match(rank=rank, case_id=cid, distance=round(float(distance), 6), metadata=record))
        return QueryResult(
            query=query or {},
            results=matches,
            distance=self.store.manifest.get("distance", ""),
            labels=list(self.store.manifest.get("label_columns", [])),
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
        "dim": m["dim"],
        "metric": m["metric"],
        "distance": m.get("distance"),
        "index": {k: m["index"].get(k) for k in ("type", "requested", "params", "ef_search", "nprobe", "memory_budget_mb", "note")},
        "encoder": {k: m["encoder"].get(k) for k in ("name", "dim", "weights_sha256")},
        "preprocess": m["preprocess"],
        "label_columns": m.get("label_columns", []),
        "updated": m.get("updated"),
        "last_run": m.get("last_run", {}),
        "tallies": tallies,
        "verified": sorted(entry["name"] for entry in m["files"].values()) if verify else [],
    }


# -- helpers ----------------------------------------------------------------------------------------


def _as_config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def _index_config(manifest: dict[str, Any]) -> Config:
    data = dict(manifest.get("config", {}))
    if not data:
        raise ConfigError("the index manifest records no config; rebuild the index with this medsearch version")
    # Where and how the network runs is this machine's choice; neither changes the embeddings.
    data["encoder"] = {**data["encoder"], "device": "auto", "runtime": "auto"}
    return config_from_dict(data, source="index manifest")


def _check_index_dir(index_dir: Path) -> None:
    """Refuse a file, or a folder of other files (an archive given by mistake), as an index folder."""
    if index_dir.exists() and not index_dir.is_dir():
        raise ConfigError(f"--index {index_dir} is a file; give a folder for the index")
    if not index_dir.is_dir() or (index_dir / "manifest.json").exists():
        return
    others = sorted(p.name for p in index_dir.iterdir() if p.name not in _INDEX_LOCAL_FILES)
    if others:
        raise ConfigError(
            f"{index_dir} is not a medsearch index and holds other files ({', '.join(others[:3])}...); "
            "give a new or empty folder for --index"
        )


def _open_for_writing(
    index_dir: Path,
    config: Config | str | Path | None,
    key: SiteKey,
    *,
    index_type: IndexType | str | None = None,
) -> tuple[IndexStore, Config]:
    try:
        manifest = read_manifest(index_dir)
    except IndexNotFoundError:
        manifest = None
    if manifest is None:
        _check_index_dir(index_dir)
        cfg = _as_config(config)
        if index_type is not None:
            cfg = cfg.replace(index={"index_type": index_type})
        encoder = load_encoder(cfg.encoder)
        store = IndexStore.create(
            index_dir,
            dim=encoder.dim,
            metric=cfg.index.metric,
            encoder=encoder.info.to_dict(),
            preprocess=cfg.to_dict()["preprocess"],
            key_check=key.check_value(),
            index_type=cfg.index.index_type,
            memory_budget_mb=cfg.index.memory_budget_mb,
            ef_search=cfg.index.ef_search,
            nprobe=cfg.index.nprobe,
        )
        store.manifest["config"] = cfg.to_dict()
        return store, cfg
    store = IndexStore.open(index_dir)
    if store.manifest.get("key_check") != key.check_value():
        raise KeyFileError(
            f"index {index_dir} was built with another site key than {key}; use the key file it was built "
            "with (--key or MEDSEARCH_KEY_FILE), or build a new index"
        )
    cfg = _index_config(store.manifest) if config is None else _as_config(config)
    if index_type is not None:
        cfg = cfg.replace(index={"index_type": index_type})
        if store.manifest["index"].get("requested") != cfg.index.index_type.value:
            # another type for an existing index: convert it now, from the exact vectors it keeps
            store.configure(index_type=cfg.index.index_type)
            store.manifest["config"] = {**store.manifest.get("config", {}), "index": cfg.to_dict()["index"]}
            store.commit()
    return store, cfg


def _flush(
    store: IndexStore,
    chunk: Chunk,
    force: bool = False,
    *,
    report: IndexReport,
    archive: Path,
    link_table: LinkTable | None,
) -> bool:
    """Add a chunk of new cases to the store and commit it; return whether the index was written.

    Without new cases (and without ``force``) the index is left as it is and only the skip report
    is rewritten, so that re-running on an unchanged archive rewrites nothing.
    """
    if chunk.vectors:
        store.add(np.stack(chunk.vectors), pd.DataFrame(chunk.rows), np.stack(chunk.thumbnails) if chunk.thumbnails else None)
    report.n_cases_total = len(store)
    # the link table first: a case in the index always has its way back
    if link_table is not None:
        link_table.save()
    skip_report = _skip_csv(report.skipped, archive)
    if not chunk.vectors and not force:
        write_atomic(store.path / SKIP_REPORT, skip_report)
        return False
    store.commit(extra={SKIP_REPORT: skip_report}, info={"last_run": report.to_dict()})
    return True


def _case_row(
    cid: str,
    case: CaseRef,
    volume: Volume,
    key: SiteKey,
    deid: DeidOptions,
    labels: pd.DataFrame | None,
    archive: Path,
) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": cid}
    header = case.header
    if not str(header.get("PatientID", "") or "") and not str(header.get("StudyInstanceUID", "") or ""):
        # No patient or study identity at all: the case is its own "patient", under the stand-in
        # study key the loader gave it (stable for the same path).
        header = copy.copy(header)
        header.StudyInstanceUID = case.study_uid
    row.update(case_metadata(header, key=key, options=deid))
    row["n_files"] = len(case.files)
    row["n_slices"] = int(volume.pixels.shape[0])
    row["rows"], row["columns"] = int(volume.pixels.shape[1]), int(volume.pixels.shape[2])
    row["spacing_mm"] = "x".join(f"{s:.3g}" for s in volume.spacing)
    if labels is not None:
        row.update(labels_for_case(case, labels, archive))
    return row


def read_labels(path: str | Path, key: str | None, columns: Sequence[str] | None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} does not exist; give a CSV with one row per file or series")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(f"labels file {path} is not a readable CSV: {str(e).splitlines()[0]}") from e
    if key is None:
        by_lower = {c.lower(): c for c in table.columns}
        key = next((by_lower[c.lower()] for c in _LABEL_KEYS if c.lower() in by_lower), None)
        if key is None:
            raise ConfigError(
                f"labels file {path} has none of the columns {', '.join(_LABEL_KEYS)}; name the key column with --label-key"
            )
    elif key not in table.columns:
        raise ConfigError(f"labels file {path} has no column {key!r}; its columns: {', '.join(table.columns)}")
    keep = list(columns) if columns else [c for c in table.columns if c != key and not c.startswith("Unnamed")]
    missing = [c for c in keep if c not in table.columns]
    if missing:
        raise ConfigError(f"labels file {path} has no column(s) {', '.join(missing)}; its columns: {', '.join(table.columns)}")
    reserved = {"case_id", "patient", "modality", "body_part", "sex", "age_band", "n_slices", "n_files"}
    clash = sorted(reserved & set(keep))
    if clash:
        raise ConfigError(f"label column(s) {', '.join(clash)} clash with medsearch metadata; rename them in {path}")
    table = table.drop_duplicates(subset=[key]).set_index(key)[keep]
    table.attrs["key"] = key
    return table


def labels_for_case(case: CaseRef, labels: pd.DataFrame, archive: Path) -> dict[str, Any]:
    key = labels.attrs.get("key", "")
    if key.lower() in ("seriesinstanceuid", "studyinstanceuid"):
        uid = case.series_uid if key.lower() == "seriesinstanceuid" else case.study_uid
        candidates: Iterable[str] = [uid]
    else:
        candidates = []
        for f in case.files:
            try:
                rel = f.resolve().relative_to(archive.resolve()).as_posix()
            except ValueError:
                rel = f.name
            candidates = [*candidates, rel, f.name]
    found = labels.loc[[c for c in candidates if c in labels.index]]
    out: dict[str, Any] = {}
    for col in labels.columns:
        values = [v for v in found[col] if v != ""]
        # several files of one case may disagree: keep the most common value
        out[col] = Counter(values).most_common(1)[0][0] if values else None
    return out


def _skip_csv(skipped: list[SkippedFile], archive: Path) -> bytes:
    rows = []
    for s in skipped:
        try:
            shown = s.path.resolve().relative_to(archive.resolve()).as_posix()
        except ValueError:
            shown = s.path.name
        rows.append({"path": shown, "reason": s.reason.value, "detail": s.detail})
    return pd.DataFrame(rows, columns=["path", "reason", "detail"]).to_csv(index=False).encode("utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value
