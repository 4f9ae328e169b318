"""Hostile paths for archive tests: names that are not UTF-8, links to series folders, link loops,
broken links, FIFOs and sockets.

Each generator makes one object under a folder and returns its path; where the file system or the
platform cannot make it (no ``mkfifo``, no symbolic links, a file system that refuses a name that is
not UTF-8), it skips the calling test with the reason, so a test never fails for the machine's sake.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Latin-1 bytes, as an old Windows or PACS export writes them: not valid UTF-8.
NON_UTF8_NAME = b"caf\xe9-Doe^J\xf6rg.dcm"
NON_UTF8_FOLDER = b"s\xe9rie-\xff"


def non_utf8_copy(source: Path, folder: Path, name: bytes = NON_UTF8_NAME) -> Path:
    """A copy of ``source`` in ``folder`` under a name that is not valid UTF-8 (Python sees it with
    surrogate escapes, as ``os.listdir`` gives it)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = os.path.join(os.fsencode(folder), name)
    try:
        with open(target, "wb") as f:
            f.write(source.read_bytes())
    except OSError as e:  # e.g. a file system that only takes UTF-8 names
        pytest.skip(f"this file system cannot hold a name that is not UTF-8 ({e.strerror})")
    return Path(os.fsdecode(target))


def symlink(target: Path, link: Path, *, is_dir: bool = False) -> Path:
    """A symbolic link ``link`` -> ``target`` (which need not exist)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target, link, target_is_directory=is_dir)
    except (OSError, NotImplementedError) as e:
        pytest.skip(f"symbolic links cannot be made here ({e})")
    return link


def linked_series(series: Path, archive: Path, name: str = "linked-series") -> Path:
    """The folder ``series`` (kept outside the archive) reached from the archive through a link."""
    return symlink(series, archive / name, is_dir=True)


def loop_to_parent(folder: Path, name: str = "loop") -> Path:
    """A link in ``folder`` that leads back to the folder above it: walking it would never end."""
    return symlink(Path(".."), folder / name, is_dir=True)


def self_loop(folder: Path, name: str = "self") -> Path:
    """A link that names itself: every stat of it fails with ELOOP."""
    return symlink(Path(name), folder / name)


def broken_link(folder: Path, name: str = "broken.dcm") -> Path:
    """A link whose target does not exist."""
    return symlink(folder / "no-such-file.dcm", folder / name)


def fifo(folder: Path, name: str = "pipe.dcm") -> Path:
    """A named pipe: opening it for reading blocks until a writer comes, so it must never be opened."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("os.mkfifo is not available on this platform")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    try:
        os.mkfifo(path)
    except OSError as e:
        pytest.skip(f"this file system cannot hold a FIFO ({e.strerror})")
    return path


@contextmanager
def unix_socket(folder: Path, name: str = "sock.dcm") -> Iterator[Path]:
    """A listening Unix socket file, removed on exit (its path must fit in about 100 bytes)."""
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("Unix sockets are not available on this platform")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            server.bind(str(path))
        except OSError as e:
            pytest.skip(f"a Unix socket cannot be made at {path} ({e.strerror})")
        yield path
    finally:
        server.close()
        path.unlink(missing_ok=True)


def copy_series(files: list[Path], folder: Path) -> list[Path]:
    """Copies of ``files`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in files]
