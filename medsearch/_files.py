"""Writing files so that a reader never sees half of one: the one home of medsearch's atomic writes.

Every writer here puts the data in a temporary file beside the target, flushes and fsyncs it, renames
it over the target (``os.replace``: atomic on POSIX and Windows), then fsyncs the folder so that the
rename itself survives a power cut. On any failure the temporary file is removed and the target is
left as it was.

    write_bytes(path, data)             bytes, or an iterable of chunks; returns (sha256, size)
    write_text(path, text)              UTF-8 text
    write_with(path, writer)            anything that writes to a binary file object (np.save, torch.save)
    write_file_with(path, writer)       anything that writes to a path (faiss.write_index)
    sha256_file(path) / sha256_stream(f)    a checksum read in blocks, never the whole file in memory
    fsync_dir(folder)                   make a rename in ``folder`` durable

Files are created owner-only (``0o600``, as ``tempfile.mkstemp`` makes them): an index, a link table
or a cache may hold what only the site should read. ``mode`` sets other permissions where a file is
meant to be shared.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = ["fsync_dir", "public_mode", "sha256_file", "sha256_stream", "write_bytes", "write_file_with", "write_text", "write_with"]

_BLOCK = 1 << 20


def write_bytes(
    path: str | Path, data: bytes | bytearray | memoryview | Iterable[bytes | memoryview], *, mode: int | None = None
) -> tuple[str, int]:
    """Write ``data`` (bytes, or chunks of them) to ``path`` atomically; return its SHA-256 and size."""
    digest, size = hashlib.sha256(), 0

    def writer(f: IO[bytes]) -> None:
        nonlocal size
        for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)

    write_with(path, writer, mode=mode)
    return digest.hexdigest(), size


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded."""
    write_bytes(path, text.encode("utf-8"), mode=mode)


def write_with(path: str | Path, writer: Callable[[IO[bytes]], Any], *, mode: int | None = None) -> None:
    """Atomically write what ``writer`` writes into an open binary file (``lambda f: np.save(f, a)``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_file_with(path: str | Path, writer: Callable[[str], Any], *, mode: int | None = None) -> tuple[str, int]:
    """Atomically write what ``writer`` writes to a path it is given (``lambda p: faiss.write_index(ix, p)``).

    The file is hashed from the disk in blocks, so no serialized copy is ever held in memory. Returns
    its SHA-256 and size.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            digest, size = sha256_stream(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest, size


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    """SHA-256 and length of what an open binary file holds from its position on, read in blocks."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(_BLOCK), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries to disk, so a rename in it survives a crash (best effort: some
    file systems cannot open or sync a folder, and nothing more can be done there)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



def public_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file here (0o666 less the umask): for outputs
    a user shares, such as reports and figures, rather than index or key files."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask
