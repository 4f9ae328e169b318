"""A small HTTP JSON API that keeps an index and its encoder loaded: ``medsearch serve INDEX``.

A cold ``medsearch query`` spends most of its time importing libraries and loading the encoder;
a service pays that once. Endpoints:

* ``POST /query?k=10``: a DICOM file as the raw request body (``Content-Type: application/dicom``
  or ``application/octet-stream``) or as a ``multipart/form-data`` upload (the first file part).
  Returns the JSON of ``medsearch query --json``:
  ``{"query", "distance", "results": [{"rank", "case_id", "distance", "metadata"}]}``.
  ``where`` (repeatable, URL-encoded) keeps only the cases whose metadata match, as
  ``medsearch query --where``: ``/query?k=5&where=modality%3DCT&where=age%3E%3D60``.
* ``GET /health``: ``{"status": "ok"}`` once the index and encoder are loaded.
* ``GET /info``: what the index holds (as ``medsearch info --json``) and how the encoder runs.

Every error is a 4xx (or 500) with a one-line ``{"error": "..."}``, and the service keeps serving.
A body larger than ``max_upload_mb`` is refused from its ``Content-Length`` before it is read, and
while it streams otherwise. Uploads go to a temporary file that is removed after the query, whatever
happens. Neither the log nor an error message carries a value read from an upload.

The index may grow while the service runs: each request first checks whether ``medsearch index``
has committed since (one ``stat``) and, if so, loads the new snapshot before answering. A new index
that cannot be loaded (damaged, or built with another encoder) is logged once, and the service
keeps answering from the one it has.

It binds to 127.0.0.1 by default and has no authentication: put it behind your own gateway before
binding it to another address.

Example::

    medsearch serve my-index --port 8000 &
    curl -s --data-binary @study.dcm -H 'Content-Type: application/dicom' 'http://127.0.0.1:8000/query?k=5'
    curl -s -F file=@study.dcm 'http://127.0.0.1:8000/query?k=5'
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, cast

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsearch.config import Config
from medsearch.errors import EncoderMismatchError, InvalidStudyError, MedsearchError
from medsearch.filters import Filter, parse_filters
from medsearch.search import Searcher

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "create_app", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 512
_MAX_K = 1000
_RAW_TYPES = ("application/dicom", "application/octet-stream", "")


class _UploadError(Exception):
    """A request the service refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    index_dir: str | Path,
    *,
    config: Config | str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    searcher: Searcher | None = None,
    warm_up: bool = True,
) -> FastAPI:
    """The FastAPI application serving one index; loads the index and encoder now.

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

    Raises
    ------
    IndexNotFoundError, IndexCorruptError, EncoderMismatchError, ConfigError
        The index cannot be opened with these settings.
    """
    if max_upload_mb <= 0:
        from medsearch.errors import ConfigError

        raise ConfigError(f"max_upload_mb must be positive, got {max_upload_mb}; give a size in MB such as 512")
    started = time.perf_counter()
    searcher = searcher or Searcher(index_dir, config=config)
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
    # only slow both down.
    busy = threading.Lock()
    log.info("loaded index %s (%d cases) in %.1f s", index_dir, details["cases"], time.perf_counter() - started)

    app = FastAPI(title="medsearch", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)

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
    async def query(request: Request, k: int = 10, where: Annotated[list[str] | None, Query()] = None) -> Response:
        if not 1 <= k <= _MAX_K:
            return _error(422, f"k must be between 1 and {_MAX_K}, got {k}")
        try:  # a bad filter fails before the upload is read
            filters = await run_in_threadpool(_filters, searcher, busy, where, refresh)
        except MedsearchError as e:
            return _error(422, str(e))
        fd, name = tempfile.mkstemp(prefix="medsearch-upload-", suffix=".dcm")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                filename = await _receive(request, sink, limit)
            result = await run_in_threadpool(_search, searcher, busy, path, k, filters, refresh)
        except _UploadError as e:
            return _error(e.status, str(e))
        except InvalidStudyError as e:
            return _error(*_study_error(e, path))
        except EncoderMismatchError as e:
            return _error(409, str(e).replace(str(path), "the upload"))
        except MedsearchError as e:
            return _error(422, str(e).replace(str(path), "the upload"))
        except Exception as e:  # noqa: BLE001 - keep serving; the message may quote the file's contents, so log its type only
            log.error("query failed with %s", type(e).__name__)
            return _error(500, f"the query failed ({type(e).__name__}); see the service log")
        finally:
            path.unlink(missing_ok=True)
        data = result.to_dict()
        data["query"]["path"] = filename or "upload"
        return _json(data)

    return app


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: Config | str | Path | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    log_level: str = "info",
) -> None:
    """Load the index and encoder, then answer HTTP queries until interrupted.

    Raises
    ------
    IndexNotFoundError, IndexCorruptError, EncoderMismatchError, ConfigError
        The index cannot be opened with these settings.
    """
    import uvicorn

    app = create_app(index_dir, config=config, max_upload_mb=max_upload_mb)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# -- helpers ----------------------------------------------------------------------------------------


def _filters(
    searcher: Searcher, busy: threading.Lock, where: list[str] | None, refresh: Callable[[], None]
) -> tuple[Filter, ...]:
    """``where`` parsed and checked against the index (under the lock: the store caches masks)."""
    filters = parse_filters(where)
    with busy:
        refresh()
        searcher.store.matching(filters)
    return filters


def _search(
    searcher: Searcher, busy: threading.Lock, path: Path, k: int, filters: Sequence[Filter], refresh: Callable[[], None]
) -> Any:
    with busy:
        refresh()
        return searcher.search(path, k=k, where=filters)


async def _receive(request: Request, sink: Any, limit: int) -> str:
    """Stream the request body (raw or the first file of a multipart form) into ``sink``.

    Returns the upload's file name (its last component) when the form gave one.

    Raises
    ------
    _UploadError
        The body is too large, empty, of another content type, or a form without a file.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _UploadError(400, "the Content-Length header is not a whole number")
        if int(declared) > limit:
            raise _UploadError(413, _too_large(limit))
    content_type, params = parse_options_header(request.headers.get("content-type"))
    kind = content_type.decode("latin-1").lower()
    write: Callable[[bytes], Any]
    form: _FilePart | None = None
    if kind == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise _UploadError(400, "the multipart body has no boundary; send the file with curl -F file=@study.dcm")
        form = _FilePart(sink)
        parser = MultipartParser(boundary, cast(Any, form.callbacks()))
        write = parser.write
    elif kind in _RAW_TYPES:
        write = sink.write
    else:
        raise _UploadError(
            415,
            f"content type {kind!r} is not accepted; send the DICOM file as application/dicom, "
            "application/octet-stream or a multipart/form-data upload",
        )
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _UploadError(413, _too_large(limit))
        try:
            write(chunk)
        except Exception as e:  # python-multipart raises its own errors on a malformed body
            raise _UploadError(400, f"the multipart body cannot be parsed ({type(e).__name__}); send one file") from e
    if form is not None:
        if form.size == 0:
            raise _UploadError(400, "the form holds no file; send the DICOM file with curl -F file=@study.dcm")
        return form.filename
    if received == 0:
        raise _UploadError(400, "the request body is empty; send a DICOM file")
    return ""


class _FilePart:
    """Callbacks for python-multipart that copy the first file part of a form into ``sink``."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.size = 0
        self.filename = ""
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._state = "waiting"  # waiting -> copying -> done

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if self._state == "waiting" and b"filename" in params:
            self._state = "copying"
            # The base name only: a client's folder names are no business of the service.
            self.filename = PurePath(params[b"filename"].decode("utf-8", "replace").replace("\\", "/")).name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._state == "copying":
            self.sink.write(data[start:end])
            self.size += end - start

    def _part_end(self) -> None:
        if self._state == "copying":
            self._state = "done"


def _study_error(error: InvalidStudyError, path: Path) -> tuple[int, str]:
    """415 for a file that is not DICOM at all, 422 for a DICOM file medsearch cannot use."""
    message = str(error).replace(str(path), "the upload")
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        head = b""
    if head[128:132] != b"DICM" and "not a DICOM file" in message:
        return 415, message
    return 422, message


def _too_large(limit: int) -> str:
    return f"the upload is larger than {limit / 1e6:g} MB; send a single DICOM file, or start the service with a larger --max-upload-mb"


def _json(data: Any, status: int = 200) -> Response:
    # The same encoding as `medsearch query --json` (numpy scalars and dates as strings).
    return Response(json.dumps(data, default=str), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": " ".join(message.split())}, status)


def _version() -> str:
    from medsearch import __version__

    return __version__
