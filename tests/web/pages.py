"""Helpers of the page's tests: an app with the page mounted, a live server on a loopback port, a
three-slice CT series."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
from conftest import SAMPLE
from fastapi import FastAPI

from medsearch.search import Searcher
from medsearch.web import AuditLog, CaseSlices, Credentials, PageEngine, mount_page

QUERY = SAMPLE / "tcga-luad-ct" / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"
USER, SECRET = "dr-lee", "correct-horse-battery-staple"
LIMIT = 2_000_000  # bytes: a sample slice is about 0.5 MB


def page_app(searcher: Searcher, *, credentials: Credentials | None = None, audit: AuditLog | None = None,
             limit: int = LIMIT, engine: PageEngine | None = None, links: Path | None = None) -> FastAPI:
    """An application with only the page mounted (the service's own routes are tested in tests/test_serve.py)."""
    app = FastAPI()
    mount_page(app, engine or PageEngine(searcher), max_upload_bytes=limit, credentials=credentials, audit=audit,
               links=CaseSlices(links) if links is not None else None)
    return app


def make_series(folder: Path, slices: int = 3) -> list[Path]:
    """A CT series of ``slices`` files: the sample slice, 5 mm apart, with its own UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    series = pydicom.uid.generate_uid()
    paths = []
    for i in range(slices):
        ds = pydicom.dcmread(QUERY)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * i]
        pixels = ds.pixel_array.copy()
        pixels[:16, :16] = 100 * i  # each slice a little different, to tell them apart
        ds.PixelData = pixels.tobytes()
        path = folder / f"slice{i + 1}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


# -- a live server -----------------------------------------------------------------------------------


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread, as ``medsearch serve`` runs it; yields its base URL."""
    import uvicorn

    from medsearch.serve import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
