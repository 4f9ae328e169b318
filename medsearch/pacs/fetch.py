"""Getting instances from a DICOMweb server with WADO-RS, into a local folder.

:func:`fetch_series` streams one series into a folder, one file per instance, as the server
stores it (``transfer-syntax=*``: nothing is transcoded, so the pixels are those a copy of the
files on disk would give). Files are written under a temporary name and renamed, so a folder
never holds half a file. :func:`fetched_study` gets a query study into a temporary folder that
is removed afterwards, for :func:`medsearch.query` or the service.

File names are counters (``000001.dcm``), never UIDs.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from medsearch.errors import InvalidStudyError
from medsearch.pacs.client import DicomWeb, RequestFailed
from medsearch.pacs.listing import RemoteSeries, list_series

__all__ = ["Fetched", "fetch_series", "fetch_study_into", "fetched_study"]

# Ask for each instance as stored: a transcoded copy would cost the server time and could change pixels.
_AS_STORED = (("application/dicom", "*"),)


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_series` wrote: the files (in the order received), their bytes, the seconds it took."""

    files: tuple[Path, ...]
    n_bytes: int
    seconds: float


def fetch_series(server: DicomWeb, series: RemoteSeries, folder: str | Path) -> Fetched:
    """Write every instance of ``series`` into ``folder`` (created; files already there are replaced).

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

    def get(client: object) -> tuple[list[Path], int]:
        # the whole stream inside the retried call: a connection lost halfway starts the series again
        instances = client.iter_series(series.study_uid, series.series_uid, media_types=_AS_STORED)  # type: ignore[attr-defined]
        return _write_all(instances, folder)

    files, n_bytes = server.call("the retrieval of a series", get)
    if not files:
        raise RequestFailed(f"the DICOMweb server at {server.public_url} sent no instance of a series it listed", None)
    return Fetched(tuple(files), n_bytes, time.perf_counter() - started)


def _write_all(instances: Iterable[pydicom.Dataset], folder: Path) -> tuple[list[Path], int]:
    files, n_bytes = [], 0
    for number, dataset in enumerate(instances, start=1):
        path = folder / f"{number:06d}.dcm"
        partial = folder / f".{number:06d}.part"
        # the bytes the server sent, when the library kept them (pydicom 3 keeps the buffer a dataset was
        # read from): no second serialization, and the file is exactly the server's
        buffer = getattr(dataset, "buffer", None)
        if isinstance(buffer, io.BytesIO):
            partial.write_bytes(buffer.getbuffer())
        else:
            dataset.save_as(partial, enforce_file_format=False)
        os.replace(partial, path)
        files.append(path)
        n_bytes += path.stat().st_size
    return files, n_bytes


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
