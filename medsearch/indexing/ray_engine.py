"""The Ray engine: the indexing run of :func:`~medsearch.indexing.index_files` on a Ray cluster.

``build_index(..., engine="ray")`` (``medsearch index ARCHIVE --engine ray``) runs
:func:`index_files_ray` instead of the local engine. It does the same stages with the same parts,
spread over the cluster's nodes:

1. **File states and headers**: the file-state cache is read on the driver; the headers of new or
   changed files are read in Ray tasks, in chunks (:func:`~medsearch.indexing.cases._scan_files`),
   then grouped into cases and planned on the driver exactly as the local engine does (cases
   already indexed, or that failed before, unchanged, are not decoded again).
2. **Decoding and preprocessing** run in Ray Data tasks (``map_batches`` over the cases to do), one
   case at a time, through :func:`~medsearch.indexing.prepare_case`: the same encoder input,
   thumbnail and de-identified row as the local engine. A Ray worker never decodes itself: it hands
   each case (and each chunk of headers) to a decoding process of its own, the local engine's worker
   (:class:`_Guard`), so a case that crashes its decoder, overruns ``case_timeout`` or needs more than
   ``worker_memory_gib`` is skipped with the local engine's reason, and the run goes on.
3. **Encoding** runs in a pool of Ray actors, each holding the encoder: one per GPU when the
   cluster has GPUs, else ONNX Runtime on the CPU; the slice vectors of a case are pooled as
   :func:`~medsearch.embedding.embed_volume` pools them.
4. **Shards**: the driver writes each group of ``shard_cases`` finished cases as a shard in
   ``INDEX/local/shards/`` (:mod:`medsearch.indexing.shards`). A run killed at any point finds its
   shards on the next run and sends only the other cases to the cluster.
5. **Commit**: the shards go into the index through the local engine's committer (manifest,
   checksums, file-state cache, skip report, link table), in chunks; then the shards are removed.

The archive must be readable at the same path on every node (a shared file system); the index
folder only on the driver. The site key reaches the workers inside the task's settings (Ray's
object store, in memory), never in a shard, a file or a log line; worker logs are not forwarded
to the driver. Ray is an extra (``pip install "medsearch[ray]"``), imported only here, when a run
asks for it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from medsearch.config import Config
from medsearch.deid import SiteKey
from medsearch.embedding import pool_slices
from medsearch.encoders import Encoder
from medsearch.errors import ConfigError, MedsearchError
from medsearch.indexing.cases import CaseJob, FailedCase, PreparedCase, _one_line, _Setup
from medsearch.indexing.engine import (
    Chunk,
    _Committer,
    _link,
    _open_cache,
    _plan,
    _Progress,
    _read_headers,
    _result,
    _slice_set,
)
from medsearch.indexing.filecache import FILE_STATE, _file_states, _FileState, _Tokens
from medsearch.indexing.options import IndexOptions
from medsearch.indexing.report import IndexReport
from medsearch.indexing.shards import ShardCase, ShardFolder, fingerprint, positions
from medsearch.indexing.workers import _TASKS, _Failure, _Task, _WorkerPool
from medsearch.io import CaseRef, HeaderSummary, SkippedFile, Volume, group_headers
from medsearch.sharing import LinkTable
from medsearch.store import IndexStore

__all__ = ["NO_RAY", "SHARD_CASES", "index_files_ray"]

log = logging.getLogger(__name__)

#: cases per shard: what a killed driver may have to encode again, at most
SHARD_CASES = 256
#: the one-line error where Ray is missing
NO_RAY = 'the Ray engine needs Ray, which is not installed here: pip install "medsearch[ray]"'
_PRIVATE = "\0"  # a row field starting with this is never stored (build._LABEL_ROWS)
# Memory a decoding task reserves on its node without IndexOptions.worker_memory_gib (which caps its decoding process).
_TASK_MEMORY = 2 * 2**30
# Seconds a Ray worker keeps its decoding process without work before it stops it.
_GUARD_IDLE_S = 60.0


def index_files_ray(
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
    shard_cases: int | None = None,
) -> None:
    """Index ``files`` into ``store`` on a Ray cluster; the arguments are those of
    :func:`~medsearch.indexing.index_files`, and the index at the end is the one it builds.

    ``options.ray_address`` names the cluster (``"auto"``: the one ``ray start`` began on this
    machine; ``HOST:PORT``; None: a Ray started here for this run, unless this process has already
    called ``ray.init``). ``options.workers`` is not used: the cluster's CPUs decide. ``shard_cases``:
    cases per shard (default :data:`SHARD_CASES`).

    Raises
    ------
    ConfigError
        Ray is not installed, or the config asks for crop vectors (``crop_grid``), which the Ray
        engine does not compute.
    MedsearchError
        The cluster cannot be reached.
    """
    options = options or IndexOptions()
    if config.index.crop_grid:
        # the shards carry slice vectors only; a run that dropped the tiles would leave an index
        # whose box queries silently fall back to whole slices
        raise ConfigError("crop vectors (index.crop_grid) are built by the local engine only; "
                          "index without --ray, or set crop_grid = 0")
    ray = _import_ray()
    setup = _Setup(config=config, encoder=encoder.info, describe=describe, options=options,
                   log_level=logging.getLogger().getEffectiveLevel())
    cache = _open_cache(store.path / FILE_STATE) if options.file_cache else None
    bar: _Progress | None = None
    try:
        with _cluster(ray, options.ray_address):
            report.workers = int(ray.cluster_resources().get("CPU", 1))
            started = time.perf_counter()
            setup_ref = ray.put(setup)  # the settings (and the key inside) go to the object store once
            report.stage_seconds["startup"] += time.perf_counter() - started
            run = uuid.uuid4().hex  # a Ray worker starts a fresh decoding process for each run
            states = _file_states(files)
            cached = cache.lookup(states) if cache is not None else {}
            report.n_headers_cached = len(cached)
            todo = [p for p in files if p not in cached]
            tokens = _Tokens(key)
            scanner = _RayTasks(ray, setup_ref, run, size=report.workers)
            scanned = _read_headers(todo, states, cache, tokens, report, lambda: cast(_WorkerPool, scanner), setup,
                                    options.progress)
            items = [c.item for c in cached.values()]
            items += [tokens.summary(i) if isinstance(i, HeaderSummary) else i for i in scanned]
            groups, header_skips = group_headers(items)
            report.skipped.extend(header_skips)
            report.n_cases_found = len(groups)
            decode_skips = cache.decode_skips(states) if cache is not None else {}
            jobs = _plan(groups, cached, tokens, store, key, decode_skips, report, links, options.retry_skipped, states, cache)
            folder = ShardFolder(store.path, fingerprint(encoder.info.to_dict(), config.to_dict()["preprocess"]))
            bar = _Progress(report, settled=report.n_files - sum(len(j.case.files) for j in jobs), enabled=options.progress)
            private = _run_cluster(ray, [j for j in jobs if j.case_id not in folder], setup, config, folder, run=run,
                                   shard_cases=shard_cases or SHARD_CASES, batch_images=options.batch_images, bar=bar)
        committer = _Committer(commit, cache, report, every=options.commit_every, seconds=options.commit_seconds)
        _commit_shards(jobs, folder, private, states, committer, report, links)
        committer.commit(force=must_commit)
        folder.clear()
        if cache is not None:
            cache.prune(root, states)
    finally:
        if bar is not None:
            bar.close()
        if cache is not None:
            cache.close()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is part of the extra
    except ImportError as e:
        raise ConfigError(NO_RAY) from e
    return ray


@contextlib.contextmanager
def _cluster(ray: Any, address: str | None) -> Iterator[None]:
    """Connect to the cluster at ``address`` (or start a local Ray) for the run; keep a caller's own."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notes are not the user's business
    if ray.is_initialized():
        yield
        return
    try:
        # log_to_driver=False: worker output (a decoder's warnings) stays on the nodes
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"at {address}" if address else "here"
        raise MedsearchError(
            f"cannot start or reach a Ray cluster {where} ({_one_line(e)}); start one with `ray start --head`, "
            "or give its address with --ray-address HOST:PORT"
        ) from e
    try:
        yield
    finally:
        ray.shutdown()


class _RayTasks:
    """The worker pool's interface (``submit``, ``get``, ``size``) over Ray tasks: header chunks
    for :func:`~medsearch.indexing.engine._read_headers`. A chunk that crashes or overruns its
    decoding process, or a task lost with its node, comes back as a
    :class:`~medsearch.indexing.workers._Failure`, as from a local worker that died."""

    def __init__(self, ray: Any, setup_ref: Any, run: str, *, size: int) -> None:
        self._ray = ray
        self._setup = setup_ref
        self._run = run
        self._scan = ray.remote(num_cpus=1, max_retries=1)(_scan_task)
        self._pending: dict[Any, _Task] = {}
        self.size = max(1, size)

    def submit(self, seq: int, kind: str, payload: Any) -> None:
        self._pending[self._scan.remote(payload, self._setup, self._run)] = _Task(seq, kind, payload)

    def get(self, timeout: float | None = None) -> tuple[_Task, Any] | None:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        if not ready:
            return None
        task = self._pending.pop(ready[0])
        try:
            return task, self._ray.get(ready[0])
        except self._ray.exceptions.RayError as e:  # its message may quote a path: the type only
            return task, _Failure(f"the Ray task was lost ({type(e).__name__})")


def _scan_task(paths: list[Path], setup: _Setup, run: str) -> tuple[list[HeaderSummary | SkippedFile], float] | _Failure:
    _become_ray_worker()
    return _guarded("scan", paths, setup, run)


_READY = False


def _become_ray_worker() -> None:
    """What a local worker process does when it starts (see ``workers._become_worker``), once per Ray worker."""
    global _READY
    if _READY:
        return
    import monai.data
    import torch

    from medsearch.io.quiet import silence_pydicom

    torch.set_num_threads(1)
    monai.data.set_track_meta(False)
    silence_pydicom()
    _READY = True


class _Guard:
    """The decoding process of one Ray worker: the local engine's worker pool, with one process.

    A Ray task never decodes in its Ray worker: it hands its case (or chunk of headers) to this
    process, which is stopped after ``case_timeout``, replaced when it crashes, and whose memory is
    capped at ``worker_memory_gib`` (:func:`~medsearch.indexing.workers._limit_memory`), exactly as
    the local engine's workers are. A case that hangs, crashes or needs more memory then costs that
    case alone, skipped with the local engine's reason, instead of the Ray worker, and with it a
    task that Ray would run again and again. The process is kept from task to task of one run (one
    starts in about 0.1 s, a one-file case decodes in about 0.05 s), replaced when a task of another
    run arrives, and stopped after :data:`_GUARD_IDLE_S` seconds without work.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: _WorkerPool | None = None
        self._run = ""
        self._used = time.monotonic()
        self._watcher: threading.Thread | None = None
        atexit.register(self._exit)

    def run(self, kind: str, payload: Any, setup: _Setup, run: str) -> Any:
        """The result of task ``kind`` (``"scan"`` or ``"case"``) on ``payload``, or a :class:`_Failure`."""
        with self._lock:  # (held throughout, so that the idle watcher never stops a busy process)
            if run != self._run:
                self._start(setup, run)
            self._used = time.monotonic()
            if self._pool is None:  # no process can start here: decode in this worker, unguarded
                return _TASKS[kind](payload, setup)
            self._pool.submit(0, kind, payload)
            _, result = self._pool.get()
            self._used = time.monotonic()
            return result

    def _start(self, setup: _Setup, run: str) -> None:
        self._close()
        self._run = run
        try:
            self._pool = _WorkerPool(1, setup, timeout=setup.options.case_timeout, depth=1)
        except Exception as e:  # noqa: BLE001 - WorkersUnavailable, or a decoder a fresh process cannot import
            log.warning("this Ray worker cannot start a decoding process (%s); it decodes without one", _one_line(e))
            self._pool = None
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="medsearch-guard", daemon=True)
            self._watcher.start()

    def _close(self) -> None:
        pool, self._pool, self._run = self._pool, None, ""
        if pool is not None:
            pool.close()

    def _exit(self) -> None:
        """Stop the process as the Ray worker exits (before multiprocessing does, which its pool would take for a crash)."""
        if self._lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._lock.release()

    def _watch(self) -> None:
        while True:
            time.sleep(_GUARD_IDLE_S / 4)
            with self._lock:
                if self._pool is not None and time.monotonic() - self._used > _GUARD_IDLE_S:
                    self._close()


_GUARD: _Guard | None = None


def _guarded(kind: str, payload: Any, setup: _Setup, run: str) -> Any:
    """Run a task in this Ray worker's decoding process (:class:`_Guard`)."""
    global _GUARD
    if _GUARD is None:
        _GUARD = _Guard()
    return _GUARD.run(kind, payload, setup, run)


# -- the cluster stages -----------------------------------------------------------------------------


def _run_cluster(
    ray: Any,
    jobs: list[CaseJob],
    setup: _Setup,
    config: Config,
    folder: ShardFolder,
    *,
    run: str,
    shard_cases: int,
    batch_images: int,
    bar: _Progress,
) -> dict[str, dict[str, Any]]:
    """Decode, preprocess and encode ``jobs`` on the cluster, writing shards as groups complete.

    Returns the private row fields (never stored, see ``build._LABEL_ROWS``) of the cases done in
    this run, by case id, for the report.
    """
    private: dict[str, dict[str, Any]] = {}
    log.info("%d case(s) to encode on the cluster, %d already in shards of an earlier run", len(jobs), len(folder.where))
    if not jobs:
        return private
    size = max(1, shard_cases)
    groups = [jobs[start:start + size] for start in range(0, len(jobs), size)]
    group_of = {job.seq: g for g, group in enumerate(groups) for job in group}
    by_seq = {job.seq: job for job in jobs}
    done: dict[int, dict[int, ShardCase]] = {}

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards complete in job order
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    # Ray Data stops a run that makes no progress for half an hour: a decoding process stuck until
    # case_timeout is progress to come, and without a timeout the run waits, as the local engine does
    timeout = setup.options.case_timeout
    if timeout is None:
        context.execution_no_progress_timeout_s = -1
    elif context.execution_no_progress_timeout_s > 0:
        context.execution_no_progress_timeout_s = max(context.execution_no_progress_timeout_s, 2 * timeout)
    actors, gpus = _encoder_actors(ray.cluster_resources())
    per_case = max(1, config.preprocess.slices if setup.encoder.spatial_dims == 2 else 1)
    budget = setup.options.worker_memory_gib
    memory = _TASK_MEMORY if budget is None else int(budget * 2**30)
    dataset = (
        ray.data.from_items([{"seq": job.seq, "job": pickle.dumps(job)} for job in jobs])
        # its own remote arguments keep this stage in tasks, apart from the encoder actors (Ray Data
        # would otherwise fuse the two and decode inside the actors, one case at a time)
        .map_batches(_prepare_batch, batch_size=1, fn_kwargs={"setup": setup, "run": run}, num_cpus=1, memory=memory)
        .map_batches(
            _EncodeCases,
            batch_size=max(1, batch_images // per_case),
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
        )
    )
    for row in _rows(ray, dataset):
        seq = int(row["seq"])
        case: ShardCase = pickle.loads(row["case"])
        hidden = {k: v for k, v in case.row.items() if k.startswith(_PRIVATE)}
        if hidden:
            private[case.case_id] = hidden
            case.row = {k: v for k, v in case.row.items() if not k.startswith(_PRIVATE)}
        g = group_of[seq]
        done.setdefault(g, {})[seq] = case
        bar.update(len(by_seq[seq].case.files))
        if len(done[g]) == len(groups[g]):
            finished = done.pop(g)
            folder.add([finished[job.seq] for job in groups[g]])
    return private


def _rows(ray: Any, dataset: Any) -> Iterator[dict[str, Any]]:
    """The dataset's rows; a task that fails for good (decoding processes that die as they start, an
    encoder that fails) stops the run with a one-line error. (A task lost with its Ray worker or its
    node is run again by Ray Data; a decoder's own crash never reaches Ray, see :class:`_Guard`.)

    Raises
    ------
    MedsearchError
        A task failed for good; the shards written so far stay, for the next run.
    """
    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayError as e:
        raise MedsearchError(
            f"the Ray run stopped ({_why(e)}); the cases finished so far are kept in shards: run the same command "
            "again once the cluster is sound (see the logs of its nodes)"
        ) from e


def _why(error: BaseException) -> str:
    """A medsearch error behind a Ray error, or the types of the errors (their messages may quote a path)."""
    seen: list[str] = []
    found: BaseException | None = error
    for _ in range(16):
        if found is None:
            break
        cause = getattr(found, "cause", None)  # what a RayTaskError wraps (its own text is a traceback)
        if isinstance(cause, BaseException):
            found = cause
            continue
        if isinstance(found, MedsearchError):
            return str(found)
        seen.append(type(found).__name__)
        found = found.__cause__
    return ": ".join(dict.fromkeys(seen))


def _encoder_actors(resources: dict[str, float]) -> tuple[int, float]:
    """How many encoder actors, and the GPUs each takes: one per GPU, else one per 8 CPUs (at least one)."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, 1.0
    return max(1, int(resources.get("CPU", 1)) // 8), 0.0


def _prepare_batch(batch: dict[str, np.ndarray], setup: _Setup, run: str) -> dict[str, Any]:
    """A Ray Data task: decode and preprocess each case (:func:`prepare_case`), in this worker's
    decoding process (:class:`_Guard`); a case that hangs or crashes it fails as in the local engine."""
    _become_ray_worker()
    out = []
    for blob in batch["job"]:
        job: CaseJob = pickle.loads(blob)
        out.append(pickle.dumps(_prepared_case(job, _result(job, _guarded("case", job, setup, run)))))
    return {"seq": batch["seq"], "case": np.array(out, dtype=object)}


def _prepared_case(job: CaseJob, result: PreparedCase | FailedCase) -> tuple[ShardCase, PreparedCase | None]:
    """A case's result as a shard entry still to encode (its skipped files by position), and the
    prepared case the encoder actor needs (its images), if any."""
    files = job.case.files
    if isinstance(result, FailedCase):
        case = ShardCase(job.case_id, None, skipped=positions(files, result.skipped), transient=result.transient,
                         seconds={"decode": result.decode_s})
        return case, None
    case = ShardCase(
        job.case_id, None, thumbnail=result.thumbnail, row=result.row, skipped=positions(files, result.skipped),
        n_files=result.n_files, n_images=int(result.images.shape[0]),
        seconds={"decode": result.decode_s, "preprocess": result.preprocess_s},
    )
    result.thumbnail, result.row, result.skipped = None, {}, []  # (they travel once, in the shard entry)
    return case, result


class _EncodeCases:
    """A Ray actor: the encoder, loaded once; encodes batches of prepared cases, several per call."""

    def __init__(self, config: Config) -> None:
        from medsearch.encoders import load_encoder

        _become_ray_worker()
        self._encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
        self._pool = config.preprocess.pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        cases = [pickle.loads(blob) for blob in batch["case"]]
        todo = [(case, prepared) for case, prepared in cases if prepared is not None]
        if todo:
            started = time.perf_counter()
            vectors = self._encoder.embed(np.concatenate([prepared.images for _, prepared in todo]))
            share = (time.perf_counter() - started) / len(todo)
            offset = 0
            for case, prepared in todo:
                mine = vectors[offset:offset + len(prepared.images)]
                case.vector = pool_slices(mine, self._pool)
                case.slices = _slice_set(prepared, mine)
                case.seconds["encode"] = share
                offset += len(prepared.images)
        return {"seq": batch["seq"], "case": np.array([pickle.dumps(case) for case, _ in cases], dtype=object)}


# -- the commit ----------------------------------------------------------------------------------


def _commit_shards(
    jobs: list[CaseJob],
    folder: ShardFolder,
    private: dict[str, dict[str, Any]],
    states: dict[Path, _FileState],
    committer: _Committer,
    report: IndexReport,
    links: LinkTable | None,
) -> None:
    """Hand each planned case from the shards to the committer, in job order, as the local engine does."""
    by_id = {job.case_id: job for job in jobs}
    lost = set(by_id) - set(folder.where)
    if lost:  # cannot happen unless a shard vanished during the run
        raise MedsearchError(f"{len(lost)} case(s) have no shard in {folder.folder}; run the same command again")

    def record(job: CaseJob, skipped: Sequence[SkippedFile]) -> None:
        files = [states[p] for p in job.case.files]
        committer.chunk.decoded.append((job.case_id, files, [(states[s.path], s) for s in skipped if s.path in states]))

    for case in folder.load(by_id):
        job = by_id[case.case_id]
        skipped = case.skipped_files(job.case.files)
        for stage in ("decode", "preprocess", "encode"):
            report.stage_seconds[stage] += case.seconds.get(stage, 0.0)
        report.skipped.extend(skipped)
        if case.failed:
            report.n_cases_failed += 1
            if not case.transient:
                record(job, skipped)
            committer.maybe_commit()
            continue
        committer.chunk.vectors.append(cast(np.ndarray, case.vector))
        committer.chunk.slices.append(case.slices)
        committer.chunk.rows.append({**case.row, **private.get(case.case_id, {})})
        if case.thumbnail is not None:
            committer.chunk.thumbnails.append(case.thumbnail)
        record(job, skipped)
        if links is not None:
            _link(links, job.case_id, job.case)
        report.n_cases_added += 1
        report.n_files_added += case.n_files
        report.n_images_encoded += case.n_images
        committer.maybe_commit()
