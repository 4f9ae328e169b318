"""Pictures of the index's cases for the page: the thumbnail the index stored, and, where the
service has the index's link table (``medsearch serve --links FILE``), the slice of a case that
matched a query, read from the archive, with the tile it matched outlined.

The link table is the site's own record of where each case's files are (``medsearch index
--links``); it is read when the service starts and again whenever the file changes (an index that
grows while the service runs adds rows). A case whose files moved, were deleted, or live on a PACS
only (a DICOMweb-indexed case) has no such picture: the endpoint says so, and the page shows the
stored thumbnail instead. No answer names a file.
"""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.config import PreprocessConfig
from medsearch.errors import ConfigError
from medsearch.sharing import LinkTable
from medsearch.sheets import matched_picture

__all__ = ["CaseSlices", "png"]


class CaseSlices:
    """The matched slices of an index's cases, read through its link table.

    Raises
    ------
    ConfigError
        ``links`` does not exist (checked when the service starts).
    """

    def __init__(self, links: str | Path) -> None:
        self.path = Path(links)
        if not self.path.is_file():
            raise ConfigError(f"link table {self.path} does not exist; it is written by: medsearch index ... --links FILE")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._table: LinkTable | None = None

    def source(self, case_id: str) -> dict[str, Any] | None:
        """The link table's row of ``case_id`` (its files), read again when the file has changed; None if absent."""
        with self._lock:
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                stamp = None
            if self._table is None or (stamp is not None and stamp != self._stamp):
                self._table, self._stamp = LinkTable(self.path), stamp
            return self._table.resolve(case_id)

    def picture(self, case_id: str, index: int, preprocess: PreprocessConfig, size: int,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
        """Slice ``index`` of the case as a ``size`` px picture (``box`` outlined); None where it cannot be read."""
        source = self.source(case_id)
        if source is None:
            return None
        return matched_picture(source, index, preprocess, size, box)


def png(image: np.ndarray) -> bytes:
    """A PNG of a 2D uint8 array (gray) or an (H, W, 3) one (RGB); one IDAT of unfiltered rows, no library needed."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    color = 2 if image.ndim == 3 else 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1).tobytes()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))
