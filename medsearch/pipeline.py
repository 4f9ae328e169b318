"""Archive-scale indexing: headers, pixels and preprocessing in worker processes, the encoder in batches.

:func:`index_files` is the engine behind :func:`medsearch.search.build_index`. A run goes through
these stages, and :class:`IndexReport` says how long each took:

1. **File states.** Each file's size and modification time are looked up in the local file-state
   cache (:class:`FileStateCache`, ``INDEX/local-file-state.sqlite``); a file unchanged since an
   earlier run is not read again.
2. **Headers** of new or changed files are read in worker processes, in chunks
   (:func:`~medsearch.io.summarize_file`), and grouped into cases in this process
   (:func:`~medsearch.io.group_headers`). A case already in the index is never decoded.
3. **Decoding, preprocessing, thumbnails and metadata** run in worker processes, one case per task,
   with a bounded number of cases in flight. A case that takes longer than ``case_timeout`` or
   crashes its worker is skipped (its files get DECODE_ERROR) and the worker is replaced.
4. **Encoding** runs here, many slices per encoder call; the slice vectors of each case are pooled
   exactly as :func:`medsearch.search.embed_volume` pools them.
5. **Commits** write the index atomically (:meth:`IndexStore.commit`) every ``commit_every`` cases or
   ``commit_seconds`` seconds, but never so often that rewriting a large index takes more than about
   a tenth of the run.

Memory stays bounded: at most a few cases per worker are decoded at a time, and only compact header
summaries (path, UIDs, frame count) are kept for the whole archive, never headers or pixels.

Worker processes are started with the ``forkserver`` method (``spawn`` where it is missing), never by
forking a process that already runs the encoder's threads. With ``workers=0`` everything runs in this
process, through the same functions, with the same results.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import queue
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medsearch.config import Config, SliceMode
from medsearch.deid import SiteKey, case_id
from medsearch.encoders import Encoder, EncoderInfo
from medsearch.errors import MedsearchError
from medsearch.io import (
    CaseFiles,
    CaseRef,
    HeaderSummary,
    LoadFailure,
    SkippedFile,
    SkipReason,
    SliceGeometry,
    Volume,
    group_headers,
    load_volume,
    summarize_file,
)
from medsearch.sharing import LinkTable
from medsearch.store import IndexStore
from medsearch.transforms import axial_indices, make_thumbnail, preprocess_volume

__all__ = [
    "FILE_STATE",
    "STAGES",
    "CaseJob",
    "Chunk",
    "FailedCase",
    "FileStateCache",
    "IndexReport",
    "PreparedCase",
    "default_workers",
    "encoder_input",
    "index_files",
    "pool_slices",
    "prepare_case",
    "write_atomic",
]

log = logging.getLogger(__name__)

FILE_STATE = "local-file-state.sqlite"
STAGES = ("discover", "startup", "scan", "decode", "preprocess", "encode", "store", "wait")

# A commit that takes longer than this is throttled: the next one waits at least
# _COMMIT_OVERHEAD times as long, so that rewriting the index stays under ~1/10 of a run.
_FREE_COMMIT_S = 0.5
_COMMIT_OVERHEAD = 10.0
# Header reading: files per worker task, and how often scanned headers go to the cache.
_SCAN_CHUNK = 64
_CACHE_EVERY_S = 5.0
# Header skip reasons that depend on the file's bytes only (an unreadable file may be a permission
# problem, and an unsupported transfer syntax may get its decoder installed): those are cached.
_CACHED_HEADER_SKIPS = frozenset({SkipReason.NOT_DICOM, SkipReason.NO_PIXEL_DATA, SkipReason.TRUNCATED})


def default_workers() -> int:
    """Worker processes used when none are asked for: ``min(4, os.cpu_count())``."""
    return min(4, os.cpu_count() or 1)


# -- the run report ----------------------------------------------------------------------------------


@dataclass
class IndexReport:
    """What one indexing run did. Every file found is in an indexed case or in ``skipped``.

    ``n_files == n_files_added + n_files_already_indexed + len(skipped)`` (see :attr:`accounted`):
    files of the cases this run added, files of cases already in the index, and files left out with a
    reason (a skipped slice of an indexed case counts as skipped).
    """

    index_dir: Path
    n_files: int = 0
    n_cases_found: int = 0
    n_cases_added: int = 0
    n_cases_already_indexed: int = 0
    n_cases_failed: int = 0
    n_cases_total: int = 0
    n_files_added: int = 0
    n_files_already_indexed: int = 0
    n_headers_cached: int = 0
    n_images_encoded: int = 0
    n_commits: int = 0
    workers: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    seconds: float = 0.0
    key_created: Path | None = None

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason.value for s in self.skipped).items()))

    @property
    def accounted(self) -> bool:
        """Whether the file counts add up (files found = added + already indexed + skipped)."""
        return self.n_files == self.n_files_added + self.n_files_already_indexed + len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary.

        ``stage_seconds``: ``scan``, ``decode`` and ``preprocess`` are summed over the worker
        processes (they overlap, and may add up to more than ``seconds``); ``discover``, ``startup``
        (starting the worker processes), ``encode``, ``store`` (commits) and ``wait`` (this process
        waiting for workers) are wall-clock time here.
        """
        rate = self.seconds if self.seconds > 0 else float("nan")
        return {
            "index_dir": str(self.index_dir),
            "files_found": self.n_files,
            "files_in_added_cases": self.n_files_added,
            "files_already_indexed": self.n_files_already_indexed,
            "files_skipped": len(self.skipped),
            "files_accounted": self.accounted,
            "headers_from_cache": self.n_headers_cached,
            "cases_found": self.n_cases_found,
            "cases_added": self.n_cases_added,
            "cases_already_indexed": self.n_cases_already_indexed,
            "cases_failed": self.n_cases_failed,
            "cases_in_index": self.n_cases_total,
            "images_encoded": self.n_images_encoded,
            "skipped_by_reason": self.skipped_by_reason,
            "commits": self.n_commits,
            "workers": self.workers,
            "seconds": round(self.seconds, 2),
            "files_per_second": round(self.n_files / rate, 2) if self.seconds > 0 else None,
            "cases_per_second": round(self.n_cases_added / rate, 2) if self.seconds > 0 else None,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }


# -- the per-case work (in a worker, or here with workers=0) --------------------------------------------


def encoder_input(volume: Volume, info: EncoderInfo, config: Config) -> torch.Tensor:
    """The batch an encoder sees for one volume: ``(S, C, H, W)`` selected slices, or ``(1, 1, D, H, W)``."""
    return preprocess_volume(
        volume.pixels,
        config=config.preprocess,
        modality=volume.modality,
        rgb=volume.rgb,
        spacing=volume.spacing,
        spatial_dims=info.spatial_dims,
        channels=info.in_channels,
        mean=info.mean,
        std=info.std,
        volume_shape=config.encoder.volume_shape,
    )


def pool_slices(vectors: np.ndarray, how: str = "mean") -> np.ndarray:
    """One case vector from its slice vectors (``mean`` or ``max``), of unit length, float32."""
    pooled = vectors.max(axis=0) if how == "max" else vectors.mean(axis=0)
    return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class CaseJob:
    """One case to decode: its position in the run, its pseudonymous id and its files."""

    seq: int
    case_id: str
    case: CaseFiles


@dataclass
class PreparedCase:
    """A decoded case, ready for the encoder: ``images`` is the encoder input as float32."""

    case_id: str
    images: np.ndarray
    thumbnail: np.ndarray | None
    row: dict[str, Any]
    skipped: list[SkippedFile]
    n_files: int  # files of the case that went into the volume
    decode_s: float = 0.0
    preprocess_s: float = 0.0


@dataclass
class FailedCase:
    """A case none of whose files could be used; ``transient``: a timeout or a crashed worker."""

    case_id: str
    skipped: list[SkippedFile]
    transient: bool = False
    decode_s: float = 0.0


@dataclass(frozen=True)
class _Setup:
    """What a worker needs to turn a case into encoder input (sent once, when it starts)."""

    config: Config
    encoder: EncoderInfo
    describe: Callable[[str, CaseRef, Volume], dict[str, Any]] | None
    load: Callable[[CaseRef], tuple[Volume, list[SkippedFile]]] = load_volume
    log_level: int = logging.WARNING


def prepare_case(job: CaseJob, setup: _Setup) -> PreparedCase | FailedCase:
    """Decode one case and make its encoder input, thumbnail and metadata row; never raises.

    With the default loader, a 2D encoder and axial slices, only the slices the encoder sees and the
    thumbnail's middle slice are read and decoded, chosen from the slice geometry the header scan
    recorded (see :func:`~medsearch.io.load_volume`): the same slices as a full decode would give,
    unless a file that was not selected has pixel data that would not decode, which is then not
    noticed (and the file counts as part of its case; the scan has already checked that its header
    reads, its pixel data is all there and its transfer syntax has a decoder).
    """
    started = time.perf_counter()
    files = job.case.files
    try:
        case = job.case.open()
        if setup.load is load_volume:
            volume, bad = load_volume(case, select=_used_slices(setup.config, setup.encoder))
        else:
            volume, bad = setup.load(case)
    except LoadFailure as e:
        return FailedCase(job.case_id, _cover(files, list(e.skipped)), decode_s=time.perf_counter() - started)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a decoder bug (or a Rust panic) must cost one case, not the run
        detail = f"decoding the case failed: {_first_line(exc)}"
        return FailedCase(job.case_id, _cover(files, [], detail), decode_s=time.perf_counter() - started)
    decoded = time.perf_counter()
    try:
        images = encoder_input(volume, setup.encoder, setup.config).numpy()
        size = setup.config.index.thumbnail_size
        thumb = None
        if size:
            thumb = make_thumbnail(volume.pixels, config=setup.config.preprocess, modality=volume.modality,
                                   rgb=volume.rgb, spacing=volume.spacing, size=size)
        row = setup.describe(job.case_id, case, volume) if setup.describe is not None else {"case_id": job.case_id}
    except Exception as exc:  # noqa: BLE001 - as above: an odd volume is skipped with the reason
        detail = f"preprocessing the case failed: {_first_line(exc)}"
        return FailedCase(job.case_id, _cover(files, list(bad), detail), decode_s=decoded - started)
    return PreparedCase(
        case_id=job.case_id,
        images=np.ascontiguousarray(images, dtype=np.float32),
        thumbnail=thumb,
        row=row,
        skipped=list(bad),
        n_files=len(files) - len(bad),
        decode_s=decoded - started,
        preprocess_s=time.perf_counter() - decoded,
    )


def _used_slices(config: Config, info: EncoderInfo) -> Callable[[int], list[int]] | None:
    """Which slices of a stack of a given depth a case's preprocessing reads; None: all of them."""
    if info.spatial_dims != 2 or config.preprocess.slice_mode is not SliceMode.AXIAL:
        return None  # tri-planar images and 3D encoders see the whole volume
    return functools.partial(_axial_and_middle, count=config.preprocess.slices, middle=bool(config.index.thumbnail_size))


def _axial_and_middle(depth: int, *, count: int, middle: bool) -> list[int]:
    """The axial slices an encoder sees, and the middle one the thumbnail shows."""
    indices = axial_indices(depth, count=count)
    return sorted({*indices, depth // 2}) if middle else indices


def _cover(files: Sequence[Path], skipped: list[SkippedFile], detail: str = "") -> list[SkippedFile]:
    """``skipped`` plus a DECODE_ERROR for each file of the case it does not name."""
    named = {s.path for s in skipped}
    reason = detail or "not decoded: no other file of its case could be decoded"
    return skipped + [SkippedFile(p, SkipReason.DECODE_ERROR, reason) for p in files if p not in named]


def _scan_files(paths: list[Path], setup: _Setup) -> tuple[list[HeaderSummary | SkippedFile], float]:
    started = time.perf_counter()
    with _pydicom_silenced():
        found = [summarize_file(p) for p in paths]
    return found, time.perf_counter() - started


@contextlib.contextmanager
def _pydicom_silenced() -> Iterator[None]:
    """No log lines from pydicom, which quotes header values in them (workers silence it for good)."""
    logger = logging.getLogger("pydicom")
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -- worker processes ----------------------------------------------------------------------------------


@dataclass
class _Failure:
    """A task lost with its worker (a timeout or a crash), or one that raised."""

    detail: str


_TASKS: dict[str, Callable[[Any, _Setup], Any]] = {"scan": _scan_files, "case": prepare_case}
_READY = -1  # the first message of a worker that has started
_STARTUP_LIMIT_S = 300.0


def _worker_main(conn: Connection, setup: _Setup) -> None:
    """A worker process: run tasks from ``conn`` until told to stop or the pipe closes."""
    _become_worker(setup)
    try:
        conn.send((_READY, None))
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        seq, kind, payload = message
        try:
            result: Any = _TASKS[kind](payload, setup)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the tasks catch their own; a Rust panic is a BaseException
            result = _Failure(f"{type(exc).__name__}: {_first_line(exc)}")
        try:
            conn.send((seq, result))
        except (BrokenPipeError, OSError):
            return


def _become_worker(setup: _Setup) -> None:
    # Ctrl-C reaches the whole process group: the main process decides what happens to workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    # One thread each: the workers share the cores with each other and with the encoder.
    torch.set_num_threads(1)
    import monai.data
    import pydicom

    # The metadata MONAI tracks is not used here and costs a fifth of the preprocessing time.
    monai.data.set_track_meta(False)
    # pydicom quotes header values in its warnings; the skip report already says what matters.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.basicConfig(level=setup.log_level, format="%(levelname)s %(name)s: %(message)s")


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent goes (a ``kill -9`` of the indexer leaves no orphan)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the closed pipe still ends an idle worker
        return
    if os.getppid() == 1:  # the parent went before prctl took effect
        os._exit(1)


def _context() -> Any:  # a multiprocessing context (its Process type is not in BaseContext's stubs)
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # The fork server imports this module (torch, MONAI, pydicom) once; each worker starts from it.
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


@dataclass
class _Task:
    seq: int
    kind: str
    payload: Any


@dataclass
class _Worker:
    process: Any
    conn: Connection
    tasks: deque[_Task] = field(default_factory=deque)
    started: float = 0.0  # when tasks[0] began (or the worker was started), as seen from here
    ready: bool = False
    done: int = 0


class _WorkerPool:
    """Worker processes with one pipe each, so that the task a worker is running is always known.

    A dispatcher thread sends submitted tasks (``depth`` per worker, so that a worker starts its next
    task at once), receives results, and replaces a worker that dies or overruns ``timeout`` on a
    task; that task then comes back as a :class:`_Failure` and the worker's queued tasks go to others.
    ``multiprocessing.Pool`` and ``ProcessPoolExecutor`` cannot stop one hung task, and a crashed
    worker breaks a ``DataLoader`` or a ``ProcessPoolExecutor`` as a whole.

    Raises
    ------
    MedsearchError
        (from :meth:`get`) Workers die as soon as they start.
    """

    def __init__(self, n: int, setup: _Setup, *, timeout: float | None, depth: int = 2) -> None:
        self._ctx = _context()
        self._setup = setup
        self._timeout = timeout
        self._depth = depth
        self._pending: deque[_Task] = deque()
        self._lock = threading.Lock()
        self._results: queue.Queue[tuple[_Task, Any] | BaseException] = queue.Queue()
        self._closing = threading.Event()
        self._failed_starts = 0
        self._workers = [self._start() for _ in range(n)]
        self._thread = threading.Thread(target=self._run, name="medsearch-dispatcher", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return len(self._workers)

    def submit(self, seq: int, kind: str, payload: Any) -> None:
        with self._lock:
            self._pending.append(_Task(seq, kind, payload))

    def get(self) -> tuple[_Task, Any]:
        """The next finished task and its result (in the order they finish)."""
        while True:
            try:
                item = self._results.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise MedsearchError("the worker dispatcher stopped; run again with --workers 0") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self, *, kill: bool = False) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        for w in self._workers:
            if not kill:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(None)
        for w in self._workers:
            if kill:
                w.process.kill()
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()

    # -- the dispatcher thread --

    def _start(self) -> _Worker:
        ours, theirs = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(theirs, self._setup), name="medsearch-worker", daemon=True)
        process.start()
        theirs.close()
        return _Worker(process=process, conn=ours, started=time.monotonic())

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._dispatch()
                by_conn = {w.conn: w for w in self._workers}
                by_sentinel = {w.process.sentinel: w for w in self._workers}
                ready = wait([*by_conn, *by_sentinel], timeout=0.02)
                for obj in ready:
                    if obj in by_conn:
                        self._receive(by_conn[obj])
                for obj in ready:
                    if obj in by_sentinel and not by_sentinel[obj].process.is_alive():
                        code = by_sentinel[obj].process.exitcode
                        why = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                        self._replace(by_sentinel[obj], f"the worker decoding it crashed ({why})")
                now = time.monotonic()
                for w in list(self._workers):
                    if not w.ready and now - w.started > _STARTUP_LIMIT_S:
                        w.process.kill()
                        w.process.join(timeout=5)
                        self._replace(w, f"it did not start within {_STARTUP_LIMIT_S:g} s")
                if self._timeout is not None:
                    for w in list(self._workers):
                        if w.ready and w.tasks and now - w.started > self._timeout:
                            late = w.tasks[0].seq
                            w.process.kill()
                            w.process.join(timeout=5)
                            self._replace(w, f"no result within {self._timeout:g} s (the worker was stopped)", blame=late)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self._results.put(exc)

    def _dispatch(self) -> None:
        with self._lock:
            for w in sorted(self._workers, key=lambda w: len(w.tasks)):
                while len(w.tasks) < self._depth and self._pending:
                    task = self._pending.popleft()
                    try:
                        w.conn.send((task.seq, task.kind, task.payload))
                    except (OSError, ValueError):
                        self._pending.appendleft(task)  # the sentinel reports the dead worker
                        break
                    if not w.tasks and w.ready:
                        w.started = time.monotonic()
                    w.tasks.append(task)

    def _receive(self, w: _Worker) -> bool:
        try:
            seq, result = w.conn.recv()
        except (EOFError, OSError):
            return False
        if seq == _READY:
            w.ready = True
            w.started = time.monotonic()
            return True
        task = w.tasks.popleft()
        if task.seq != seq:  # cannot happen with one pipe per worker; never mix up results
            raise RuntimeError(f"worker answered task {seq} while running task {task.seq}")
        w.done += 1
        w.started = time.monotonic()
        self._results.put((task, result))
        return True

    def _replace(self, w: _Worker, why: str, *, blame: int | None = None) -> None:
        """Start a worker in place of ``w``; the task it was running (``blame``, when known) fails."""
        with contextlib.suppress(OSError, ValueError):
            while w.conn.poll() and self._receive(w):
                pass
        if not w.ready:
            # Not the task's fault: the process never got to it (a broken environment, or a script
            # that starts indexing on import, without an ``if __name__ == "__main__":`` guard).
            self._failed_starts += 1
            if self._failed_starts >= 3:
                raise MedsearchError(
                    f"worker processes cannot start ({why}); run with --workers 0, and in a script call "
                    "build_index under 'if __name__ == \"__main__\":'"
                )
        elif w.tasks and (blame is None or w.tasks[0].seq == blame):
            lost = w.tasks.popleft()
            self._results.put((lost, _Failure(why)))
        # (a late task that finished just before it was stopped has its result: nobody is blamed)
        with self._lock:
            self._pending.extendleft(reversed(w.tasks))
        w.tasks.clear()
        w.conn.close()
        log.warning("replacing a worker process: %s", why)
        self._workers[self._workers.index(w)] = self._start()


# -- the file-state cache ------------------------------------------------------------------------------


def _cached_geometry(text: str | None) -> SliceGeometry | None:
    """A cached slice geometry; None when absent or unreadable (the case is then read the long way)."""
    if not text:
        return None
    try:
        return SliceGeometry.from_list(json.loads(text))
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class _FileState:
    key: str  # absolute path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Cached:
    """A file's entry in the cache: its header summary (UIDs as keyed tokens) or skip, and its case."""

    item: HeaderSummary | SkippedFile
    case_id: str
    part: str


class _Tokens:
    """Keyed pseudonyms of UIDs (the cache keeps these, never a UID), and the UIDs seen in this run."""

    def __init__(self, key: SiteKey) -> None:
        self._key = key
        self.real: dict[str, str] = {}

    def token(self, uid: str) -> str:
        if not uid:
            return ""
        token = self._key.pseudonym(uid, kind="uid")
        self.real[token] = uid
        return token

    def summary(self, item: HeaderSummary) -> HeaderSummary:
        return HeaderSummary(item.path, self.token(item.study_uid), self.token(item.series_uid),
                             self.token(item.sop_uid), item.frames, item.geometry)


class FileStateCache:
    """What each file gave when it was last read, so that an unchanged file is not read again.

    An SQLite file in the index directory (:data:`FILE_STATE`), keyed by a file's absolute path, size
    and modification time. For each file it holds its header summary, with the Study, Series and SOP
    Instance UIDs replaced by keyed pseudonyms (enough to group files into cases and find duplicates)
    and its slice geometry (so that a case is ordered without reading its files again), the case id
    it was last part of, or why the file was skipped; and which files of a decoded case were left
    out. It holds file paths, so it is local to this machine: it is created owner-only and
    :func:`medsearch.sharing.export_index` leaves it behind. Deleting it only makes the next run read
    every header again.

    Parameters
    ----------
    path
        The cache file; created when missing, and recreated when damaged.
    """

    _VERSION = "3"  # 3: headers.geometry

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            log.warning("file-state cache %s is damaged (%s); starting a new one", self.path, e)
            self.path.unlink(missing_ok=True)
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        db = sqlite3.connect(self.path)
        try:
            if fresh:
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                version = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
                if version is not None and version[0] != self._VERSION:
                    db.execute("DROP TABLE IF EXISTS headers")
                    db.execute("DROP TABLE IF EXISTS decoded")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (self._VERSION,))
                db.execute(
                    "CREATE TABLE IF NOT EXISTS headers (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "study TEXT, series TEXT, sop TEXT, frames INTEGER, reason TEXT, detail TEXT, "
                    "case_id TEXT, part TEXT, geometry TEXT)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS decoded (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "case_id TEXT, reason TEXT, detail TEXT)"
                )
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    def lookup(self, states: Mapping[Path, _FileState]) -> dict[Path, _Cached]:
        """Cached entries of the files whose size and modification time are unchanged."""
        by_key = {s.key: (path, s) for path, s in states.items()}
        out: dict[Path, _Cached] = {}
        rows = self._db.execute(
            "SELECT path, size, mtime_ns, study, series, sop, frames, reason, detail, case_id, part, geometry FROM headers"
        )
        for key, size, mtime, study, series, sop, frames, reason, detail, cid, part, geometry in rows:
            hit = by_key.get(key)
            if hit is None or hit[1].size != size or hit[1].mtime_ns != mtime:
                continue
            path = hit[0]
            item: HeaderSummary | SkippedFile
            if reason:
                item = SkippedFile(path, SkipReason(reason), detail or "")
            else:
                item = HeaderSummary(path, study or "", series or "", sop or "", int(frames), _cached_geometry(geometry))
            out[path] = _Cached(item, cid or "", part or "")
        return out

    def decode_skips(self, states: Mapping[Path, _FileState]) -> dict[Path, tuple[str, SkippedFile]]:
        """Files of unchanged cases left out when their case was decoded: path -> (case id, skip)."""
        by_key = {s.key: (path, s) for path, s in states.items()}
        out: dict[Path, tuple[str, SkippedFile]] = {}
        for key, size, mtime, cid, reason, detail in self._db.execute(
            "SELECT path, size, mtime_ns, case_id, reason, detail FROM decoded"
        ):
            hit = by_key.get(key)
            if hit is None or hit[1].size != size or hit[1].mtime_ns != mtime:
                continue
            out[hit[0]] = (cid, SkippedFile(hit[0], SkipReason(reason), detail or ""))
        return out

    def put_headers(self, items: Iterable[tuple[_FileState, HeaderSummary | SkippedFile]]) -> None:
        """Record header summaries (their UIDs already tokens) and header skips that depend on the bytes only."""
        rows: list[tuple[Any, ...]] = []
        for state, item in items:
            if isinstance(item, SkippedFile):
                if item.reason in _CACHED_HEADER_SKIPS:
                    rows.append((state.key, state.size, state.mtime_ns, None, None, None, None,
                                 item.reason.value, item.detail, None, None, None))
            else:
                geometry = None if item.geometry is None else json.dumps(item.geometry.to_list())
                rows.append((state.key, state.size, state.mtime_ns, item.study_uid, item.series_uid, item.sop_uid,
                             item.frames, None, None, None, None, geometry))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO headers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def put_case_ids(self, items: Iterable[tuple[_FileState, str, str]]) -> None:
        """Record the case (id and part) each file belongs to."""
        with self._db:
            self._db.executemany(
                "UPDATE headers SET case_id = ?, part = ? WHERE path = ? AND size = ? AND mtime_ns = ?",
                [(cid, part, s.key, s.size, s.mtime_ns) for s, cid, part in items],
            )

    def put_cases(self, cases: Iterable[tuple[str, Sequence[_FileState], Sequence[tuple[_FileState, SkippedFile]]]]) -> None:
        """Record decoded cases: ``(case id, states of all its files, (state, skip) of those left out)``."""
        with self._db:
            for cid, states, skipped in cases:
                self._db.executemany("DELETE FROM decoded WHERE path = ?", [(s.key,) for s in states])
                self._db.executemany(
                    "INSERT OR REPLACE INTO decoded VALUES (?, ?, ?, ?, ?, ?)",
                    [(s.key, s.size, s.mtime_ns, cid, skip.reason.value, skip.detail) for s, skip in skipped],
                )

    def prune(self, root: Path, states: Mapping[Path, _FileState]) -> None:
        """Forget files under the folder ``root`` that are no longer there."""
        if not root.is_dir():
            return
        prefix = os.path.join(os.path.abspath(root), "")
        with self._db:
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (path TEXT PRIMARY KEY)")
            self._db.execute("DELETE FROM seen")
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", [(s.key,) for s in states.values()])
            for table in ("headers", "decoded"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE substr(path, 1, ?) = ? AND path NOT IN (SELECT path FROM seen)",
                    (len(prefix), prefix),
                )
            self._db.execute("DELETE FROM seen")


def _file_states(files: Sequence[Path]) -> dict[Path, _FileState]:
    out = {}
    for path in files:
        try:
            st = path.stat()
        except OSError:
            st = None  # read (and reported) below, never cached
        out[path] = _FileState(os.path.abspath(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    return out


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Work done since the last commit: cases to add, and the case files to record in the cache."""

    vectors: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    thumbnails: list[np.ndarray] = field(default_factory=list)
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
    workers: int | None = None,
    case_timeout: float | None = 600.0,
    batch_images: int = 32,
    commit_every: int = 64,
    commit_seconds: float = 60.0,
    file_cache: bool = True,
    retry_skipped: bool = False,
    must_commit: bool = False,
    progress: bool = False,
    load: Callable[[CaseRef], tuple[Volume, list[SkippedFile]]] = load_volume,
) -> None:
    """Index ``files`` into ``store``: the engine of :func:`medsearch.search.build_index`.

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
    workers
        Worker processes (default :func:`default_workers`; 0: everything in this process).
    case_timeout
        Seconds a worker may spend on one case (or one chunk of headers) before it is stopped and the
        case skipped with DECODE_ERROR; None: no limit.
    batch_images
        Images per encoder call (the cases' selected slices, several cases per call).
    commit_every, commit_seconds
        Commit once this many new cases are waiting, or this many seconds after the last commit,
        whichever comes first (throttled so that commits take at most ~1/10 of a run).
    file_cache
        Keep and use the file-state cache (unchanged files are not read again).
    retry_skipped
        Decode again the cases whose files were all left out by an earlier run.
    must_commit
        Commit at the end even when nothing was added (a new index, new label columns).
    progress
        Show the live bar on stderr.
    load
        The decoder (default :func:`~medsearch.io.load_volume`, which then decodes only the slices
        the encoder and the thumbnail use, see :func:`prepare_case`); picklable, like ``describe``.

    Raises
    ------
    MedsearchError
        Worker processes cannot start.
    """
    n_workers = default_workers() if workers is None else max(0, int(workers))
    report.workers = n_workers
    setup = _Setup(config=config, encoder=encoder.info, describe=describe, load=load,
                   log_level=logging.getLogger().getEffectiveLevel())
    cache = _open_cache(store.path / FILE_STATE) if file_cache else None
    pool: _WorkerPool | None = None
    bar: _Progress | None = None
    failed = False
    try:
        states = _file_states(files)
        cached = cache.lookup(states) if cache is not None else {}
        report.n_headers_cached = len(cached)
        todo = [p for p in files if p not in cached]
        tokens = _Tokens(key)

        def get_pool() -> _WorkerPool:
            nonlocal pool
            if pool is None:
                started = time.perf_counter()
                pool = _WorkerPool(n_workers, setup, timeout=case_timeout)
                report.stage_seconds["startup"] += time.perf_counter() - started
            return pool

        scanned = _read_headers(todo, states, cache, tokens, report, get_pool if n_workers else None, setup, progress)
        # Group with UIDs as tokens, so that cached and freshly read files group alike.
        items = [c.item for c in cached.values()]
        items += [tokens.summary(i) if isinstance(i, HeaderSummary) else i for i in scanned]
        groups, header_skips = group_headers(items)
        report.skipped.extend(header_skips)
        report.n_cases_found = len(groups)
        decode_skips = cache.decode_skips(states) if cache is not None else {}
        jobs = _plan(groups, cached, tokens, store, key, decode_skips, report, links, retry_skipped, states, cache)
        bar = _Progress(report, settled=report.n_files - sum(len(j.case.files) for j in jobs), enabled=progress)
        committer = _Committer(commit, cache, report, every=commit_every, seconds=commit_seconds)
        results = _prepared(jobs, setup, get_pool() if n_workers and jobs else None, report, batch_images=batch_images)
        _encode_all(results, jobs, states, encoder, config, committer, report, bar, links, batch_images)
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
    get_pool: Callable[[], _WorkerPool] | None,
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
        if get_pool is None or not paths:
            for start in range(0, len(paths), _SCAN_CHUNK):
                take(*_scan_files(paths[start : start + _SCAN_CHUNK], setup))
        else:
            pool = get_pool()
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
    jobs: list[CaseJob], setup: _Setup, pool: _WorkerPool | None, report: IndexReport, *, batch_images: int
) -> Iterator[PreparedCase | FailedCase]:
    """Each job's result, in job order, with at most ``ahead`` cases decoded ahead of the encoder.

    ``ahead`` covers one encoder batch of one-image cases plus two cases per worker, so that the
    workers keep going while this process encodes.
    """
    if pool is None:
        for job in jobs:
            with _pydicom_silenced():
                result = prepare_case(job, setup)
            yield result
        return
    ahead = batch_images + 2 * pool.size
    waiting: dict[int, Any] = {}
    sent = 0
    for seq in range(len(jobs)):
        while sent < len(jobs) and sent < seq + ahead:
            pool.submit(sent, "case", jobs[sent])
            sent += 1
        while seq not in waiting:
            started = time.perf_counter()
            task, result = pool.get()
            report.stage_seconds["wait"] += time.perf_counter() - started
            waiting[task.seq] = result
        result = waiting.pop(seq)
        if isinstance(result, _Failure):
            job = jobs[seq]
            result = FailedCase(job.case_id, _cover(job.case.files, [], result.detail), transient=True)
        yield result


def _encode_all(
    results: Iterable[PreparedCase | FailedCase],
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
    """Encode prepared cases in batches of about ``batch_images`` images; hand each case to the committer."""
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
        batch = np.concatenate([prepared.images for _, prepared in waiting])
        vectors = encoder.embed(batch)
        report.stage_seconds["encode"] += time.perf_counter() - started
        offset = 0
        for job, prepared in waiting:
            n = prepared.images.shape[0]
            committer.chunk.vectors.append(pool_slices(vectors[offset : offset + n], config.preprocess.pool))
            offset += n
            committer.chunk.rows.append(prepared.row)
            if prepared.thumbnail is not None:
                committer.chunk.thumbnails.append(prepared.thumbnail)
            record(job, prepared.skipped)
            if links is not None:
                _link(links, job.case_id, job.case)
            report.n_cases_added += 1
            report.n_files_added += prepared.n_files
            report.n_images_encoded += n
            bar.update(len(job.case.files))
            committer.maybe_commit()
        waiting.clear()
        n_images = 0

    for job, result in zip(jobs, results):
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
        n_images += result.images.shape[0]
        if n_images >= batch_images:
            encode()
    encode()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (a reader never sees half)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
