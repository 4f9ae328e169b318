"""A real Orthanc for the tests: its own configuration, storage and loopback port; started and stopped here.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``scripts/setup.sh test`` installs them as
root). The system service the package may start is left alone: each :class:`Orthanc` runs its own
``Orthanc`` binary on a free loopback port with remote access off, storage in a temporary folder
and the DICOMweb plugin loaded by path; with ``users`` it asks for HTTP basic credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import requests

PLUGIN_PLACES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    found = [p for p in PLUGIN_PLACES if os.path.exists(p)]
    found += sorted(str(p) for p in Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")) if Path("/usr/lib/orthanc").is_dir() else []
    return found[0] if found else None


def require_orthanc() -> tuple[str, str]:
    """The Orthanc binary and DICOMweb plugin; a test without them fails under CI and is skipped elsewhere."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    missing = "the Orthanc binary" if not binary else "the Orthanc DICOMweb plugin"
    reason = f"{missing} is not installed (as root: apt-get install orthanc orthanc-dicomweb, or scripts/setup.sh test)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc process: ``url`` is its REST root, ``dicomweb`` its DICOMweb root."""

    def __init__(self, folder: Path, *, users: dict[str, str] | None = None) -> None:
        self.binary, self.plugin = require_orthanc()
        self.folder = folder
        self.users = users
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.process: subprocess.Popen[bytes] | None = None
        self.auth = next(iter(users.items())) if users else None

    def start(self, timeout: float = 60.0) -> Orthanc:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medsearch-tests",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users or {},
            "Plugins": [self.plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "SaveJobs": False,
            "HttpThreadsCount": 8,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([self.binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def upload(self, paths: Iterable[Path]) -> int:
        """Store DICOM files through the REST API (``POST /instances``); returns how many were stored."""
        n = 0
        with requests.Session() as session:
            for path in paths:
                answer = session.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
                answer.raise_for_status()
                n += 1
        return n

    def statistics(self) -> dict:
        return requests.get(f"{self.url}/statistics", auth=self.auth, timeout=10).json()

    def stop(self, *, fast: bool = False) -> None:
        """Stop the server: as its service would be (SIGTERM), or at once (``fast``: a test's storage is thrown away)."""
        if self.process is not None and self.process.poll() is None:
            if fast:
                self.process.kill()
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
