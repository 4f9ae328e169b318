"""The local file-state cache: what each file gave when it was last read, so that it is not read again.

:class:`FileStateCache` is an SQLite file in the index directory's site-only ``local/`` folder
(:data:`FILE_STATE`), keyed by a file's absolute path (its bytes, so that any file name is kept
exactly), size and modification time. It keeps header summaries with their UIDs replaced by keyed
pseudonyms (``_Tokens``), the case each file was last part of, and the files left out of a decoded
case. It is local to the machine that built the index and never exported.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsearch.deid import SiteKey
from medsearch.io import HeaderSummary, SkippedFile, SkipReason, SliceGeometry
from medsearch.io.dicom.scan import printable_path
from medsearch.store import LOCAL_DIR

__all__ = ["FILE_STATE", "FileStateCache"]

log = logging.getLogger(__name__)

#: the cache's path inside an index directory (site-only: it names source files)
FILE_STATE = f"{LOCAL_DIR}/file-state.sqlite"
# Header skip reasons that depend on the file's bytes only (an unreadable file may be a permission
# problem, and an unsupported transfer syntax may get its decoder installed): those are cached.
_CACHED_HEADER_SKIPS = frozenset({SkipReason.NOT_DICOM, SkipReason.NO_PIXEL_DATA, SkipReason.NOT_AN_IMAGE, SkipReason.TRUNCATED})


def _cached_geometry(text: str | None) -> SliceGeometry | None:
    """A cached slice geometry; None when absent or unreadable (the case is then read the long way)."""
    if not text:
        return None
    try:
        return SliceGeometry.from_list(json.loads(text))
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class _FileState:
    key: bytes  # absolute path, as the file system's bytes (os.fsencode): any name, kept exactly
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Cached:
    """A file's entry in the cache: its header summary (UIDs as keyed tokens) or skip, and its case."""

    item: HeaderSummary | SkippedFile
    case_id: str
    part: str


class _Tokens:
    """Keyed pseudonyms of UIDs (the cache keeps these, never a UID), and the UIDs seen in this run."""

    def __init__(self, key: SiteKey) -> None:
        self._key = key
        self.real: dict[str, str] = {}

    def token(self, uid: str) -> str:
        if not uid:
            return ""
        token = self._key.pseudonym(uid, kind="uid")
        self.real[token] = uid
        return token

    def summary(self, item: HeaderSummary) -> HeaderSummary:
        return HeaderSummary(item.path, self.token(item.study_uid), self.token(item.series_uid),
                             self.token(item.sop_uid), item.frames, item.geometry)


class FileStateCache:
    """What each file gave when it was last read, so that an unchanged file is not read again.

    An SQLite file in the index directory's ``local/`` folder (:data:`FILE_STATE`), keyed by a file's
    absolute path (as bytes: a name that is not UTF-8 is kept exactly), size and modification time. For each file it holds its header summary, with the Study, Series and SOP
    Instance UIDs replaced by keyed pseudonyms (enough to group files into cases and find duplicates)
    and its slice geometry (so that a case is ordered without reading its files again), the case id
    it was last part of, or why the file was skipped; and which files of a decoded case were left
    out. It holds file paths, so it is local to this machine: it is created owner-only, in an
    owner-only folder, and :func:`medsearch.sharing.export_index` leaves it behind. Deleting it only makes the next run read
    every header again.

    Parameters
    ----------
    path
        The cache file; created when missing, and recreated when damaged.
    """

    _VERSION = "4"  # 3: headers.geometry; 4: paths as bytes
    _TABLES = {
        "headers": "path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, study TEXT, series TEXT, sop TEXT, "
        "frames INTEGER, reason TEXT, detail TEXT, case_id TEXT, part TEXT, geometry TEXT",
        "decoded": "path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, case_id TEXT, reason TEXT, detail TEXT",
    }

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            log.warning("file-state cache %s is damaged (%s); starting a new one", self.path, e)
            self.path.unlink(missing_ok=True)
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        if fresh:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(self.path)
        try:
            if fresh:
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                version = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
                if version is not None and version[0] == "3":
                    self._paths_to_bytes(db)
                elif version is not None and version[0] != self._VERSION:
                    db.execute("DROP TABLE IF EXISTS headers")
                    db.execute("DROP TABLE IF EXISTS decoded")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (self._VERSION,))
                for table, columns in self._TABLES.items():
                    db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
        except BaseException:
            db.close()
            raise
        return db

    def _paths_to_bytes(self, db: sqlite3.Connection) -> None:
        """Version 3 kept paths as text (UTF-8 names only): the same bytes, so they are kept, as bytes."""
        if not db.in_transaction:
            db.execute("BEGIN")  # all or nothing: a run killed here finds version 3 as it was
        for table, columns in self._TABLES.items():
            db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
            db.execute(f"CREATE TABLE {table} ({columns})")
            names = [c.split()[0] for c in columns.split(", ")]
            rest = ", ".join(names[1:])
            db.execute(f"INSERT OR REPLACE INTO {table} SELECT CAST(path AS BLOB), {rest} FROM old_{table}")
            db.execute(f"DROP TABLE old_{table}")

    def close(self) -> None:
        self._db.close()

    def lookup(self, states: Mapping[Path, _FileState]) -> dict[Path, _Cached]:
        """Cached entries of the files whose size and modification time are unchanged."""
        by_key = {s.key: (path, s) for path, s in states.items()}
        out: dict[Path, _Cached] = {}
        rows = self._db.execute(
            "SELECT path, size, mtime_ns, study, series, sop, frames, reason, detail, case_id, part, geometry FROM headers"
        )
        for key, size, mtime, study, series, sop, frames, reason, detail, cid, part, geometry in rows:
            hit = by_key.get(key)
            if hit is None or hit[1].size != size or hit[1].mtime_ns != mtime:
                continue
            path = hit[0]
            item: HeaderSummary | SkippedFile
            if reason:
                item = SkippedFile(path, SkipReason(reason), detail or "")
            else:
                item = HeaderSummary(path, study or "", series or "", sop or "", int(frames), _cached_geometry(geometry))
            out[path] = _Cached(item, cid or "", part or "")
        return out

    def decode_skips(self, states: Mapping[Path, _FileState]) -> dict[Path, tuple[str, SkippedFile]]:
        """Files of unchanged cases left out when their case was decoded: path -> (case id, skip)."""
        by_key = {s.key: (path, s) for path, s in states.items()}
        out: dict[Path, tuple[str, SkippedFile]] = {}
        for key, size, mtime, cid, reason, detail in self._db.execute(
            "SELECT path, size, mtime_ns, case_id, reason, detail FROM decoded"
        ):
            hit = by_key.get(key)
            if hit is None or hit[1].size != size or hit[1].mtime_ns != mtime:
                continue
            out[hit[0]] = (cid, SkippedFile(hit[0], SkipReason(reason), detail or ""))
        return out

    def put_headers(self, items: Iterable[tuple[_FileState, HeaderSummary | SkippedFile]]) -> None:
        """Record header summaries (their UIDs already tokens) and header skips that depend on the bytes only."""
        rows: list[tuple[Any, ...]] = []
        for state, item in items:
            if isinstance(item, SkippedFile):
                if item.reason in _CACHED_HEADER_SKIPS:
                    rows.append((state.key, state.size, state.mtime_ns, None, None, None, None,
                                 item.reason.value, printable_path(item.detail), None, None, None))
            else:
                geometry = None if item.geometry is None else json.dumps(item.geometry.to_list())
                rows.append((state.key, state.size, state.mtime_ns, item.study_uid, item.series_uid, item.sop_uid,
                             item.frames, None, None, None, None, geometry))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO headers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def put_case_ids(self, items: Iterable[tuple[_FileState, str, str]]) -> None:
        """Record the case (id and part) each file belongs to."""
        with self._db:
            self._db.executemany(
                "UPDATE headers SET case_id = ?, part = ? WHERE path = ? AND size = ? AND mtime_ns = ?",
                [(cid, part, s.key, s.size, s.mtime_ns) for s, cid, part in items],
            )

    def put_cases(self, cases: Iterable[tuple[str, Sequence[_FileState], Sequence[tuple[_FileState, SkippedFile]]]]) -> None:
        """Record decoded cases: ``(case id, states of all its files, (state, skip) of those left out)``."""
        with self._db:
            for cid, states, skipped in cases:
                self._db.executemany("DELETE FROM decoded WHERE path = ?", [(s.key,) for s in states])
                self._db.executemany(
                    "INSERT OR REPLACE INTO decoded VALUES (?, ?, ?, ?, ?, ?)",
                    [(s.key, s.size, s.mtime_ns, cid, skip.reason.value, printable_path(skip.detail)) for s, skip in skipped],
                )

    def prune(self, root: Path, states: Mapping[Path, _FileState]) -> None:
        """Forget files under the folder ``root`` that are no longer there."""
        if not root.is_dir():
            return
        prefix = os.fsencode(os.path.join(os.path.abspath(root), ""))
        with self._db:
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (path BLOB PRIMARY KEY)")
            self._db.execute("DELETE FROM seen")
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", [(s.key,) for s in states.values()])
            for table in ("headers", "decoded"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE substr(path, 1, ?) = ? AND path NOT IN (SELECT path FROM seen)",
                    (len(prefix), prefix),
                )
            self._db.execute("DELETE FROM seen")


def _file_states(files: Sequence[Path]) -> dict[Path, _FileState]:
    """Each file's absolute path (as bytes), size and modification time (size -1: it cannot be stat'ed)."""
    out = {}
    for path in files:
        try:
            st = path.stat()
        except OSError:
            st = None  # its header read reports why; never cached
        out[path] = _FileState(os.fsencode(os.path.abspath(path)), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    return out
