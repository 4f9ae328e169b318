"""Worker processes: a pool that reads headers and prepares cases, and can stop one hung task.

:class:`_WorkerPool` starts ``n`` processes with the ``forkserver`` method (``spawn`` where it is
missing), never by forking a process that already runs the encoder's threads, and gives each its
own pipe, so that the task a worker is running is always known. A worker that overruns the task
timeout is stopped, one that crashes is replaced, and the task it was running comes back as a
:class:`_Failure`. A worker runs the tasks of :mod:`medsearch.indexing.cases` (``"scan"``: a chunk
of headers, ``"case"``: one case, ``"study"``: a query study for ``medsearch serve``, ``"call"``: a
function of a layer above, such as a case picture of the service), with one
thread, Ctrl-C left to the main process, and pydicom silenced for good.

A worker never runs the calling script again (:func:`_main_kept_out`): a script that calls
``build_index`` without an ``if __name__ == "__main__":`` guard works as one with it. Where worker
processes cannot be used at all (none starts, or this process may not have children), the pool
raises :class:`WorkersUnavailable` and the run goes on in the calling process, saying so in one line;
where only some start, the pool works with those.

A worker may allocate at most ``IndexOptions.worker_memory_gib`` beyond what it holds once started
(:func:`_limit_memory`): its address space is capped, so a decoder that misbehaves on a hostile file
fails that file (a ``MemoryError``, an error from the decoder, or at worst the worker's own crash)
instead of growing until the machine runs out of memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, overload

import torch

from medsearch.errors import MedsearchError
from medsearch.indexing.cases import _one_line, _scan_files, _Setup, prepare_case, prepare_study
from medsearch.io.quiet import silence_pydicom

log = logging.getLogger(__name__)


class WorkersUnavailable(MedsearchError):
    """No worker process can be used here; the caller runs the work itself."""


@dataclass
class _Failure:
    """A task lost with its worker (a timeout or a crash), or one that raised."""

    detail: str


def _call(payload: tuple[Callable[..., Any], tuple[Any, ...]], setup: _Setup) -> Any:
    """A ``"call"`` task: ``fn(*args)`` (``fn`` a module-level function, sent by reference), for work
    of a layer above this one that must run within a worker's time and memory bounds (the case
    pictures of ``medsearch serve``: :mod:`medsearch.web.pictures`)."""
    fn, args = payload
    return fn(*args)


_TASKS: dict[str, Callable[[Any, _Setup], Any]] = {"scan": _scan_files, "case": prepare_case, "study": prepare_study, "call": _call}
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
            result = _Failure(f"{type(exc).__name__}: {_one_line(exc)}")
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

    # The metadata MONAI tracks is not used here and costs a fifth of the preprocessing time.
    monai.data.set_track_meta(False)
    # pydicom quotes header values in its warnings; the skip report already says what matters.
    silence_pydicom()
    logging.basicConfig(level=setup.log_level, format="%(levelname)s %(name)s: %(message)s")
    budget = setup.options.worker_memory_gib
    _limit_memory(None if budget is None else int(budget * 2**30))


def _limit_memory(budget: int | None) -> None:
    """Cap this process's address space at what it holds now plus ``budget`` bytes (Linux only).

    The address space is what the process has mapped, resident or not, so the cap bounds its
    resident memory too. It is measured once the libraries (torch, MONAI) are loaded, so ``budget``
    is what decoding and preprocessing may use. An allocation over the cap fails: a ``MemoryError``
    in Python, an error code in a C decoder.
    """
    if budget is None or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + budget if hard == resource.RLIM_INFINITY else min(mapped + budget, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError) as e:  # no /proc, or a limit the system refuses: run without one
        log.warning("cannot limit a worker's memory (%s); it runs without a limit", e)


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


@contextlib.contextmanager
def _main_kept_out(setup: _Setup) -> Iterator[None]:
    """While a worker starts, hide the calling script from it, so that it does not run the script again.

    A process started with ``forkserver`` or ``spawn`` imports the main module first: a script that
    calls ``build_index`` without an ``if __name__ == "__main__":`` guard would then start indexing
    again in every worker (and fail there). Workers run medsearch's functions only, so they need
    nothing of the script, unless a function of it was handed to them (a decoder passed as
    ``IndexOptions.load``): then the script is imported, as multiprocessing does by default.
    """
    main = sys.modules.get("__main__")
    if main is None or _uses_main(setup):
        yield
        return
    saved: dict[str, Any] = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _uses_main(setup: _Setup) -> bool:
    """Whether a function the workers call is defined in the main module (so they must import it)."""
    for func in (setup.describe, setup.options.load):
        while isinstance(func, functools.partial):
            func = func.func
        if func is not None and getattr(func, "__module__", None) == "__main__":
            return True
    return False


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
        # a submitted task wakes the dispatcher at once (else it waits out its 20 ms poll): one
        # message at a time is enough, however many tasks come in meanwhile
        self._wake_recv, self._wake_send = multiprocessing.Pipe(duplex=False)
        self._woken = False
        if multiprocessing.current_process().daemon:
            raise WorkersUnavailable("this process is itself a daemon process, which may not start others")
        self._workers: list[_Worker] = []
        for _ in range(n):
            try:
                self._workers.append(self._start())
            except (OSError, ValueError, RuntimeError) as e:  # no semaphores, no fork, a process limit...
                if not self._workers:
                    raise WorkersUnavailable(f"a worker process cannot start ({_one_line(e)})") from e
                log.warning("started %d of %d worker processes (%s); going on with %d", len(self._workers), n, _one_line(e),
                            len(self._workers))
                break
        self._thread = threading.Thread(target=self._run, name="medsearch-dispatcher", daemon=True)
        self._thread.start()
        self._await_first_worker()

    @property
    def size(self) -> int:
        return len(self._workers)

    def _await_first_worker(self) -> None:
        """Wait until a worker is ready to take tasks.

        Raises
        ------
        WorkersUnavailable
            The workers die as they start (three times), or none starts within the startup limit.
        """
        deadline = time.monotonic() + _STARTUP_LIMIT_S
        while not any(w.ready for w in self._workers):
            failed = not self._thread.is_alive()  # the dispatcher stops after three failed starts
            if failed or time.monotonic() > deadline:
                try:
                    why = str(self._results.get_nowait()) if failed else f"none started within {_STARTUP_LIMIT_S:g} s"
                except queue.Empty:
                    why = "the worker dispatcher stopped"
                self.close(kill=True)
                raise WorkersUnavailable(why)
            time.sleep(0.05)

    def submit(self, seq: int, kind: str, payload: Any) -> None:
        with self._lock:
            self._pending.append(_Task(seq, kind, payload))
            wake, self._woken = not self._woken, True
        if wake:
            with contextlib.suppress(OSError, ValueError):  # closed: the pool is going away
                self._wake_send.send_bytes(b"")

    @overload
    def get(self) -> tuple[_Task, Any]: ...

    @overload
    def get(self, timeout: float) -> tuple[_Task, Any] | None: ...

    def get(self, timeout: float | None = None) -> tuple[_Task, Any] | None:
        """The next finished task and its result (in the order they finish); None after ``timeout`` s without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_s = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                item = self._results.get(timeout=wait_s)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise MedsearchError("the worker dispatcher stopped; run again with --workers 0") from None
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self, *, kill: bool = False) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        for end in (self._wake_send, self._wake_recv):
            end.close()
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
        try:
            with _main_kept_out(self._setup):
                process.start()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        theirs.close()
        return _Worker(process=process, conn=ours, started=time.monotonic())

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._dispatch()
                by_conn = {w.conn: w for w in self._workers}
                by_sentinel = {w.process.sentinel: w for w in self._workers}
                ready = wait([*by_conn, *by_sentinel, self._wake_recv], timeout=0.02)
                if self._wake_recv in ready:
                    with self._lock:
                        while self._wake_recv.poll():
                            self._wake_recv.recv_bytes()
                        self._woken = False
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
                raise MedsearchError(f"worker processes cannot start ({why}); run with --workers 0")
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
