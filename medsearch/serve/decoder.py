"""Uploads decoded and preprocessed in worker processes, each within a time limit and a memory cap,
and the query lock waited for until a request's deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from medsearch.embedding import Region
from medsearch.errors import EncoderMismatchError, InvalidStudyError, MedsearchError
from medsearch.indexing.cases import PreparedStudy, StudyError, _Setup, prepare_study
from medsearch.indexing.options import IndexOptions
from medsearch.indexing.workers import _Failure, _WorkerPool
from medsearch.io import CaseRef, SkippedFile, Volume
from medsearch.io.quiet import pydicom_silenced
from medsearch.search import Searcher
from medsearch.serve.http import _UploadError

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[MedsearchError]] = {
    "InvalidStudyError": InvalidStudyError,
    "EncoderMismatchError": EncoderMismatchError,
    "MedsearchError": MedsearchError,
}



class _InternalError(Exception):
    """A bug met while decoding an upload in a worker; its message is the error's type only."""


class _Decoder:
    """Uploads decoded and preprocessed in worker processes, each within a time limit and a memory cap.

    A ``"study"`` task of :class:`~medsearch.indexing.workers._WorkerPool` runs
    :func:`~medsearch.indexing.cases.prepare_study` on the upload's path; a thread hands each result to
    the request waiting for it. With ``workers=0`` the study is decoded in this process instead.
    :meth:`run` sends other decoding there too (the archive's slices the page shows).
    """

    def __init__(
        self,
        searcher: Searcher,
        *,
        workers: int,
        timeout: float,
        memory_gib: float | None,
        load: Callable[[CaseRef], tuple[Volume, list[SkippedFile]]] | None,
    ) -> None:
        options = IndexOptions(workers=workers, case_timeout=timeout, worker_memory_gib=memory_gib)
        if load is not None:
            options = dataclasses.replace(options, load=load)
        self._setup = _Setup(config=searcher.config, encoder=searcher.encoder.info, describe=None, options=options,
                             log_level=logging.getLogger().getEffectiveLevel())
        self._timeout = timeout
        self._pool = _WorkerPool(workers, self._setup, timeout=timeout) if workers else None
        self._waiting: dict[int, concurrent.futures.Future[Any]] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._broken: BaseException | None = None  # why the workers stopped for good
        self._thread = threading.Thread(target=self._collect, args=(self._pool,), name="medsearch-decoder", daemon=True)
        if self._pool is not None:
            self._thread.start()

    @property
    def workers(self) -> int:
        """The worker processes decoding now (0: in this process); fewer than asked where some could not start."""
        return self._pool.size if self._pool is not None else 0

    async def prepare(self, path: Path, deadline: float, region: Region | None = None) -> PreparedStudy:
        """The encoder input of the study at ``path`` (of its ``region``, when given).

        Raises
        ------
        InvalidStudyError, EncoderMismatchError, MedsearchError
            As :meth:`Searcher.search <medsearch.search.Searcher.search>` raises them.
        _UploadError
            422: the study was not decoded in time, or crashed its worker.
        _InternalError
            A bug in the decoder (its type only).
        """
        if self._broken is not None:
            raise _UploadError(503, f"the service cannot decode uploads ({self._broken}); restart it")
        if self._pool is None:
            result = await run_in_threadpool(self._in_process, path, region)
        else:
            seq, future = self._submit("study", path if region is None else (path, region))
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(future), _left(deadline))
            except TimeoutError:
                raise _UploadError(
                    422,
                    f"the upload could not be decoded within {self._timeout:g} s; give a smaller study, or start "
                    "the service with a larger --request-timeout",
                ) from None
            finally:
                self._forget(seq)
        if isinstance(result, _Failure):  # stopped after the time limit, or crashed
            raise _UploadError(422, f"the upload could not be decoded: {result.detail}; give another study")
        if isinstance(result, StudyError):
            if result.kind not in _ERRORS:
                raise _InternalError(result.message)
            raise _ERRORS[result.kind](result.message)
        return result

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker, within its time limit and memory cap (``fn`` a module-level
        function, its arguments and result picklable); None where it overran, crashed or raised.
        Blocks the calling thread (a request's thread-pool thread). With ``workers=0``, in this process."""
        if self._pool is None or self._broken is not None:
            return fn(*args) if self._pool is None else None
        seq, future = self._submit("call", (fn, args))
        try:
            result = future.result(timeout=self._timeout + 5.0)  # the pool stops the worker at the limit
        except Exception:  # noqa: BLE001 - timed out, cancelled, or the pool failed (the collector set its error)
            return None
        finally:
            self._forget(seq)
        return None if isinstance(result, _Failure) else result

    def _submit(self, kind: str, payload: Any) -> tuple[int, concurrent.futures.Future[Any]]:
        """A task for the workers, and the future the collector thread completes with its result."""
        assert self._pool is not None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            seq = next(self._seq)
            self._waiting[seq] = future
        self._pool.submit(seq, kind, payload)
        return seq, future

    def _forget(self, seq: int) -> None:
        with self._lock:
            self._waiting.pop(seq, None)

    def _in_process(self, path: Path, region: Region | None = None) -> PreparedStudy | StudyError:
        with pydicom_silenced():
            return prepare_study(path if region is None else (path, region), self._setup)

    def _collect(self, pool: _WorkerPool) -> None:
        """Hand each finished task to the request that waits for it."""
        while not self._closing.is_set():
            try:
                got = pool.get(timeout=0.5)
            except BaseException as exc:  # noqa: BLE001 - the pool failed: every waiting request learns why
                if self._closing.is_set():
                    return
                log.error("the upload decoder stopped: %s", exc)
                self._broken = exc
                with self._lock:
                    for future in self._waiting.values():
                        with contextlib.suppress(concurrent.futures.InvalidStateError):
                            future.set_exception(exc)
                return
            if got is None:
                continue
            task, result = got
            with self._lock:
                waiting = self._waiting.get(task.seq)
            if waiting is not None:
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # given up on meanwhile
                    waiting.set_result(result)

    def close(self) -> None:
        self._closing.set()
        if self._pool is not None:
            self._pool.close(kill=True)
            self._thread.join(timeout=5)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _acquire(busy: threading.Lock, deadline: float) -> None:
    """Wait for the query lock until ``deadline``.

    Raises
    ------
    _UploadError
        503: the service stayed busy.
    """
    if not busy.acquire(timeout=_left(deadline)):
        raise _UploadError(503, "the service is busy with other queries; try again, or start it with a larger --request-timeout")


