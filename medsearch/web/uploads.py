"""Receiving a study from the page: one DICOM file, several, or the files of a series folder, in one request.

:func:`receive_files` streams a ``multipart/form-data`` body (every file part) or a raw DICOM body
into a private temporary folder, one file per part, numbered in the order they came
(``0001.dcm``, ``0002.dcm``...): the names the browser sent are not kept, so no folder or file name
of the clinician's disk reaches the disk, a log or an answer. The folder is then read as
``medsearch query FOLDER`` would read it (:func:`~medsearch.io.load_study`).

The whole body is limited (``limit`` bytes, from ``Content-Length`` before anything is read, then
while it streams) and so is the number of files (:data:`MAX_FILES`). :func:`upload_folder` makes the
folder and removes it, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

__all__ = ["MAX_FILES", "Refused", "receive_files", "upload_folder", "upload_name"]

#: The most files one upload may hold (a series of a few thousand slices fits).
MAX_FILES = 5000
_RAW_TYPES = ("application/dicom", "application/octet-stream", "")


class Refused(Exception):
    """A request the page's endpoints refuse: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def upload_folder() -> Iterator[Path]:
    """A new private (``0700``) temporary folder for one upload, removed on exit whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix="medsearch-upload-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload_name(number: int) -> str:
    """The name the ``number``-th file (from 1) of an upload gets in its folder."""
    return f"{number:04d}.dcm"


async def receive_files(request: Request, folder: Path, limit: int) -> int:
    """Stream the request body into ``folder``: each file part of a form, or the raw body, as one file.

    Returns the number of files written.

    Raises
    ------
    Refused
        413 the body is over ``limit`` bytes; 400 it is empty, malformed, a form without a file, or
        has more than :data:`MAX_FILES` files; 415 another content type; 507 the upload cannot be
        stored (a full disk).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Refused(400, "the Content-Length header is not a whole number")
        if int(declared) > limit:
            raise Refused(413, _too_large(limit))
    content_type, params = parse_options_header(request.headers.get("content-type"))
    kind = content_type.decode("latin-1").lower()
    parts: _FileParts | None = None
    raw: BinaryIO | None = None
    write: Callable[[bytes], Any]
    if kind == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise Refused(400, "the multipart body has no boundary; send the files as a multipart/form-data form")
        parts = _FileParts(folder)
        parser = MultipartParser(boundary, cast(Any, parts.callbacks()))
        write = parser.write
    elif kind in _RAW_TYPES:
        raw = open(folder / upload_name(1), "wb")  # closed in the finally below
        write = raw.write
    else:
        raise Refused(
            415,
            f"content type {kind!r} is not accepted; send DICOM files as a multipart/form-data form, "
            "or one file as application/dicom",
        )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Refused(413, _too_large(limit))
            try:
                write(chunk)
            except _TooManyFiles:
                raise Refused(400, f"the upload holds more than {MAX_FILES} files; give one series") from None
            except OSError as e:  # a full disk: not the client's fault, and nothing to parse
                raise Refused(507, f"the service cannot store the upload ({e.strerror or type(e).__name__}); try again later") from e
            except Exception as e:  # python-multipart raises its own errors on a malformed body
                raise Refused(400, f"the multipart body cannot be parsed ({type(e).__name__}); send the files again") from e
    finally:
        if parts is not None:
            parts.close()
        if raw is not None:
            raw.close()
    if parts is not None:
        if parts.count == 0 or parts.size == 0:
            raise Refused(400, "the form holds no file; drop a DICOM file, several, or a series folder")
        return parts.count
    if received == 0:
        raise Refused(400, "the request body is empty; send a DICOM file")
    return 1


class _TooManyFiles(Exception):
    pass


class MultipartParts:
    """Callbacks for python-multipart: collect each part's headers, then hand it to the subclass.

    A subclass says what to do with a part that carries a file (:meth:`_file_part`, given the
    Content-Disposition parameters) and with its bytes (``_part_data``, ``_part_end``). Plain form
    fields are ignored.
    """

    def __init__(self) -> None:
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}

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
        if b"filename" in params:
            self._file_part(params)

    def _file_part(self, params: dict[bytes, bytes]) -> None:
        raise NotImplementedError

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        raise NotImplementedError

    def _part_end(self) -> None:
        raise NotImplementedError


class _FileParts(MultipartParts):
    """Write each file part of a form to its own numbered file."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.count = 0
        self.size = 0
        self._sink: BinaryIO | None = None

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _file_part(self, params: dict[bytes, bytes]) -> None:
        if self.count >= MAX_FILES:
            raise _TooManyFiles
        self.count += 1
        fd = os.open(self.folder / upload_name(self.count), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._sink = os.fdopen(fd, "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink.write(data[start:end])
            self.size += end - start

    def _part_end(self) -> None:
        self.close()


def _too_large(limit: int) -> str:
    return (
        f"the upload is larger than {limit / 1e6:g} MB; give one series, or start the service with a larger "
        "--max-upload-mb"
    )
