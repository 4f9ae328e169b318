"""A small HTTP JSON API that keeps an index and its encoder loaded: ``medsearch serve INDEX``.

A cold ``medsearch query`` spends most of its time importing libraries and loading the encoder;
a service pays that once. Endpoints:

* ``POST /query?k=10``: a DICOM file as the raw request body (``Content-Type: application/dicom``
  or ``application/octet-stream``) or as a ``multipart/form-data`` upload (the first file part).
  Returns the JSON of ``medsearch query --json``:
  ``{"query", "distance", "results": [{"rank", "case_id", "distance", "metadata"}]}``.
  ``where`` (repeatable, URL-encoded) keeps only the cases whose metadata match, as
  ``medsearch query --where``: ``/query?k=5&where=modality%3DCT&where=age%3E%3D60``.
  ``exclude_same_patient``, ``one_per_patient`` and ``collapse_copies`` (booleans, the last on by
  default) are :meth:`~medsearch.search.Searcher.search`'s: ``/query?exclude_same_patient=true``
  leaves out the upload's own patient (the service needs the index's site key for it).
  ``slices=40:60`` and ``roi=X0,Y0,X1,Y1`` make it a region query, and ``rerank`` (boolean)
  chooses the late-interaction re-ranking, as ``medsearch query --slices/--roi/--rerank``; each
  result then carries ``best_slice``, ``best_slice_mm``, ``query_slice``, ``query_slice_mm`` and
  ``slice_score`` (where the index keeps slice vectors). With ``create_app(..., dicomweb=URL)``
  (``serve --dicomweb``), ``/query?study_uid=UID[&series_uid=UID]`` and no body queries with that
  study of the PACS (:mod:`medsearch.serve.pacs`); the UIDs appear in no answer or log.
* ``GET /health``: ``{"status": "ok"}`` once the index and encoder are loaded.
* ``GET /info``: what the index holds (as ``medsearch info --json``) and how the encoder runs.
* ``GET /``: the page for clinicians, and the endpoints it calls (:mod:`medsearch.web`).

Every error is a 4xx (or 500) with a one-line ``{"error": "..."}``, and the service keeps serving.
A body larger than ``max_upload_mb`` is refused from its ``Content-Length`` before it is read, and
while it streams otherwise. Uploads go to a temporary file that is removed after the query, whatever
happens. Neither the log nor an error message carries a value read from an upload.

Memory and time stay bounded whatever an upload holds. The study is decoded and preprocessed in a
worker process (:class:`_Decoder`), whose memory is capped (``worker_memory_gib``) and which is
stopped after ``request_timeout`` seconds: the query lock is held only while the study is encoded
and searched, so ``/health`` and the other queries never wait for a hostile upload, and a decoder
that misbehaves costs its worker, not the service. A request that does not finish within
``request_timeout`` gets a 408 (its upload did not arrive), a 422 (its study was not decoded in
time) or a 503 (the service stayed busy). :func:`serve` also closes a connection that sends no
complete request headers within ``header_timeout`` seconds, and answers a request that is not valid
HTTP (a ``Content-Length`` that is not a number...) with the same JSON error as the others.

The index may grow while the service runs: each request first checks whether ``medsearch index``
has committed since (one ``stat``) and, if so, loads the new snapshot before answering. A new index
that cannot be loaded (damaged, or built with another encoder) is logged once, and the service
keeps answering from the one it has.

It binds to 127.0.0.1 by default. With ``credentials`` every route but the sign-in page and
``/health`` needs them, and with ``audit`` every query is written to the audit log; both are
:mod:`medsearch.web`'s, and :func:`serve` refuses a non-loopback address without credentials.

Example::

    medsearch serve my-index --port 8000 &
    curl -s --data-binary @study.dcm -H 'Content-Type: application/dicom' 'http://127.0.0.1:8000/query?k=5'
    curl -s -F file=@study.dcm 'http://127.0.0.1:8000/query?k=5'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsearch.config import Config
from medsearch.embedding import Region, is_box, pool_slices, query_slices
from medsearch.errors import ConfigError, EncoderMismatchError, InvalidStudyError, MedsearchError
from medsearch.filters import Filter, parse_filters
from medsearch.indexing.cases import PreparedStudy
from medsearch.io import CaseRef, SkippedFile, Volume
from medsearch.pacs import DicomWeb
from medsearch.search import Searcher
from medsearch.serve.decoder import _acquire, _Decoder, _InternalError, _left
from medsearch.serve.http import _error, _json, _protocol, _receive, _study_error, _UploadError
from medsearch.serve.pacs import fetch_query_study, hide_uids_in_access_log
from medsearch.web import AUDIT_FILE, AuditLog, CaseSlices, Credentials, PageEngine, Refused, check_exposure, mount_page

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_MAX_UPLOAD_MB", "DEFAULT_REQUEST_TIMEOUT_S", "create_app", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
_MAX_K = 1000

def create_app(
    index_dir: str | Path,
    *,
    config: Config | str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    searcher: Searcher | None = None,
    warm_up: bool = True,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    decode_workers: int = 1,
    worker_memory_gib: float | None = 2.0,
    load: Callable[[CaseRef], tuple[Volume, list[SkippedFile]]] | None = None,
    credentials: Credentials | None = None,
    audit_log: str | Path | AuditLog | None = None,
    dicomweb: DicomWeb | str | None = None,
    links: str | Path | None = None,
) -> FastAPI:
    """The FastAPI application serving one index; loads the index and encoder and starts the decoders now.

    Parameters
    ----------
    index_dir
        An index built by ``medsearch index``.
    config
        Must match the index's settings (default: the index's own); see :class:`Searcher`.
    max_upload_mb
        The largest request body accepted, in MB (10^6 bytes).
    searcher
        An open :class:`Searcher` to use instead of opening ``index_dir`` again.
    warm_up
        Embed one blank image now, so that the first query does not pay for the runtime's set-up.
    request_timeout
        Seconds a query may take: to arrive, to be decoded (its worker is stopped after that) and to
        wait for its turn at the encoder.
    decode_workers
        Worker processes that decode and preprocess uploads (0: in this process, without the memory
        cap or the time limit on decoding).
    worker_memory_gib
        Memory a decode worker may allocate beyond what it holds once started (None: no cap).
    load
        The decoder of an upload's case (default :func:`~medsearch.io.load_volume`); it runs in the
        worker processes, so it must be picklable (a module-level function).
    credentials
        Who may use the service (:class:`~medsearch.web.Credentials`); None: everyone who reaches it.
    audit_log
        Where every query is recorded (:class:`~medsearch.web.AuditLog`); None: nowhere.
    dicomweb
        A PACS (DICOMweb root URL, or a :class:`~medsearch.pacs.DicomWeb`): ``POST /query?study_uid=UID``
        (and ``series_uid``) then fetches the study from it instead of reading an upload.
    links
        The index's link table (``medsearch index --links``, site-only): the page then shows each
        result's best-matching slice, read from the archive, instead of its stored thumbnail.

    The worker processes stop with the application (its lifespan), or with this process.

    Raises
    ------
    IndexNotFoundError, IndexCorruptError, EncoderMismatchError, ConfigError
        The index cannot be opened with these settings, or a limit is not positive.
    """
    if max_upload_mb <= 0:
        raise ConfigError(f"max_upload_mb must be positive, got {max_upload_mb}; give a size in MB such as 512")
    if request_timeout <= 0:
        raise ConfigError(f"request_timeout must be positive, got {request_timeout}; give seconds such as 60")
    if decode_workers < 0:
        raise ConfigError(f"decode_workers must be 0 or more, got {decode_workers}")
    started = time.perf_counter()
    case_slices = CaseSlices(links) if links is not None else None  # a missing link table: before anything loads
    searcher = searcher or Searcher(index_dir, config=config)
    audit = AuditLog(audit_log) if isinstance(audit_log, (str, Path)) else audit_log  # before the warm-up: fail early
    if warm_up:
        encoder_info = searcher.encoder.info
        size = searcher.config.preprocess.size
        channels = encoder_info.in_channels
        if encoder_info.spatial_dims == 3:
            shape: tuple[int, ...] = (1, channels, *searcher.config.encoder.volume_shape)
        else:
            shape = (1, channels, size, size)
        searcher.encoder.embed(np.zeros(shape, dtype=np.float32))
    limit = int(max_upload_mb * 1_000_000)
    details = {
        **searcher.info(),
        "encoder_runtime": searcher.encoder.runtime,
        "encoder_device": searcher.encoder.device.type,
        "max_upload_bytes": limit,
    }
    # One query at a time: the encoder already uses every core, and a second query in parallel would
    # only slow both down. Decoding happens before, in the workers, outside this lock.
    busy = threading.Lock()
    decoder = _Decoder(searcher, workers=decode_workers, timeout=request_timeout, memory_gib=worker_memory_gib, load=load)
    details["decode_workers"] = decoder.workers
    if case_slices is not None:  # the archive's slices are read in the same bounded workers as uploads
        case_slices.run = decoder.run
    pacs = DicomWeb(dicomweb) if isinstance(dicomweb, str) else dicomweb
    log.info("loaded index %s (%d cases) in %.1f s", index_dir, details["cases"], time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            decoder.close()

    app = FastAPI(title="medsearch", version=_version(), docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.decoder = decoder

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query") or "request"
        return _error(422, f"bad value for {where}: {first.get('msg', 'invalid')}")

    problem = ""  # the last reload failure, logged once

    def refresh() -> None:
        """Pick up a commit of ``medsearch index`` (called under ``busy``)."""
        nonlocal problem
        try:
            if searcher.refresh():
                details.update(searcher.info())
                log.info("reloaded index %s: %d cases", searcher.index_dir, details["cases"])
            problem = ""
        except MedsearchError as e:  # a broken or incompatible new index: keep serving the one loaded
            if str(e) != problem:
                log.warning("still serving the index loaded before: %s", e)
            problem = str(e)

    def refresh_if_idle() -> None:
        if busy.acquire(blocking=False):  # never make a health check wait for a running query
            try:
                refresh()
            finally:
                busy.release()

    @app.get("/health")
    async def health() -> Response:
        await run_in_threadpool(refresh_if_idle)
        return _json({"status": "ok", "cases": details["cases"]})

    @app.get("/info")
    async def info() -> Response:
        await run_in_threadpool(refresh_if_idle)
        return _json(details)

    @app.post("/query")
    async def query(
        request: Request,
        k: int = 10,
        where: Annotated[list[str] | None, Query()] = None,
        exclude_same_patient: bool = False,
        one_per_patient: bool = False,
        collapse_copies: bool = True,
        study_uid: str | None = None,
        series_uid: str | None = None,
        slices: str | None = None,
        roi: str | None = None,
        rerank: bool | None = None,
    ) -> Response:
        deadline = time.monotonic() + request_timeout
        by_uid = study_uid is not None or series_uid is not None  # a study of the PACS, not an upload
        fetched = contextlib.ExitStack()
        if not 1 <= k <= _MAX_K:
            return _error(422, f"k must be between 1 and {_MAX_K}, got {k}")
        try:  # a bad filter, or a missing site key, fails before the upload is read
            filters = await run_in_threadpool(_filters, searcher, busy, where, refresh, deadline)
            region = Region.parse(slices=slices, roi=roi)  # a region query: a slab and/or a box
            if exclude_same_patient:
                await run_in_threadpool(searcher.site_key)
        except _UploadError as e:
            return _error(e.status, str(e))
        except MedsearchError as e:
            return _error(422, str(e))
        fd, name = tempfile.mkstemp(prefix="medsearch-upload-", suffix=".dcm")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    filename = None if by_uid else await asyncio.wait_for(_receive(request, sink, limit), _left(deadline))
                except TimeoutError:
                    raise _UploadError(
                        408,
                        f"the upload did not arrive within {request_timeout:g} s; send it again, or start the "
                        "service with a larger --request-timeout",
                    ) from None
            if by_uid:
                path.unlink()
                path, filename = await fetch_query_study(pacs, study_uid, series_uid, fetched), "a PACS study"
            prepared = await decoder.prepare(path, deadline, region)
            options: dict[str, Any] = {"one_per_patient": one_per_patient, "collapse_copies": collapse_copies,
                                       "rerank": True if region is not None and rerank is None else rerank}
            if exclude_same_patient:  # the upload's patient, from its header (read, not decoded)
                options["exclude_patients"] = (await run_in_threadpool(searcher.patient_of, path),)
            result = await run_in_threadpool(_search, searcher, busy, prepared, k, filters, refresh, deadline, options, region)
        except _UploadError as e:
            return _error(e.status, str(e))
        except InvalidStudyError as e:
            return _error(*_study_error(e, path))
        except EncoderMismatchError as e:
            return _error(409, str(e).replace(str(path), "the upload"))
        except MedsearchError as e:
            return _error(422, str(e).replace(str(path), "the upload"))
        except _InternalError as e:
            log.error("query failed with %s", e)
            return _error(500, f"the query failed ({e}); see the service log")
        except Exception as e:  # noqa: BLE001 - keep serving; the message may quote the file's contents, so log its type only
            log.error("query failed with %s", type(e).__name__)
            return _error(500, f"the query failed ({type(e).__name__}); see the service log")
        finally:
            fetched.close()  # a fetched study's folder (path is then gone)
            path.unlink(missing_ok=True)
        data = result.to_dict()
        data["query"]["path"] = filename or "upload"
        return _json(data)

    async def prepare(path: Path, deadline: float, region: Region | None = None) -> PreparedStudy:  # the page's uploads
        try:  # the same bounded decoder
            return await decoder.prepare(path, deadline, region)
        except _UploadError as e:
            raise Refused(e.status, str(e)) from e
        except _InternalError as e:
            log.error("a page query failed with %s", e)
            raise Refused(500, f"the query failed ({e}); see the service log") from e

    engine = PageEngine(searcher, lock=busy, refresh=refresh, prepare=prepare, timeout=request_timeout)
    mount_page(app, engine, max_upload_bytes=limit, credentials=credentials, audit=audit, audited_paths=("/query",),
               dicomweb=pacs, links=case_slices)
    return app


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: Config | str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    log_level: str = "info",
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    worker_memory_gib: float | None = 2.0,
    decode_workers: int = 1,
    auth_file: str | Path | None = None,
    audit_log: str | Path | None = None,
    insecure_no_auth: bool = False,
    dicomweb: str | None = None,
    dicomweb_auth_file: str | Path | None = None,
    links: str | Path | None = None,
) -> None:
    """Load the index and encoder, then answer HTTP queries until interrupted.

    ``request_timeout``, ``worker_memory_gib`` and ``decode_workers`` are :func:`create_app`'s; a
    connection that sends no complete request headers within ``header_timeout`` seconds is closed.
    Credentials come from ``auth_file`` and ``MEDSEARCH_AUTH_TOKEN``; every query goes to
    ``audit_log`` (default ``INDEX/local/audit.jsonl``). With ``dicomweb`` (a PACS's DICOMweb root,
    its credentials from ``dicomweb_auth_file`` or the environment), ``POST /query?study_uid=...``
    fetches the study from it.
    With ``links`` (the index's link table), the page shows the slice of each result that matched.

    Raises
    ------
    ConfigError
        ``host`` is not loopback and there are no credentials (unless ``insecure_no_auth``), checked
        before anything loads or binds; the auth file or the audit log cannot be used.
    IndexNotFoundError, IndexCorruptError, EncoderMismatchError
        The index cannot be opened with these settings.
    """
    import uvicorn

    credentials = Credentials.load(auth_file)
    check_exposure(host, credentials, insecure_no_auth=insecure_no_auth)
    pacs = DicomWeb(dicomweb, auth_file=dicomweb_auth_file) if dicomweb else None  # a bad URL or credentials file: before anything loads
    hide_uids_in_access_log()
    app = create_app(index_dir, config=config, max_upload_mb=max_upload_mb, request_timeout=request_timeout,
                     worker_memory_gib=worker_memory_gib, decode_workers=decode_workers, credentials=credentials,
                     audit_log=audit_log if audit_log is not None else Path(index_dir) / AUDIT_FILE, dicomweb=pacs,
                     links=links)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level, header_timeout=header_timeout)).run()


def uvicorn_config(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
) -> Any:  # a uvicorn.Config
    """How :func:`serve` runs ``app``: uvicorn's h11 protocol with a time limit on request headers and
    JSON answers to requests that are not valid HTTP (:func:`_protocol`), idle keep-alive connections
    closed after 5 s."""
    import uvicorn

    if header_timeout <= 0:
        raise ConfigError(f"header_timeout must be positive, got {header_timeout}; give seconds such as 10")
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_protocol(header_timeout),
                          timeout_keep_alive=5, lifespan="on")



def _filters(
    searcher: Searcher, busy: threading.Lock, where: list[str] | None, refresh: Callable[[], None], deadline: float
) -> tuple[Filter, ...]:
    """``where`` parsed and checked against the index (under the lock: the store caches masks)."""
    filters = parse_filters(where)
    _acquire(busy, deadline)
    try:
        refresh()
        searcher.store.matching(filters)
    finally:
        busy.release()
    return filters


def _search(
    searcher: Searcher,
    busy: threading.Lock,
    prepared: PreparedStudy,
    k: int,
    filters: Sequence[Filter],
    refresh: Callable[[], None],
    deadline: float,
    options: dict[str, Any] | None = None,
    region: Region | None = None,
) -> Any:
    """Encode a prepared study and search the index, as :meth:`Searcher.search` does (under the lock).

    ``options``: further keywords of :meth:`Searcher.search_vector` (the exclusions, ``rerank``);
    ``region``: the region of the study ``prepared`` holds, recorded in the answer.
    """
    _acquire(busy, deadline)
    try:
        refresh()
        pooled, slices = query_slices(searcher.encoder.embed(prepared.images), prepared.slice_indices, prepared.gap_mm,
                                      tiles=prepared.tiles, cropped=is_box(region))
        vector = pool_slices(pooled, searcher.config.preprocess.pool)
        info: dict[str, Any] = {"path": "upload", "modality": prepared.modality, "n_slices": prepared.n_slices}
        if region is not None:  # with the box as the encoder saw it, as Searcher.search records it
            info["region"] = prepared.region if prepared.region is not None else region.to_dict()
        if filters:
            info["where"] = [str(f) for f in filters]
        return searcher.search_vector(vector, k=k, where=filters, query=info, slices=slices, **(options or {}))
    finally:
        busy.release()



def _version() -> str:
    from medsearch import __version__

    return __version__
