"""Getting instances from a DICOMweb server with WADO-RS, into a local folder.

:func:`fetch_series` streams one series into a folder, one file per instance, as the server
stores it (``transfer-syntax=*``: nothing is transcoded, so the pixels are those a copy of the
files on disk would give). Files are written under a temporary name and renamed, so a folder
never holds half a file. :func:`fetched_study` gets a query study into a temporary folder that
is removed afterwards, for :func:`medsearch.query` or the service.

With a :class:`~medsearch.pacs.partial.SlicePlan` (what an index's engine will read),
:func:`fetch_series` fetches only what the case needs: every header from the series metadata, as
header-only files, and the whole instances of the slices the engine decodes
(:mod:`medsearch.pacs.partial`); a series with multi-frame or mosaic instances, a server that does
not give the metadata, or a case the engine would read whole is fetched whole.

File names are counters (``000001.dcm``), never UIDs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID

from medsearch.errors import InvalidStudyError
from medsearch.pacs.client import DicomWeb, RequestFailed
from medsearch.pacs.listing import RemoteSeries, list_series
from medsearch.pacs.partial import (
    SlicePlan,
    header_only_file,
    metadata_bytes,
    needed_files,
    partial_candidate,
    sop_uid,
)

__all__ = ["Fetched", "fetch_series", "fetch_study_into", "fetched_study"]

log = logging.getLogger(__name__)

# Ask for each instance as stored: a transcoded copy would cost the server time and could change pixels.
_AS_STORED = (("application/dicom", "*"),)
# A metadata request answered with one of these: the server does not give series metadata; fetch the series whole.
_NO_METADATA = frozenset({400, 404, 405, 406, 415, 501})


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_series` wrote: the files (in the order received), the bytes received (instances and
    metadata), the seconds it took, and how many of the files are header-only (their pixels not fetched)."""

    files: tuple[Path, ...]
    n_bytes: int
    seconds: float
    headers_only: int = 0


def fetch_series(server: DicomWeb, series: RemoteSeries, folder: str | Path, *, plan: SlicePlan | None = None) -> Fetched:
    """Write every instance of ``series`` into ``folder`` (created; files already there are replaced).

    With ``plan``, the instances whose pixels the plan does not read are written header-only (see
    :mod:`medsearch.pacs.partial`), where that spares more than half the instances
    (:meth:`SlicePlan.worth_it`); a shorter series is fetched whole, in one request.

    Raises
    ------
    RequestFailed
        The server answered with an HTTP error (after the retries), or an unreadable answer.
    DicomWebAuthError, DicomWebError
        Credentials refused; server unreachable.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spent = 0
    if plan is not None and plan.worth_it(series.n_instances):
        partial, spent = _fetch_needed(server, series, folder, plan)
        if partial is not None:
            files, headers_only = partial
            return Fetched(tuple(files), spent, time.perf_counter() - started, headers_only)
        for stale in folder.iterdir() if folder.is_dir() else ():  # what the try wrote: the whole series replaces it
            stale.unlink()
        folder.mkdir(parents=True, exist_ok=True)

    def get(client: object) -> tuple[list[Path], int]:
        # the whole stream inside the retried call: a connection lost halfway starts the series again
        instances = client.iter_series(series.study_uid, series.series_uid, media_types=_AS_STORED)  # type: ignore[attr-defined]
        return _write_all(instances, folder)

    files, n_bytes = server.call("the retrieval of a series", get)
    if not files:
        raise RequestFailed(f"the DICOMweb server at {server.public_url} sent no instance of a series it listed", None)
    return Fetched(tuple(files), spent + n_bytes, time.perf_counter() - started)


def _fetch_needed(
    server: DicomWeb, series: RemoteSeries, folder: Path, plan: SlicePlan
) -> tuple[tuple[list[Path], int] | None, int]:
    """Fetch the metadata, the first instance whole, the others header-only, then the whole instances
    ``plan`` reads. Returns (the files and how many are header-only, or None: fetch the series whole)
    and the bytes received.

    Raises
    ------
    RequestFailed, DicomWebAuthError, DicomWebError
        As :func:`fetch_series` (a metadata request the server does not serve is not an error).
    """
    try:
        items = server.call(
            "the metadata of a series",
            lambda client: client.retrieve_series_metadata(series.study_uid, series.series_uid),
        )
    except RequestFailed as e:
        if e.status is None or e.status in _NO_METADATA:
            return None, 0
        raise
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return None, 0
    spent = metadata_bytes(items)
    if not partial_candidate(items) or not plan.worth_it(len(items)):
        return None, spent
    paths = [folder / f"{number:06d}.dcm" for number in range(1, len(items) + 1)]
    spent += _fetch_instance(server, series, sop_uid(items[0]), paths[0])
    syntax = _stored_syntax(paths[0])
    if syntax is None:
        return None, spent
    try:
        for item, path in zip(items[1:], paths[1:], strict=True):
            header_only_file(item, path, syntax)
    except Exception as exc:  # noqa: BLE001 - a header that does not convert: the series is fetched whole
        log.debug("a header-only file could not be written (%s); fetching the series whole", type(exc).__name__)
        return None, spent
    needed = needed_files(paths, plan)
    if needed is None:
        return None, spent
    whole = {paths[0]}
    for item, path in zip(items, paths, strict=True):
        if path in needed and path not in whole:
            spent += _fetch_instance(server, series, sop_uid(item), path)
            whole.add(path)
    return (paths, len(paths) - len(whole)), spent


def _fetch_instance(server: DicomWeb, series: RemoteSeries, sop: str, path: Path) -> int:
    """Write one instance, as stored, to ``path``; its bytes."""

    def get(client: object) -> int:
        dataset = client.retrieve_instance(series.study_uid, series.series_uid, sop, media_types=_AS_STORED)  # type: ignore[attr-defined]
        return _write_one(dataset, path)

    return server.call("the retrieval of an instance", get)


def _stored_syntax(path: Path) -> UID | None:
    """The transfer syntax of a fetched file, from its file meta."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    except Exception:  # noqa: BLE001 - no file meta: the series is fetched whole
        return None
    syntax = meta.get("TransferSyntaxUID")
    return UID(str(syntax)) if syntax else None


def _write_all(instances: Iterable[pydicom.Dataset], folder: Path) -> tuple[list[Path], int]:
    files, n_bytes = [], 0
    for number, dataset in enumerate(instances, start=1):
        path = folder / f"{number:06d}.dcm"
        n_bytes += _write_one(dataset, path)
        files.append(path)
    return files, n_bytes


def _write_one(dataset: pydicom.Dataset, path: Path) -> int:
    """Write an instance received to ``path`` (under a temporary name, then renamed); its bytes."""
    partial = path.with_name(f".{path.stem}.part")
    # the bytes the server sent, when the library kept them (pydicom 3 keeps the buffer a dataset was
    # read from): no second serialization, and the file is exactly the server's
    buffer = getattr(dataset, "buffer", None)
    if isinstance(buffer, io.BytesIO):
        partial.write_bytes(buffer.getbuffer())
    else:
        dataset.save_as(partial, enforce_file_format=False)
    os.replace(partial, path)
    return path.stat().st_size


@contextlib.contextmanager
def fetched_study(
    server: DicomWeb | str,
    study_uid: str,
    *,
    series_uid: str | None = None,
    auth_file: str | Path | None = None,
) -> Iterator[Path]:
    """A query study fetched from a DICOMweb server into a temporary folder, removed on leaving the block.

    ``series_uid`` picks one series; without it the study must hold exactly one (a query is one
    series). Use it with :func:`medsearch.query`::

        with fetched_study("http://127.0.0.1:8042/dicom-web", study_uid) as folder:
            result = medsearch.query(folder, "my-index")

    Raises
    ------
    InvalidStudyError
        The study (or series) is not on the server, or the study holds several series and none was picked.
    DicomWebError
        The server cannot be reached, refuses the credentials or fails the retrieval.
    """
    if isinstance(server, str):
        server = DicomWeb(server, auth_file=auth_file)
    folder = Path(tempfile.mkdtemp(prefix="medsearch-dicomweb-"))
    try:
        fetch_study_into(server, study_uid, folder / "series", series_uid=series_uid)
        yield folder / "series"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fetch_study_into(server: DicomWeb, study_uid: str, folder: str | Path, *, series_uid: str | None = None) -> Fetched:
    """Fetch the query series of a study (see :func:`fetched_study`) into ``folder``.

    Raises
    ------
    InvalidStudyError, DicomWebError
        As :func:`fetched_study`.
    """
    listed = list_series(server, study_uid=study_uid)
    if series_uid is not None:
        listed = [s for s in listed if s.series_uid == series_uid]
    if not listed:
        what = "the series (--series-uid) of that study" if series_uid else "the study (--study-uid)"
        raise InvalidStudyError(f"the DICOMweb server at {server.public_url} does not hold {what}; check the UID")
    if len(listed) > 1:
        counts = ", ".join(f"{s.modality or '?'} ({s.n_instances} instances)" for s in listed)
        raise InvalidStudyError(
            f"the study holds {len(listed)} series ({counts}); a query is one series: pick it with --series-uid"
        )
    try:
        return fetch_series(server, listed[0], folder)
    except RequestFailed as e:
        if e.status == 404:
            raise InvalidStudyError(f"the DICOMweb server at {server.public_url} does not hold that series; check the UIDs") from None
        raise
