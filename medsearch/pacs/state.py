"""Which series of a DICOMweb server an index already holds: the local sync state.

:class:`SyncState` is an SQLite file in the index's site-only ``local/`` folder. It maps each series
a run has handled, under a keyed pseudonym of its Study and Series UIDs (:func:`series_token`; no UID
is stored), to the instance count it had and the case ids it gave. A later run lists the server,
computes the same tokens from the QIDO answers, and fetches only the series it does not know (or
whose instance count changed), without downloading any pixel.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medsearch.deid import SiteKey

__all__ = ["SeriesRecord", "SyncState", "series_token"]


def series_token(key: SiteKey, study_uid: str, series_uid: str) -> str:
    """The keyed pseudonym of a series (``"s-..."``): how the sync state and the spool name it."""
    return key.pseudonym(study_uid.strip(), series_uid.strip(), kind="series")


@dataclass(frozen=True)
class SeriesRecord:
    """A series an earlier run handled: its instance count then, and the case ids it gave (maybe none)."""

    n_instances: int
    case_ids: tuple[str, ...]


class SyncState:
    """The sync state at ``path`` (created on first use; each :meth:`put` is one transaction)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS series (token TEXT PRIMARY KEY, n_instances INTEGER NOT NULL, case_ids TEXT NOT NULL)"
            )
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)

    def get(self, token: str) -> SeriesRecord | None:
        row = self._db.execute("SELECT n_instances, case_ids FROM series WHERE token = ?", (token,)).fetchone()
        return None if row is None else SeriesRecord(int(row[0]), tuple(json.loads(row[1])))

    def put(self, records: Iterable[tuple[str, SeriesRecord]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO series (token, n_instances, case_ids) VALUES (?, ?, ?)",
                [(token, r.n_instances, json.dumps(list(r.case_ids))) for token, r in records],
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SyncState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
