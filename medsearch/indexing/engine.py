"""The indexing run: plan, decode, encode and commit; :func:`index_files` drives it.

:func:`index_files` is the engine behind :func:`medsearch.indexing.build_index`. A run goes through
these stages, and :class:`~medsearch.indexing.IndexReport` says how long each took:

1. **File states.** Each file's size and modification time are looked up in the local file-state
   cache (:class:`~medsearch.indexing.FileStateCache`, ``INDEX/local/file-state.sqlite``); a file
   unchanged since an earlier run is not read again.
2. **Headers** of new or changed files are read in worker processes, in chunks
   (:func:`~medsearch.io.summarize_file`), and grouped into cases in this process
   (:func:`~medsearch.io.group_headers`). A case already in the index is never decoded.
3. **Decoding, preprocessing, thumbnails and metadata** run in worker processes, one case per task
   (:func:`~medsearch.indexing.prepare_case`), with a bounded number of cases in flight. A case that
   takes longer than ``case_timeout`` or crashes its worker is skipped (its files get DECODE_ERROR)
   and the worker is replaced.
4. **Encoding** runs here, many slices per encoder call; the slice vectors of each case are pooled
   exactly as :func:`medsearch.embedding.embed_volume` pools them.
5. **Commits** write the index atomically (:meth:`IndexStore.commit`) every ``commit_every`` cases or
   ``commit_seconds`` seconds, but never so often that rewriting a large index takes more than about
   a tenth of the run. The time-based commit fires whatever the workers are doing: while the case
   next in line is still decoding (a worker stuck on a huge file until ``case_timeout``), the cases
   that are ready are encoded and committed once ``commit_seconds`` have passed, out of their order.

Memory stays bounded: at most a few cases per worker are decoded at a time, each worker's memory is
capped (``IndexOptions.worker_memory_gib``), and only compact header summaries (path, UIDs, frame
count) are kept for the whole archive, never headers or pixels.

Worker processes are started with the ``forkserver`` method (``spawn`` where it is missing), never by
forking a process that already runs the encoder's threads. With ``workers=0`` everything runs in this
process, through the same functions, with the same results.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medsearch.config import Config
from medsearch.deid import SiteKey, case_id
from medsearch.embedding import SliceSet, pool_slices
from medsearch.encoders import Encoder
from medsearch.indexing.cases import CaseJob, FailedCase, PreparedCase, _cover, _scan_files, _Setup, prepare_case
from medsearch.indexing.filecache import FILE_STATE, FileStateCache, _Cached, _file_states, _FileState, _Tokens
from medsearch.indexing.options import IndexOptions
from medsearch.indexing.report import IndexReport, default_workers
from medsearch.indexing.workers import WorkersUnavailable, _Failure, _WorkerPool
from medsearch.io import CaseFiles, CaseRef, HeaderSummary, SkippedFile, SkipReason, Volume, group_headers, summarize_file
from medsearch.io.quiet import pydicom_silenced
from medsearch.sharing import LinkTable
from medsearch.store import IndexStore

__all__ = ["Chunk", "index_files"]

log = logging.getLogger(__name__)

# A commit that takes longer than this is throttled: the next one waits at least
# _COMMIT_OVERHEAD times as long, so that rewriting the index stays under ~1/10 of a run.
_FREE_COMMIT_S = 0.5
_COMMIT_OVERHEAD = 10.0
# Header reading: files per worker task, and how often scanned headers go to the cache.
_SCAN_CHUNK = 64
_CACHE_EVERY_S = 5.0
# How long the case stage waits for a worker before it looks at the clock (a due commit).
_TICK_S = 0.5


@dataclass
class Chunk:
    """Work done since the last commit: cases to add, and the case files to record in the cache."""

    vectors: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    thumbnails: list[np.ndarray] = field(default_factory=list)
    # each case's slice vectors (None: a case whose encoder input holds no axial slices)
    slices: list[SliceSet | None] = field(default_factory=list)
    # each case's crop vectors (``crop_grid``; None: without)
    crops: list[SliceSet | None] = field(default_factory=list)
    decoded: list[tuple[str, Sequence[_FileState], Sequence[tuple[_FileState, SkippedFile]]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vectors)


class _Committer:
    """Decides when to commit, and commits: the file-state cache first, then the index."""

    def __init__(
        self,
        commit: Callable[[Chunk, bool], bool],
        cache: FileStateCache | None,
        report: IndexReport,
        *,
        every: int,
        seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._commit = commit
        self._cache = cache
        self._report = report
        self._every = max(1, every)
        self._seconds = seconds
        self._clock = clock
        self.chunk = Chunk()
        self._last_end = clock()
        self._last_cost = 0.0

    def maybe_commit(self) -> None:
        if not len(self.chunk) and not self.chunk.decoded:
            return
        since = self._clock() - self._last_end
        if self._last_cost > _FREE_COMMIT_S and since < _COMMIT_OVERHEAD * self._last_cost:
            return
        if len(self.chunk) >= self._every or since >= self._seconds:
            self.commit(force=False)

    def due(self) -> bool:
        """Whether a time-based commit is due: ``seconds`` since the last one, and the throttle allows it."""
        since = self._clock() - self._last_end
        if self._last_cost > _FREE_COMMIT_S and since < _COMMIT_OVERHEAD * self._last_cost:
            return False
        return since >= self._seconds

    def commit(self, *, force: bool) -> None:
        started = self._clock()
        chunk, self.chunk = self.chunk, Chunk()
        # The cache first: a case it names as decoded but the index lacks is simply decoded again.
        if self._cache is not None and chunk.decoded:
            self._cache.put_cases(chunk.decoded)
        if self._commit(chunk, force):
            self._report.n_commits += 1
        self._last_end = self._clock()
        self._last_cost = self._last_end - started
        self._report.stage_seconds["store"] += self._last_cost


class _Progress:
    """The live bar on stderr: files/s (tqdm's rate and ETA), cases/s and files skipped.

    ``settled`` files (skipped at the header, or in cases already indexed) start the bar without
    counting towards the rate, so that the ETA is that of the files still to decode.
    """

    def __init__(self, report: IndexReport, *, settled: int, enabled: bool) -> None:
        self._report = report
        self._started = time.monotonic()
        self._bar = tqdm(total=report.n_files, initial=settled, desc="indexing", unit="file",
                         disable=not enabled, dynamic_ncols=True)
        self.update(0)

    def update(self, n: int) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix_str(
            f"{self._report.n_cases_added / elapsed:.1f} cases/s, {len(self._report.skipped)} skipped", refresh=False
        )
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def index_files(
    files: Sequence[Path],
    *,
    root: Path,
    store: IndexStore,
    encoder: Encoder,
    config: Config,
    key: SiteKey,
    describe: Callable[[str, CaseRef, Volume], dict[str, Any]] | None,
    commit: Callable[[Chunk, bool], bool],
    report: IndexReport,
    links: LinkTable | None = None,
    must_commit: bool = False,
    options: IndexOptions | None = None,
) -> None:
    """Index ``files`` into ``store``: the engine of :func:`medsearch.indexing.build_index`.

    Parameters
    ----------
    files
        The files found under ``root`` (:func:`~medsearch.io.find_files`), in order.
    root
        The archive folder (or file) they were found under; the file-state cache forgets files
        under it that are gone.
    store, encoder, config
        The open index, its encoder and its settings.
    key
        The site key: case ids, and the tokens the file-state cache keeps instead of UIDs.
    describe
        ``(case id, case, volume) -> row`` of the case table; it runs in the worker processes, so it
        must be picklable (a module-level function or a ``functools.partial`` of one). With the
        default loader, a 2D encoder and axial slices, only the slices listed in ``volume.decoded``
        hold pixels (the volume has its full shape and spacing).
    commit
        ``(chunk, force) -> committed``: add a chunk to the store and commit it; with an empty chunk,
        commit only when ``force`` (else just write the reports).
    report
        Filled in as the run goes (the caller set ``n_files`` and the key).
    links
        The link table to add each case to (saved by ``commit``).
    must_commit
        Commit at the end even when nothing was added (a new index, new label columns).
    options
        How the run goes: workers, timeouts, batches, commits, the file-state cache, the progress
        bar and the decoder (default: ``IndexOptions()``); the worker processes receive it too.

    Raises
    ------
    MedsearchError
        Worker processes cannot start.
    """
    options = options or IndexOptions()
    n_workers = default_workers() if options.workers is None else max(0, int(options.workers))
    report.workers = n_workers
    setup = _Setup(config=config, encoder=encoder.info, describe=describe, options=options,
                   log_level=logging.getLogger().getEffectiveLevel())
    cache = _open_cache(store.path / FILE_STATE) if options.file_cache else None
    pool: _WorkerPool | None = None
    bar: _Progress | None = None
    failed = False
    try:
        states = _file_states(files)
        cached = cache.lookup(states) if cache is not None else {}
        report.n_headers_cached = len(cached)
        todo = [p for p in files if p not in cached]
        tokens = _Tokens(key)

        unavailable = False

        def get_pool() -> _WorkerPool | None:
            """The worker pool, started on first use; None where workers cannot be used (this process does the work)."""
            nonlocal pool, unavailable
            if pool is None and not unavailable:
                started = time.perf_counter()
                try:
                    pool = _WorkerPool(n_workers, setup, timeout=options.case_timeout)
                except WorkersUnavailable as e:
                    unavailable = True
                    log.warning("worker processes cannot be used here (%s); indexing in this process instead", e)
                report.stage_seconds["startup"] += time.perf_counter() - started
                report.workers = pool.size if pool is not None else 0
            return pool

        scanned = _read_headers(todo, states, cache, tokens, report, get_pool if n_workers else None, setup, options.progress)
        # Group with UIDs as tokens, so that cached and freshly read files group alike.
        items = [c.item for c in cached.values()]
        items += [tokens.summary(i) if isinstance(i, HeaderSummary) else i for i in scanned]
        groups, header_skips = group_headers(items)
        report.skipped.extend(header_skips)
        report.n_cases_found = len(groups)
        decode_skips = cache.decode_skips(states) if cache is not None else {}
        jobs = _plan(groups, cached, tokens, store, key, decode_skips, report, links, options.retry_skipped, states, cache)
        bar = _Progress(report, settled=report.n_files - sum(len(j.case.files) for j in jobs), enabled=options.progress)
        committer = _Committer(commit, cache, report, every=options.commit_every, seconds=options.commit_seconds)
        results = _prepared(jobs, setup, get_pool() if n_workers and jobs else None, report,
                            batch_images=options.batch_images, patience=options.commit_seconds)
        _encode_all(results, jobs, states, encoder, config, committer, report, bar, links, options.batch_images)
        committer.commit(force=must_commit)
        if cache is not None:
            cache.prune(root, states)
    except BaseException:
        failed = True
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close(kill=failed)
        if cache is not None:
            cache.close()


def _open_cache(path: Path) -> FileStateCache | None:
    try:
        return FileStateCache(path)
    except (sqlite3.Error, OSError) as e:
        log.warning("cannot use the file-state cache %s (%s); every header will be read", path, e)
        return None


def _read_headers(
    paths: list[Path],
    states: Mapping[Path, _FileState],
    cache: FileStateCache | None,
    tokens: _Tokens,
    report: IndexReport,
    get_pool: Callable[[], _WorkerPool | None] | None,
    setup: _Setup,
    progress: bool,
) -> list[HeaderSummary | SkippedFile]:
    """Header summaries of ``paths`` (with their UIDs): in chunks on the workers (or here).

    They go to the cache as they come, with the UIDs as tokens, so that a run killed while reading
    the headers of a large archive does not read them again.
    """
    out: list[HeaderSummary | SkippedFile] = []
    unsaved: list[tuple[_FileState, HeaderSummary | SkippedFile]] = []
    last_save = time.monotonic()
    bar = tqdm(total=len(paths), desc="reading headers", unit="file", disable=not progress or not paths, leave=False)

    def take(items: list[HeaderSummary | SkippedFile], seconds: float) -> None:
        nonlocal last_save
        report.stage_seconds["scan"] += seconds
        out.extend(items)
        unsaved.extend(
            (states[i.path], tokens.summary(i) if isinstance(i, HeaderSummary) else i)
            for i in items
            if states[i.path].size >= 0
        )
        bar.update(len(items))
        if cache is not None and (time.monotonic() - last_save > _CACHE_EVERY_S):
            cache.put_headers(unsaved)
            unsaved.clear()
            last_save = time.monotonic()

    try:
        pool = get_pool() if get_pool is not None and paths else None
        if pool is None:
            for start in range(0, len(paths), _SCAN_CHUNK):
                take(*_scan_files(paths[start : start + _SCAN_CHUNK], setup))
        else:
            size = max(1, min(_SCAN_CHUNK, len(paths) // (4 * pool.size)))
            outstanding = 0
            for seq, start in enumerate(range(0, len(paths), size)):
                pool.submit(seq, "scan", paths[start : start + size])
                outstanding += 1
            next_seq = outstanding
            while outstanding:
                waited = time.perf_counter()
                task, result = pool.get()
                report.stage_seconds["wait"] += time.perf_counter() - waited
                outstanding -= 1
                if not isinstance(result, _Failure):
                    take(*result)
                elif len(task.payload) > 1:  # find the file that hung or crashed its worker: one at a time
                    for path in task.payload:
                        pool.submit(next_seq, "scan", [path])
                        next_seq += 1
                        outstanding += 1
                else:
                    (path,) = task.payload
                    take([SkippedFile(path, SkipReason.UNREADABLE, f"reading the header failed: {result.detail}")], 0.0)
    finally:
        if cache is not None and unsaved:
            cache.put_headers(unsaved)
        bar.close()
    return out


def _plan(
    groups: list[CaseFiles],
    cached: Mapping[Path, _Cached],
    tokens: _Tokens,
    store: IndexStore,
    key: SiteKey,
    decode_skips: Mapping[Path, tuple[str, SkippedFile]],
    report: IndexReport,
    links: LinkTable | None,
    retry_skipped: bool,
    states: Mapping[Path, _FileState],
    cache: FileStateCache | None,
) -> list[CaseJob]:
    """The cases to decode; cases already indexed (or that failed before, unchanged) are counted.

    ``groups`` hold UID tokens. A case whose files are all cached under one case id keeps it; for
    any other case (a new or changed file, or one that must be decoded or linked) the UIDs are
    needed, and come from a header read in this run (one header is read again if none was).
    """
    jobs: list[CaseJob] = []
    moved: list[tuple[_FileState, str, str]] = []
    for group in groups:
        cid = _cached_case_id(group, cached)
        real: CaseFiles | SkippedFile | None = None
        if not cid:
            real = _real_case(group, tokens)
            if isinstance(real, SkippedFile):
                report.skipped.extend(SkippedFile(p, real.reason, real.detail) for p in group.files)
                continue
            cid = case_id(key, real.study_uid, real.series_uid, group.part)
            moved.extend((states[p], cid, group.part) for p in group.files)
        earlier = [decode_skips[p][1] for p in group.files if p in decode_skips and decode_skips[p][0] == cid]
        if cid in store:
            report.n_cases_already_indexed += 1
            report.n_files_already_indexed += len(group.files) - len(earlier)
            report.skipped.extend(earlier)
            if links is not None and cid not in links.rows:
                real = real or _real_case(group, tokens)
                if isinstance(real, CaseFiles):
                    _link(links, cid, real)
            continue
        if earlier and len(earlier) == len(group.files) and not retry_skipped:
            report.n_cases_failed += 1
            report.skipped.extend(earlier)
            continue
        real = real or _real_case(group, tokens)
        if isinstance(real, SkippedFile):
            report.skipped.extend(SkippedFile(p, real.reason, real.detail) for p in group.files)
            continue
        jobs.append(CaseJob(len(jobs), cid, real))
    if cache is not None and moved:
        cache.put_case_ids(moved)
    return jobs


def _cached_case_id(group: CaseFiles, cached: Mapping[Path, _Cached]) -> str:
    """The case id all files of ``group`` were cached with, as this same part; "" if any differs."""
    ids = set()
    for path in group.files:
        entry = cached.get(path)
        if entry is None or not entry.case_id or entry.part != group.part:
            return ""
        ids.add(entry.case_id)
    return ids.pop() if len(ids) == 1 else ""


def _real_case(group: CaseFiles, tokens: _Tokens) -> CaseFiles | SkippedFile:
    """``group`` with its real UIDs: from this run's headers, else by reading one header again."""

    def real(value: str) -> str | None:
        return value if not value or value.startswith("nouid-") else tokens.real.get(value)

    study, series = real(group.study_uid), real(group.series_uid)
    if study is None or series is None:
        found: HeaderSummary | SkippedFile | None = None
        for path in group.files:
            found = summarize_file(path)
            if isinstance(found, HeaderSummary):
                tokens.summary(found)  # learns the UIDs behind the tokens
                break
        study, series = real(group.study_uid), real(group.series_uid)
        if study is None or series is None:
            if isinstance(found, SkippedFile):
                return found
            return SkippedFile(group.files[0], SkipReason.UNREADABLE, "the file changed while it was being indexed; run again")
    # (SOP Instance UIDs of files not read in this run stay tokens: nothing downstream uses them)
    instances = tuple(tokens.real.get(u, u) for u in group.instance_uids)
    return CaseFiles(study, series, group.files, instances, group.part, group.geometry)


def _link(table: LinkTable, cid: str, case: CaseFiles) -> None:
    table.add(cid, study_uid=case.study_uid, series_uid=case.series_uid, part=case.part, files=case.files)


def _prepared(
    jobs: list[CaseJob], setup: _Setup, pool: _WorkerPool | None, report: IndexReport, *, batch_images: int, patience: float
) -> Iterator[tuple[int, PreparedCase | FailedCase] | None]:
    """Each job's index and result, in job order, with at most ``ahead`` cases decoded ahead of the encoder.

    ``ahead`` covers one encoder batch of one-image cases plus two cases per worker, so that the
    workers keep going while this process encodes. With crop vectors a one-image case brings its
    tiles too (``1 + crop_grid ** 2`` images), so fewer cases make a batch: the cases in flight, and
    the memory their encoder input holds, shrink by that factor. While no result comes, a ``None`` is yielded
    every :data:`_TICK_S` seconds, so that the caller can commit on time. When the case next in line
    has been waited for longer than ``patience`` seconds (a worker stuck on one file), the results
    that are in are handed over out of order, and more cases are sent to the other workers.
    """
    if pool is None:
        for seq, job in enumerate(jobs):
            with pydicom_silenced():
                result = prepare_case(job, setup)
            yield seq, result
        return
    images_per_image = 1 + (setup.config.index.crop_grid ** 2 if setup is not None else 0)
    ahead = max(1, batch_images // images_per_image) + 2 * pool.size
    waiting: dict[int, Any] = {}
    early: set[int] = set()  # handed over before the case ahead of them
    sent = handed = head = 0
    head_since = time.monotonic()
    while head < len(jobs):
        while sent < len(jobs) and sent - handed < ahead:
            pool.submit(sent, "case", jobs[sent])
            sent += 1
        started = time.perf_counter()
        got = pool.get(timeout=_TICK_S)
        report.stage_seconds["wait"] += time.perf_counter() - started
        if got is not None:
            task, result = got
            waiting[task.seq] = _result(jobs[task.seq], result)
        while head in waiting or head in early:
            if head in waiting:
                yield head, waiting.pop(head)
                handed += 1
            early.discard(head)
            head += 1
            head_since = time.monotonic()
        if waiting and time.monotonic() - head_since > patience:  # the case next in line is stuck
            for seq in sorted(waiting):
                yield seq, waiting.pop(seq)
                early.add(seq)
                handed += 1
        if got is None:
            yield None


def _result(job: CaseJob, result: Any) -> PreparedCase | FailedCase:
    """A worker's result for ``job``: a case that timed out or crashed its worker fails (transiently)."""
    if isinstance(result, _Failure):
        return FailedCase(job.case_id, _cover(job.case.files, [], result.detail), transient=True)
    return result


def _slice_set(prepared: PreparedCase, vectors: np.ndarray) -> SliceSet | None:
    """A case's slice vectors as the index keeps them, or None where its input holds no axial slices."""
    if prepared.slice_indices is None or len(prepared.slice_indices) != len(vectors):
        return None
    return SliceSet(np.asarray(vectors, np.float16), np.asarray(prepared.slice_indices, np.int32), prepared.gap_mm)


def _inputs(prepared: PreparedCase) -> list[np.ndarray]:
    """What the encoder embeds of a case: its images, and its tiles when it has them."""
    return [prepared.images] if prepared.crops is None else [prepared.images, prepared.crops[0]]


def _crop_set(prepared: PreparedCase, vectors: np.ndarray) -> SliceSet | None:
    """A case's crop vectors as the index keeps them (the encoder's output for ``prepared.crops``)."""
    if prepared.crops is None or not len(vectors):
        return None
    _, indices, boxes = prepared.crops
    return SliceSet(np.asarray(vectors, np.float16), indices, prepared.gap_mm, boxes)


def _encode_all(
    results: Iterable[tuple[int, PreparedCase | FailedCase] | None],
    jobs: list[CaseJob],
    states: Mapping[Path, _FileState],
    encoder: Encoder,
    config: Config,
    committer: _Committer,
    report: IndexReport,
    bar: _Progress,
    links: LinkTable | None,
    batch_images: int,
) -> None:
    """Encode prepared cases in batches of about ``batch_images`` images; hand each case to the committer.

    ``results`` gives ``(job index, result)``, or None while the workers are busy: then, if a commit
    is due, the cases waiting for a full batch are encoded and committed now.
    """
    waiting: list[tuple[CaseJob, PreparedCase]] = []
    n_images = 0

    def record(job: CaseJob, skipped: Sequence[SkippedFile]) -> None:
        files = [states[p] for p in job.case.files]
        committer.chunk.decoded.append((job.case_id, files, [(states[s.path], s) for s in skipped if s.path in states]))

    def encode() -> None:
        nonlocal n_images
        if not waiting:
            return
        started = time.perf_counter()
        # each case's images, then its tiles (crop_grid), all in one encoder call
        batch = np.concatenate([part for _, prepared in waiting for part in _inputs(prepared)])
        vectors = encoder.embed(batch)
        report.stage_seconds["encode"] += time.perf_counter() - started
        offset = 0
        for job, prepared in waiting:
            n = prepared.images.shape[0]
            tiles = 0 if prepared.crops is None else len(prepared.crops[0])
            committer.chunk.vectors.append(pool_slices(vectors[offset : offset + n], config.preprocess.pool))
            committer.chunk.slices.append(_slice_set(prepared, vectors[offset : offset + n]))
            committer.chunk.crops.append(_crop_set(prepared, vectors[offset + n : offset + n + tiles]))
            offset += n + tiles
            committer.chunk.rows.append(prepared.row)
            if prepared.thumbnail is not None:
                committer.chunk.thumbnails.append(prepared.thumbnail)
            record(job, prepared.skipped)
            if links is not None:
                _link(links, job.case_id, job.case)
            report.n_cases_added += 1
            report.n_files_added += prepared.n_files
            report.n_images_encoded += n + tiles
            bar.update(len(job.case.files))
            committer.maybe_commit()
        waiting.clear()
        n_images = 0

    for item in results:
        if item is None:  # no case came for a while: commit the ones waiting, if a commit is due
            if committer.due():
                encode()
                committer.maybe_commit()
            continue
        job, result = jobs[item[0]], item[1]
        report.stage_seconds["decode"] += result.decode_s
        if isinstance(result, FailedCase):
            report.n_cases_failed += 1
            report.skipped.extend(result.skipped)
            if not result.transient:
                record(job, result.skipped)
            bar.update(len(job.case.files))
            committer.maybe_commit()
            continue
        report.stage_seconds["preprocess"] += result.preprocess_s
        report.skipped.extend(result.skipped)
        waiting.append((job, result))
        n_images += sum(len(part) for part in _inputs(result))
        if n_images >= batch_images:
            encode()
    encode()
