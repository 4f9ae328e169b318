"""Indexing from a DICOMweb server (a PACS): the series it lists go through the same engine as files.

:func:`~medsearch.indexing.build_index` calls :func:`sync_dicomweb` when its archive is a URL. A
run:

1. lists the server's series by QIDO-RS (:func:`~medsearch.pacs.list_series`, with the modality and
   date filters);
2. leaves out, without downloading anything, each series the index already holds: one an earlier
   sync recorded in the sync state (``INDEX/local/dicomweb-sync.sqlite``, keyed pseudonyms of the
   UIDs, see :class:`~medsearch.pacs.SyncState`) with the same instance count, or whose case id
   (keyed from the UIDs the QIDO answer gives, as for files) is already in the index, as when the
   index was built from a copy of the files;
3. fetches what the cases of the other series need by WADO-RS into a spool folder, ``INDEX/local/spool/<series token>/``,
   in batches, the next batch while the engine works on the current one, and hands each batch's
   files to :func:`~medsearch.indexing.index_files` exactly as a folder of files would be handed
   (workers, encoder batches, chunked commits, skip report, file-state cache, link table);
4. records each series of the batch in the sync state once the engine has committed its cases, and
   deletes its files.

Only what the case needs is fetched (:mod:`medsearch.pacs.partial`): every instance's header from
the series metadata, written as a header-only file, so that the engine groups and orders the series,
counts its files and reads its slice spacing as from the stored files; and the whole instances of
the slices the engine decodes (chosen with the index's own settings, :func:`_slice_plan`), of the
first file of each case and of the middle slice. The engine never reads the pixels of the others.
A series of multi-frame or mosaic instances, or one the engine would read whole (a 3D encoder,
tri-planar images, files without slice geometry), is fetched whole, as is a series where the
encoder reads more than half the instances (one request then costs less than one per instance).

A ``kill -9`` loses at most the batch in flight: its committed cases are recognised by their case
ids on the next run, the rest is fetched again, and the spool is emptied when a run starts. A
series the server fails to send (HTTP error after the retries) is skipped with reason
``fetch_error`` and its HTTP status, and fetched again by the next run; a server that stops
answering (or fails eight series in a row, as a gateway in front of a stopped PACS does) ends the run (after the series already fetched are indexed) with a
:class:`~medsearch.errors.DicomWebError` naming the server.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsearch.config import config_for_index
from medsearch.deid import SiteKey, case_id
from medsearch.encoders import EncoderInfo
from medsearch.errors import ConfigError, DicomWebError, InvalidStudyError
from medsearch.indexing.cases import _used_slices
from medsearch.indexing.report import IndexReport
from medsearch.io import SkippedFile, SkipReason
from medsearch.pacs import (
    DicomWeb,
    Fetched,
    RemoteSeries,
    RequestFailed,
    SeriesRecord,
    SlicePlan,
    SyncState,
    fetch_series,
    list_series,
    series_token,
)
from medsearch.sharing import LinkTable
from medsearch.store import LOCAL_DIR, IndexStore

__all__ = ["SPOOL", "SYNC_STATE", "DicomWebSource", "sync_dicomweb"]

log = logging.getLogger(__name__)

#: the sync state and the spool inside an index directory (site-only, never exported)
SYNC_STATE = f"{LOCAL_DIR}/dicomweb-sync.sqlite"
SPOOL = f"{LOCAL_DIR}/spool"
# Series fetched at once: enough to keep a loopback or LAN link busy, few enough to be gentle with a PACS.
_FETCH_THREADS = 4
# Batches start small, so that the first cases are committed soon, and grow fourfold up to these limits,
# which spread each batch's start and drain (worker processes) over many files and bound the spool on disk.
_FIRST_BATCH_SERIES = 8
_MAX_BATCH_SERIES = 256
_MAX_BATCH_FILES = 4096
# Series failing in a row (after their retries) before the run stops: a server that fails every request
# (a gateway in front of a stopped PACS) ends the run with one message instead of a skip per series.
_FAILURES_IN_A_ROW = 8
# Skips that may go away on another try: such a series is not recorded, so the next run fetches it again.
_RETRIED = frozenset({SkipReason.DECODE_ERROR, SkipReason.TOO_LARGE, SkipReason.UNREADABLE})


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb server to index, and which of its series (modality, study dates, inclusive)."""

    server: DicomWeb
    modality: str | None = None
    since: str | None = None
    until: str | None = None
    # Fetch only the instances whose pixels the engine reads (headers of the rest): fewer bytes on a
    # slow link, but slower against a server on the same network (Orthanc reads every instance to
    # answer a metadata request), and a selected slice that fails to decode leaves the engine with
    # header-only slices; so whole series by default (docs/pacs.md).
    slices_only: bool = False


@dataclass
class SyncStats:
    """What a sync did on the server's side; ``IndexReport.dicomweb`` holds its :meth:`to_dict`."""

    server: str
    series_listed: int = 0
    series_known: int = 0
    series_fetched: int = 0
    series_failed: int = 0
    instances_fetched: int = 0  # whole (pixels and all)
    instances_header_only: int = 0  # their headers only, from the series metadata
    bytes_fetched: int = 0  # instances and metadata
    list_seconds: float = 0.0
    fetch_seconds: float = 0.0  # summed over the fetching threads
    failed_statuses: dict[str, int] = field(default_factory=dict)
    failed_in_a_row: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Counts and seconds; not the server, as this goes into the index (``last_run``), which names no site system."""
        return {
            "series_listed": self.series_listed,
            "series_already_indexed": self.series_known,
            "series_fetched": self.series_fetched,
            "series_failed": self.series_failed,
            "failed_by_status": dict(sorted(self.failed_statuses.items())),
            "instances_fetched": self.instances_fetched,
            "instances_header_only": self.instances_header_only,
            "megabytes_fetched": round(self.bytes_fetched / 1e6, 2),
            "list_seconds": round(self.list_seconds, 3),
            "fetch_seconds": round(self.fetch_seconds, 3),
        }


def sync_dicomweb(
    source: DicomWebSource,
    *,
    store: IndexStore,
    key: SiteKey,
    report: IndexReport,
    run: Callable[[list[Path], Path], None],
    links: LinkTable | None = None,
) -> SyncStats:
    """Index the series of ``source`` that ``store`` lacks; ``run(files, root)`` runs the engine on a batch.

    ``links``, the run's link table, records the server's root for the cases (instead of spool files).
    ``run`` is :func:`~medsearch.indexing.index_files` with the run's settings (``build_index``
    makes it); it is called at least once, so that a new index is written even when empty.

    Raises
    ------
    DicomWebError
        The server cannot be reached (at the start or during the run), refuses the credentials, or
        fails the listing. Series already fetched are indexed first.
    """
    stats = SyncStats(source.server.public_url)
    report.dicomweb = stats.to_dict()
    spool = store.path / SPOOL
    shutil.rmtree(spool, ignore_errors=True)  # what a killed run left: fetched again if not committed
    spool.mkdir(mode=0o700, parents=True)
    if links is not None:  # its cases are linked to the server, not to spool files
        links.remote[spool.resolve()] = stats.server
    started = time.perf_counter()
    listed = list_series(source.server, modality=source.modality, since=source.since, until=source.until)
    stats.list_seconds = time.perf_counter() - started
    report.stage_seconds["discover"] += stats.list_seconds
    stats.series_listed = len(listed)
    ran = False
    with SyncState(store.path / SYNC_STATE) as state:
        todo = _new_series(listed, state, store, key, report, stats)
        plan = _slice_plan(store) if source.slices_only else None
        with ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="dicomweb-fetch") as threads:
            batches = _batches(todo)
            ahead = _submit(threads, source.server, batches[0], spool, plan) if batches else []
            try:
                for number, batch in enumerate(batches):
                    current = ahead
                    ahead = _submit(threads, source.server, batches[number + 1], spool, plan) if number + 1 < len(batches) else []
                    fetched, stop = _collect(batch, current, spool, report, stats)
                    _run_batch(run, fetched, spool, report)
                    ran = True
                    _record(state, fetched, store, key, report, spool)
                    report.dicomweb = stats.to_dict()
                    if stop is not None:
                        raise stop
            finally:
                for future in ahead:
                    future.cancel()
        if not ran:
            _run_batch(run, [], spool, report)
    report.dicomweb = stats.to_dict()
    shutil.rmtree(spool, ignore_errors=True)
    return stats


def _slice_plan(store: IndexStore) -> SlicePlan | None:
    """What the engine reads of a case, from the settings the index records (None: every file, or unknown).

    The preprocessing (which slices) is the index's own: a run with another one is refused. The
    middle slice is always fetched, whatever the thumbnail setting of the run.
    """
    try:
        config = config_for_index(store.manifest.config)
    except ConfigError:
        return None
    recorded = store.manifest.encoder
    info = EncoderInfo(name=str(recorded.get("name", "")), dim=int(recorded.get("dim", 0)),
                       weights_sha256=str(recorded.get("weights_sha256", "")), spatial_dims=int(recorded.get("spatial_dims", 2)))
    select = _used_slices(config, info)
    return None if select is None else SlicePlan(select, config.index.min_image_size)


def _new_series(
    listed: list[RemoteSeries], state: SyncState, store: IndexStore, key: SiteKey, report: IndexReport, stats: SyncStats
) -> list[tuple[str, RemoteSeries]]:
    """The series to fetch; the others are counted as already indexed (their instances as files)."""
    todo = []
    known: list[tuple[str, SeriesRecord]] = []
    for series in listed:
        token = series_token(key, series.study_uid, series.series_uid)
        record = state.get(token)
        if record is None or record.n_instances != series.n_instances or not all(c in store for c in record.case_ids):
            try:
                cid = case_id(key, series.study_uid, series.series_uid)
            except InvalidStudyError:
                cid = ""
            if not cid or cid not in store:
                todo.append((token, series))
                continue
            record = SeriesRecord(series.n_instances, (cid,))
            known.append((token, record))
        stats.series_known += 1
        report.n_files += series.n_instances
        report.n_files_already_indexed += series.n_instances
        report.n_cases_already_indexed += len(record.case_ids)
    if known:
        state.put(known)
    return todo


def _batches(todo: list[tuple[str, RemoteSeries]]) -> list[list[tuple[str, RemoteSeries]]]:
    batches: list[list[tuple[str, RemoteSeries]]] = []
    limit, current, files = _FIRST_BATCH_SERIES, [], 0
    for item in todo:
        current.append(item)
        files += max(1, item[1].n_instances)
        if len(current) >= limit or files >= _MAX_BATCH_FILES:
            batches.append(current)
            limit, current, files = min(4 * limit, _MAX_BATCH_SERIES), [], 0
    if current:
        batches.append(current)
    return batches


def _submit(
    threads: ThreadPoolExecutor, server: DicomWeb, batch: list[tuple[str, RemoteSeries]], spool: Path, plan: SlicePlan | None
) -> list[Future[Fetched]]:
    return [threads.submit(fetch_series, server, series, spool / token, plan=plan) for token, series in batch]


def _collect(
    batch: list[tuple[str, RemoteSeries]],
    futures: list[Future[Fetched]],
    spool: Path,
    report: IndexReport,
    stats: SyncStats,
) -> tuple[list[tuple[str, RemoteSeries, Fetched]], DicomWebError | None]:
    """The series of a batch that came; those that failed are skipped with ``fetch_error`` (a request
    that failed for good) or end the run (returned: the server is gone or refuses the credentials)."""
    fetched: list[tuple[str, RemoteSeries, Fetched]] = []
    stop: DicomWebError | None = None
    for (token, series), future in zip(batch, futures, strict=True):
        try:
            got = future.result()
        except RequestFailed as e:
            status = "no answer" if e.status is None else f"HTTP {e.status}"
            stats.failed_in_a_row += 1
            if stats.failed_in_a_row >= _FAILURES_IN_A_ROW and stop is None:
                stop = DicomWebError(
                    f"the DICOMweb server at {stats.server} failed {stats.failed_in_a_row} series in a row ({status}); "
                    "check that it (and any gateway before it) works, then run again: what was fetched is indexed"
                )
            stats.series_failed += 1
            stats.failed_statuses[status] = stats.failed_statuses.get(status, 0) + 1
            count = max(1, series.n_instances)
            report.n_files += count
            # one entry per instance the server listed, named as its file would have been
            report.skipped.extend(
                SkippedFile(spool / token / f"{n:06d}.dcm", SkipReason.FETCH_ERROR, f"fetching its series failed: {status}")
                for n in range(1, count + 1)
            )
            shutil.rmtree(spool / token, ignore_errors=True)
            continue
        except DicomWebError as e:
            stop = stop or e
            shutil.rmtree(spool / token, ignore_errors=True)
            continue
        stats.failed_in_a_row = 0
        stats.series_fetched += 1
        stats.instances_fetched += len(got.files) - got.headers_only
        stats.instances_header_only += got.headers_only
        stats.bytes_fetched += got.n_bytes
        stats.fetch_seconds += got.seconds
        fetched.append((token, series, got))
    return fetched, stop


def _run_batch(run: Callable[[list[Path], Path], None], fetched: list[tuple[str, RemoteSeries, Fetched]], spool: Path,
               report: IndexReport) -> None:
    """Run the engine on a batch's files; the report adds up over the batches (the engine sets some counts)."""
    files = [path for _, _, got in fetched for path in got.files]
    found, cached = report.n_cases_found, report.n_headers_cached
    report.n_files += len(files)
    run(files, spool)
    report.n_cases_found += found
    report.n_headers_cached += cached


def _record(
    state: SyncState,
    fetched: list[tuple[str, RemoteSeries, Fetched]],
    store: IndexStore,
    key: SiteKey,
    report: IndexReport,
    spool: Path,
) -> None:
    """Record the batch's series in the sync state (the engine has committed them), and delete their files."""
    retry = {s.path.parent.name for s in report.skipped if s.reason in _RETRIED and s.path.parent.parent == spool}
    records = []
    for token, series, _ in fetched:
        if token not in retry:
            cid = case_id(key, series.study_uid, series.series_uid)
            records.append((token, SeriesRecord(series.n_instances, (cid,) if cid in store else ())))
        shutil.rmtree(spool / token, ignore_errors=True)
    state.put(records)
