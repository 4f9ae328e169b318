"""How ``medsearch serve`` speaks HTTP: uploads streamed in with a size limit, JSON answers and errors,
and uvicorn's h11 protocol with a header timeout and JSON answers to malformed requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, cast

import h11
from fastapi import Request
from fastapi.responses import Response
from python_multipart.multipart import MultipartParser, parse_options_header
from uvicorn.protocols.http.h11_impl import H11Protocol

from medsearch.errors import InvalidStudyError
from medsearch.web.uploads import MultipartParts

_RAW_TYPES = ("application/dicom", "application/octet-stream", "")


class _UploadError(Exception):
    """A request the service refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status



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


class _FilePart(MultipartParts):
    """Copy the first file part of a form into ``sink``."""

    def __init__(self, sink: Any) -> None:
        super().__init__()
        self.sink = sink
        self.size = 0
        self.filename = ""
        self._state = "waiting"  # waiting -> copying -> done

    def _file_part(self, params: dict[bytes, bytes]) -> None:
        if self._state == "waiting":
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


def _protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with two changes: a connection that sends no complete request headers
    within ``header_timeout`` seconds (after it opens, or after its last answer) is closed, and a
    request that is not valid HTTP gets the JSON error of every other answer, not plain text.

    h11 checks the request line and headers (a ``Content-Length`` that is not a number) before the
    application sees the request, so this is where that answer can be made.
    """

    class _Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn annotates a Transport
            self._wait_for_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": "the request is not valid HTTP (a malformed request line or header, such as "
                                        "a Content-Length that is not a whole number); send a well-formed request"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                output = self.conn.send(event)
                if output:
                    self.transport.write(output)
            self.transport.close()

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return _Protocol


