"""Building an index: :func:`build_index` opens (or creates) an index folder and runs the engine on an archive.

It checks the folder and where the site key lies (never inside the folder), walks the archive
(:func:`~medsearch.io.dicom.scan.walk_archive`: what is not a regular file is reported, not
dropped), takes the index's lock, moves the site-only files of an index written by an older
version into ``local/``, opens the index with its settings (or creates it with the given ones),
reads the optional label CSV, and hands one :class:`IndexOptions` to
:func:`~medsearch.indexing.index_files`. The engine calls back into this module to describe each
case (``_case_row``: de-identified metadata and labels, in the worker processes) and to commit each
chunk of cases with the skip report (``_flush``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from medsearch._files import write_bytes
from medsearch.config import Config, IndexType, as_config, config_for_index, parse_enum
from medsearch.deid import DeidOptions, SiteKey, SiteTerms, case_metadata
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, IndexNotFoundError, KeyFileError, MedsearchError
from medsearch.indexing.dicomweb import SPOOL, DicomWebSource, sync_dicomweb
from medsearch.indexing.engine import Chunk, index_files
from medsearch.indexing.filecache import FILE_STATE
from medsearch.indexing.options import Engine, IndexOptions
from medsearch.indexing.ray_engine import index_files_ray
from medsearch.indexing.report import IndexReport
from medsearch.io import CaseRef, SkippedFile, Volume
from medsearch.io.dicom.scan import printable_path, walk_archive
from medsearch.io.labels import label_rows_of_case, labels_for_case, read_labels
from medsearch.pacs import DicomWeb, date_range, is_dicomweb_url
from medsearch.sharing import LinkTable
from medsearch.store import LOCAL_DIR, IndexStore, read_manifest

__all__ = ["SKIP_REPORT", "build_index", "pixel_hash"]

log = logging.getLogger(__name__)

#: the skip report's path inside an index directory (site-only: it names source files)
SKIP_REPORT = f"{LOCAL_DIR}/skipped.csv"
# Where an index written before local/ existed kept its site-only files; moved there on the next run.
_OLD_SKIP_REPORT, _OLD_FILE_STATE = "skipped.csv", "local-file-state.sqlite"
# Files an index directory may hold before its first commit (or that are local to this machine).
_INDEX_LOCAL_FILES = frozenset({".lock", LOCAL_DIR, _OLD_SKIP_REPORT, _OLD_FILE_STATE, f"{_OLD_FILE_STATE}-journal"})
# A row's field (never stored) carrying the keys of the labels CSV rows that named the case, for the report.
_LABEL_ROWS = "\0label_rows"
# The variables SiteKey.load reads when no key is given (see medsearch.deid.keys).
_ENV_KEY, _ENV_KEY_FILE = "MEDSEARCH_SITE_KEY", "MEDSEARCH_KEY_FILE"


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
    modality: str | None = None,
    since: str | None = None,
    until: str | None = None,
    dicomweb_auth_file: str | Path | None = None,
    dicomweb_slices_only: bool = False,
    engine: Engine | str = Engine.LOCAL,
    ray_address: str | None = None,
) -> IndexReport:
    """Index every case of an archive folder (or add a new folder to an existing index).

    Headers are read first (in parallel); cases already in the index are not decoded again, and files
    unchanged since an earlier run (same size and modification time) are not even read again. The
    other cases are decoded and preprocessed in ``workers`` processes and encoded here, several per
    encoder call (see :mod:`medsearch.indexing.engine`); the vectors are those
    :func:`~medsearch.embedding.embed_volume` gives.
    Progress is committed in chunks, so an interrupted (even ``kill -9``) run loses at most one
    chunk, the index on disk is always a complete earlier state, and the same call finishes the job.

    Parameters
    ----------
    archive
        A DICOM file or a folder at any depth, or the root URL of a DICOMweb server (a PACS), e.g.
        ``"http://127.0.0.1:8042/dicom-web"``: its series are listed (QIDO-RS), those the index lacks
        fetched (WADO-RS) into ``INDEX/local/spool/`` in batches and indexed as files are (see
        :mod:`medsearch.indexing.dicomweb`); the run report's ``dicomweb`` says what was fetched.
    index_dir
        The index directory; created when missing. Its ``local/`` folder (skip report, file-state
        cache) is site-only; the rest may be shared (see ``docs/index-format.md``).
    config
        A :class:`Config`, a TOML file or a preset name; for an existing index it must match the
        settings the index was built with (default: those settings).
    labels, label_key, label_columns
        Optional sidecar CSV of labels per file or series. ``label_key`` is its column that names the
        file (path relative to the archive, or file name) or the SeriesInstanceUID; by default the first
        of ``path, file, filename, file_name, dicom_name, SeriesInstanceUID, StudyInstanceUID``.
        ``label_columns`` picks the columns to keep (default: all others but those of file paths, file
        names, UIDs, identifiers and dates; the report says which were left out, and why, and how
        many rows of the CSV matched a case).
    key
        The site key for pseudonyms (a :class:`SiteKey` or a key file path, never inside
        ``index_dir``). By default the key from ``MEDSEARCH_SITE_KEY``/``MEDSEARCH_KEY_FILE`` or
        ``~/.config/medsearch/site.key``, created on the first run.
    links
        Optional link table (CSV, owner-only, outside the index directory) mapping each case id to
        its source files and UIDs, for users allowed to go back to the source.
    index_type
        ``auto``, ``flat``, ``hnsw``, ``ivfpq`` or ``ivfpq-disk`` (default: the config's ``index.index_type`` for a new
        index, the index's own for an existing one, which this converts when given another type).
    progress
        Show a live bar on stderr (files/s, cases/s, ETA, files skipped).
    workers
        Processes that read, decode and preprocess (default ``min(4, os.cpu_count())``; 0: all in
        this process). They never run the calling script again, so a script needs no
        ``if __name__ == "__main__":`` guard; where none can start, this process does the work and a
        warning says so.
    commit_every, commit_seconds
        Commit once this many new cases wait, or this many seconds after the last commit; commits of a
        large index are spaced out so that they take at most about a tenth of the run.
    case_timeout
        Seconds one case may take to decode before its worker is stopped and its files are skipped
        with ``decode_error`` (None: no limit). A case whose decoding crashes its worker is skipped too.
    batch_images
        Images (selected slices) per encoder call.
    file_cache
        Keep ``INDEX/local/file-state.sqlite`` (file paths, UIDs only as keyed pseudonyms: local to this
        machine, never exported) so that unchanged files are not read again.
    retry_skipped
        Decode again the cases whose files were all skipped by an earlier run (by default they are
        skipped again, with the same reasons, until a file changes).
    lock_timeout
        Seconds to wait for another process writing to the same index.
    modality, since, until
        With a DICOMweb URL: only the series of this modality (``"CT"``), of studies dated from
        ``since`` to ``until`` (``YYYYMMDD`` or ``YYYY-MM-DD``, inclusive).
    dicomweb_auth_file
        With a DICOMweb URL: a file holding ``Bearer TOKEN`` or ``USER:PASSWORD`` (default: the
        environment, see :func:`medsearch.pacs.read_credentials`; never a value on a command line).
    dicomweb_slices_only
        With a DICOMweb URL: fetch the pixels of only the slices the encoder reads, and the headers
        of the rest (fewer bytes over a slow link; slower against a server on the same network).
    engine, ray_address
        ``"local"`` (the worker processes above) or ``"ray"``: the same run on a Ray cluster
        (``pip install "medsearch[ray]"``; see :mod:`medsearch.indexing.ray_engine` and
        ``docs/cluster.md``), at ``ray_address`` (``"auto"``, ``HOST:PORT``; None: a Ray started
        here for the run). The index at the end is the same.

    Raises
    ------
    InvalidStudyError
        The archive path does not exist.
    ConfigError, EncoderMismatchError, KeyFileError
        Bad settings, settings or key other than those of the existing index, or a key file or link
        table inside ``index_dir`` (refused before anything is created).
    MedsearchError
        Another process is writing to the index; worker processes that started die as they are replaced.
    """
    started = time.perf_counter()
    source = _dicomweb_source(archive, modality=modality, since=since, until=until, auth_file=dicomweb_auth_file,
                              slices_only=dicomweb_slices_only)
    index_dir = Path(index_dir)
    archive = Path(archive) if source is None else index_dir / SPOOL  # a server's series are fetched there
    _check_key_outside(_key_location(key), index_dir)
    _check_index_dir(index_dir)
    link_table = LinkTable.for_index(links, index_dir) if links is not None else None
    found = list(walk_archive(archive)) if source is None else []
    files = [entry for entry in found if isinstance(entry, Path)]
    discovered = time.perf_counter() - started
    site_key = key if isinstance(key, SiteKey) else SiteKey.load(key, create=True)
    _check_key_outside(site_key.path, index_dir)
    deid = deid or DeidOptions()
    options = IndexOptions(
        workers=workers,
        case_timeout=case_timeout,
        batch_images=batch_images,
        commit_every=commit_every,
        commit_seconds=commit_seconds,
        file_cache=file_cache,
        retry_skipped=retry_skipped,
        progress=progress,
        engine=parse_enum(Engine, engine, "engine"),
        ray_address=ray_address,
    )
    if source is not None and options.engine is Engine.RAY:
        raise ConfigError("--engine ray does not index a DICOMweb server yet; index it with the local engine (the default)")
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(index_dir / ".lock"))
    try:
        lock.acquire(timeout=lock_timeout)
    except Timeout:
        raise MedsearchError(
            f"another medsearch process is writing to {index_dir}; wait for it to finish, then run again"
        ) from None
    try:
        _move_local_state(index_dir)
        store, config = _open_for_writing(index_dir, config, site_key, index_type=index_type)
        encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
        store.check_compatible(encoder.info.to_dict(), config.to_dict()["preprocess"])
        terms = SiteTerms(body_parts=config.deid.body_parts, manufacturers=config.deid.manufacturers, models=config.deid.models)
        label_table = read_labels(labels, label_key, label_columns) if labels else None
        new_labels = label_table is not None and store.add_label_columns(label_table.columns)
        # A new index is written even when it stays empty; an existing one only when something changes.
        must_commit = store.manifest.generation == 0 or new_labels

        created = site_key.path if site_key.created and not isinstance(key, SiteKey) else None
        # every path met counts: what is not a regular file (FIFO, broken link, loop...) is skipped
        report = IndexReport(index_dir=index_dir, n_files=len(found), key_created=created)
        report.skipped.extend(entry for entry in found if isinstance(entry, SkippedFile))
        if label_table is not None:
            report.label_columns = list(label_table.columns)
            report.label_columns_dropped = dict(label_table.attrs.get("dropped", {}))
            report.label_rows = int(label_table.attrs.get("rows", len(label_table)))
        report.stage_seconds["discover"] = discovered
        run = index_files_ray if options.engine is Engine.RAY else index_files

        def run_engine(files: list[Path], archive: Path) -> None:  # the files found under archive
            run(
                files,
                root=archive,
                store=store,
                encoder=encoder,
                config=config,
                key=site_key,
                # runs in the worker processes: a partial of a module-level function pickles
                describe=functools.partial(_case_row, key=site_key, deid=deid, terms=terms, labels=label_table, archive=archive),
                commit=functools.partial(_flush, store, report=report, archive=archive, link_table=link_table),
                report=report,
                links=link_table,
                must_commit=must_commit,
                options=options,
            )

        if source is None:
            run_engine(files, archive)
        else:  # a DICOMweb server: its new series go through the same run, in batches of fetched files
            sync_dicomweb(source, store=store, key=site_key, report=report, run=run_engine, links=link_table)
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


def _dicomweb_source(
    archive: str | Path, *, modality: str | None, since: str | None, until: str | None, auth_file: str | Path | None,
    slices_only: bool = False,
) -> DicomWebSource | None:
    """The DICOMweb server an archive URL names (None for a path); its filters are checked now, before any work.

    Raises
    ------
    ConfigError
        A filter given with a path, a malformed filter or URL, or URL credentials.
    """
    if not is_dicomweb_url(archive):
        if modality or since or until or auth_file or slices_only:
            raise ConfigError(
                f"--modality, --since, --until, --dicomweb-auth-file and --fetch-slices-only apply to a DICOMweb server, not to the folder "
                f"{archive}; give a URL such as http://127.0.0.1:8042/dicom-web, or leave them out"
            )
        return None
    date_range(since, until)  # a malformed date is told before the server is asked anything
    return DicomWebSource(DicomWeb(str(archive), auth_file=auth_file), modality=modality, since=since, until=until,
                          slices_only=slices_only)


def _key_location(key: SiteKey | str | Path | None) -> Path | None:
    """The key file :meth:`SiteKey.load` would use (None: a key from the environment, or the default file)."""
    if isinstance(key, SiteKey):
        return key.path
    if key is not None:
        return Path(key).expanduser()
    if not os.environ.get(_ENV_KEY) and os.environ.get(_ENV_KEY_FILE):
        return Path(os.environ[_ENV_KEY_FILE]).expanduser()
    return None


def _check_key_outside(key_path: Path | None, index_dir: Path) -> None:
    """Refuse a site key file inside the index folder: the folder is meant to be shared, the key never."""
    if key_path is None:
        return
    where, folder = key_path.resolve(), index_dir.resolve()
    if where == folder or folder in where.parents:
        raise KeyFileError(
            f"keep the site key outside the index folder: {key_path} is inside {index_dir}, which is meant to be "
            "shared; give --key (or MEDSEARCH_KEY_FILE) a path outside it, e.g. ~/.config/medsearch/site.key"
        )


def _move_local_state(index_dir: Path) -> None:
    """Move the skip report and file-state cache of an index written before ``local/`` existed into it.

    A cache left with a journal by a killed run is opened first, so that SQLite rolls the journal
    back before the file moves away from it; a cache that cannot be opened is dropped (the next
    run reads every header again). Where ``local/`` already holds a file, the old one is removed.
    """
    old_cache, old_report = index_dir / _OLD_FILE_STATE, index_dir / _OLD_SKIP_REPORT
    journal = index_dir / f"{_OLD_FILE_STATE}-journal"
    if not (old_cache.exists() or old_report.exists() or journal.exists()):
        return
    (index_dir / LOCAL_DIR).mkdir(mode=0o700, exist_ok=True)
    if journal.exists() and old_cache.exists():
        try:
            with contextlib.closing(sqlite3.connect(old_cache)) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            old_cache.unlink()
    journal.unlink(missing_ok=True)
    for old, new in ((old_cache, index_dir / FILE_STATE), (old_report, index_dir / SKIP_REPORT)):
        if not old.exists():
            continue
        if new.exists():
            old.unlink()
        else:
            os.replace(old, new)
    log.info("moved the skip report and file-state cache of %s into %s/", index_dir, LOCAL_DIR)


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
        cfg = as_config(config)
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
        store.record_config(cfg.to_dict())
        return store, cfg
    store = IndexStore.open(index_dir)
    if store.manifest.key_check != key.check_value():
        raise KeyFileError(
            f"index {index_dir} was built with another site key than {key}; use the key file it was built "
            "with (--key or MEDSEARCH_KEY_FILE), or build a new index"
        )
    cfg = config_for_index(store.manifest.config) if config is None else as_config(config)
    _check_crop_grid(store, cfg)
    if index_type is not None:
        cfg = cfg.replace(index={"index_type": index_type})
        if store.manifest.index.requested is not cfg.index.index_type:
            # another type for an existing index: convert it now, from the exact vectors it keeps
            store.configure(index_type=cfg.index.index_type)
            store.record_config({**(store.manifest.config or {}), "index": cfg.to_dict()["index"]})
            store.commit()
    return store, cfg


def _check_crop_grid(store: IndexStore, cfg: Config) -> None:
    """Refuse to add to an index with another ``crop_grid`` than its cases were built with: their tiles
    and the new cases' would not match one query box (it is widened to one grid's tile size).

    Raises
    ------
    ConfigError
        The index holds cases and ``cfg`` asks for another grid.
    """
    recorded = dict(store.manifest.config or {})
    built = int(recorded.get("index", {}).get("crop_grid", 0))
    if cfg.index.crop_grid == built:
        return
    if not len(store):  # no case yet: the index takes the new grid
        store.record_config({**recorded, "index": {**recorded.get("index", {}), "crop_grid": cfg.index.crop_grid}})
        return
    kept = f"crop vectors of crop_grid = {built}" if built else "no crop vectors"
    raise ConfigError(
        f"index {store.path} keeps {kept} for its {len(store)} case(s), and this config asks for crop_grid = "
        f"{cfg.index.crop_grid}; add to it with its own settings (omit --config, or set [index] crop_grid = {built}), "
        "or build a new index"
    )


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
    for row in chunk.rows:  # which label rows named each case: counted here, never stored
        matched = row.pop(_LABEL_ROWS, None)
        if matched:
            report.label_rows_matched.update(matched)
            report.n_cases_labelled += 1
    if chunk.vectors:
        store.add(np.stack(chunk.vectors), pd.DataFrame(chunk.rows), np.stack(chunk.thumbnails) if chunk.thumbnails else None,
                  slices=chunk.slices if len(chunk.slices) == len(chunk.vectors) else None,
                  crops=chunk.crops if len(chunk.crops) == len(chunk.vectors) and any(c is not None for c in chunk.crops) else None)
    report.n_cases_total = len(store)
    # the link table first: a case in the index always has its way back
    if link_table is not None:
        link_table.save()
    skip_report = store.path / SKIP_REPORT
    skip_report.parent.mkdir(mode=0o700, exist_ok=True)
    write_bytes(skip_report, _skip_csv(report.skipped, archive), mode=0o600)
    if not chunk.vectors and not force:
        return False
    store.commit(info={"last_run": report.to_dict()})
    return True


def _case_row(
    cid: str,
    case: CaseRef,
    volume: Volume,
    key: SiteKey,
    deid: DeidOptions,
    terms: SiteTerms,
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
    row.update(case_metadata(header, key=key, options=deid, terms=terms))
    row["n_files"] = len(case.files)
    row["n_slices"] = int(volume.pixels.shape[0])
    row["rows"], row["columns"] = int(volume.pixels.shape[1]), int(volume.pixels.shape[2])
    row["spacing_mm"] = "x".join(f"{s:.3g}" for s in volume.spacing)
    row["pixel_hash"] = pixel_hash(volume, key)
    if labels is not None:
        row.update(labels_for_case(case, labels, archive))
        row[_LABEL_ROWS] = label_rows_of_case(case, labels, archive)
    return row


def pixel_hash(volume: Volume, key: SiteKey) -> str:
    """A keyed digest of a case's decoded pixels: the same for exact copies, whatever their UIDs or paths.

    Over the volume's shape and the slices it decoded (all of them, or those ``load_volume`` was
    asked for: the same for copies), then keyed with the site key, so that the value identifies
    nothing outside the site (``"i-"`` and 16 hex digits).
    """
    pixels = volume.pixels
    digest = hashlib.blake2b(digest_size=32)
    digest.update(repr((pixels.shape, str(pixels.dtype), volume.decoded)).encode())
    for index in range(pixels.shape[0]) if volume.decoded is None else volume.decoded:
        digest.update(np.ascontiguousarray(pixels[index]).data)
    return key.pseudonym(digest.hexdigest(), kind="image")


def _skip_csv(skipped: list[SkippedFile], archive: Path) -> bytes:
    """The skip report: each path relative to the archive, and in the details too, as printable text."""
    base = archive if archive.is_dir() else archive.parent
    # the archive's folder as a detail may spell it (a duplicate names the other file), longest first
    spellings = {os.path.join(os.path.abspath(base), ""), os.path.join(str(base.resolve()), "")}
    if base.is_absolute():
        spellings.add(os.path.join(str(base), ""))
    prefixes = sorted((p for p in spellings if len(p) > 1), key=len, reverse=True)  # never "/" alone
    rows = []
    for s in skipped:
        detail = s.detail
        for prefix in prefixes:
            detail = detail.replace(prefix, "")
        rows.append({"path": printable_path(_relative(s.path, base)), "reason": s.reason.value, "detail": printable_path(detail)})
    return pd.DataFrame(rows, columns=["path", "reason", "detail"]).to_csv(index=False).encode("utf-8")


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base``: as walked (through any link), else as resolved, else its name."""
    for inner, outer in ((path, base), (path.absolute(), base.absolute())):
        try:
            return inner.relative_to(outer).as_posix()
        except ValueError:
            continue
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a link loop (Python before 3.13)
        return path.name
