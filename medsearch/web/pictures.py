"""Pictures of the index's cases for the page: the thumbnail the index stored, and, where the
service has the index's link table (``medsearch serve --links FILE``), the slice of a case that
matched a query, read from the archive, with the tile it matched outlined.

The link table is the site's own record of where each case's files are (``medsearch index
--links``); it is read when the service starts and again whenever the file changes (an index that
grows while the service runs adds rows). The headers of the last :data:`CASES_KEPT` cases shown are
kept, so that a second picture of a case (another query, its detail view) reads one slice, not
every header of its series again (42 ms for the 28 files of a head CT, 9 ms once its headers are
kept, through the service's worker; a 300-file CT reads about ten times the headers). A case whose files moved, were deleted, or live on a PACS
only (a DICOMweb-indexed case) has no such picture: the endpoint says so, and the page shows the
stored thumbnail instead. No answer names a file.

The reading and drawing run through :attr:`CaseSlices.run`: ``medsearch serve`` sets it to its
bounded decoder (:meth:`medsearch.serve.decoder._Decoder.run`), so that a file of the archive that
changed into something hostile since it was indexed (a decompression bomb, a file that hangs a
decoder) costs a worker within its time and memory limits, never the service. The headers a worker
read come back with the picture and are kept here; the next picture of the case sends them along.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.config import PreprocessConfig
from medsearch.errors import ConfigError
from medsearch.io import CaseRef
from medsearch.sharing import LinkTable
from medsearch.sheets import matched_picture, scanned_case

__all__ = ["CASES_KEPT", "CaseSlices", "drawn", "png"]

#: How many cases' headers :class:`CaseSlices` keeps (each a file list and one header).
CASES_KEPT = 64


def drawn(
    source: dict[str, Any], index: int, preprocess: PreprocessConfig, size: int, box: tuple[int, int, int, int] | None,
    case: CaseRef | None,
) -> tuple[np.ndarray | None, CaseRef | None]:
    """Slice ``index`` of a case drawn (:func:`~medsearch.sheets.matched_picture`) from ``case``
    (its headers read before) when its files are as they were, else scanned again: the picture
    (None where the files cannot be read) and the case when it was scanned here (None when
    ``case`` served: it does not travel back). The task :class:`CaseSlices` runs."""
    if case is not None:
        picture = matched_picture(source, index, preprocess, size, box, case=case)
        if picture is not None:
            return picture, None
    scanned = scanned_case(source)
    if scanned is None:
        return None, None
    return matched_picture(source, index, preprocess, size, box, case=scanned), scanned


class CaseSlices:
    """The matched slices of an index's cases, read through its link table.

    ``run(fn, *args)`` runs the reading and drawing (:func:`drawn`) and gives its result, or None
    where it failed: by default here, in the calling thread; ``medsearch serve`` gives its bounded
    decoder.

    Raises
    ------
    ConfigError
        ``links`` does not exist (checked when the service starts).
    """

    def __init__(self, links: str | Path, run: Callable[..., Any] | None = None) -> None:
        self.path = Path(links)
        if not self.path.is_file():
            raise ConfigError(f"link table {self.path} does not exist; it is written by: medsearch index ... --links FILE")
        self.run: Callable[..., Any] = run if run is not None else (lambda fn, *args: fn(*args))
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._table: LinkTable | None = None
        self._cases: OrderedDict[str, CaseRef] = OrderedDict()  # case id -> its files scanned, last used last

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
                self._cases.clear()
            return self._table.resolve(case_id)

    def picture(self, case_id: str, index: int, preprocess: PreprocessConfig, size: int,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
        """Slice ``index`` of the case as a ``size`` px picture (``box`` outlined); None where it cannot be read."""
        source = self.source(case_id)
        if source is None:
            return None
        with self._lock:
            case = self._cases.get(case_id)
            if case is not None:
                self._cases.move_to_end(case_id)
        found = self.run(drawn, source, index, preprocess, size, box, case)
        picture, scanned = found if found is not None else (None, None)
        with self._lock:
            if picture is None:  # gone, unreadable, or the decoder gave up on it
                self._cases.pop(case_id, None)
            elif scanned is not None:  # scanned (again, when its files had changed): kept for the next picture
                self._cases[case_id] = scanned
                while len(self._cases) > CASES_KEPT:
                    self._cases.popitem(last=False)
        return picture


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
