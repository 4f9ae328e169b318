"""What one indexing run did: :class:`IndexReport`, and the default number of worker processes.

The report is filled in as the run goes (:func:`medsearch.indexing.index_files`), saved in the
index manifest as ``last_run`` at each commit, and printed by ``medsearch index --json``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsearch.io import SkippedFile

__all__ = ["STAGES", "IndexReport", "default_workers"]

STAGES = ("discover", "startup", "scan", "decode", "preprocess", "encode", "store", "wait")


def default_workers() -> int:
    """Worker processes used when none are asked for: ``min(4, os.cpu_count())``."""
    return min(4, os.cpu_count() or 1)


@dataclass
class IndexReport:
    """What one indexing run did. Every file found is in an indexed case or in ``skipped``.

    ``n_files == n_files_added + n_files_already_indexed + len(skipped)`` (see :attr:`accounted`):
    files of the cases this run added, files of cases already in the index, and files left out with a
    reason (a skipped slice of an indexed case counts as skipped).
    """

    index_dir: Path
    n_files: int = 0
    n_cases_found: int = 0
    n_cases_added: int = 0
    n_cases_already_indexed: int = 0
    n_cases_failed: int = 0
    n_cases_total: int = 0
    n_files_added: int = 0
    n_files_already_indexed: int = 0
    n_headers_cached: int = 0
    n_images_encoded: int = 0
    n_commits: int = 0
    workers: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    seconds: float = 0.0
    key_created: Path | None = None
    # the labels CSV, when one was given: its columns, those left out (column -> why), its rows
    label_columns: list[str] = field(default_factory=list)
    label_columns_dropped: dict[str, str] = field(default_factory=dict)
    label_rows: int = 0
    n_cases_labelled: int = 0  # cases added this run that a row of the CSV labels
    label_rows_matched: set[str] = field(default_factory=set, repr=False)  # keys (file names, UIDs): never saved
    # a run from a DICOMweb server: what was listed, fetched (instances whole and as headers only, bytes) and
    # failed (medsearch.indexing.dicomweb.SyncStats)
    dicomweb: dict[str, Any] | None = None

    @property
    def labels(self) -> dict[str, Any] | None:
        """How the labels CSV matched this run's cases, or None without one (counts and column names only)."""
        if not self.label_rows and not self.label_columns:
            return None
        return {
            "columns": list(self.label_columns),
            "dropped": dict(self.label_columns_dropped),
            "rows": self.label_rows,
            "rows_matched": len(self.label_rows_matched),
            "cases_labelled": self.n_cases_labelled,
            "cases_added": self.n_cases_added,
        }

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason.value for s in self.skipped).items()))

    @property
    def accounted(self) -> bool:
        """Whether the file counts add up (files found = added + already indexed + skipped)."""
        return self.n_files == self.n_files_added + self.n_files_already_indexed + len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary.

        ``stage_seconds``: ``scan``, ``decode`` and ``preprocess`` are summed over the worker
        processes (they overlap, and may add up to more than ``seconds``); ``discover``, ``startup``
        (starting the worker processes), ``encode``, ``store`` (commits) and ``wait`` (this process
        waiting for workers) are wall-clock time here. ``labels`` (None without a labels CSV): the
        label columns, those left out with why, the CSV's rows, how many of them named a case added
        by this run, and how many of those cases have labels.
        """
        rate = self.seconds if self.seconds > 0 else float("nan")
        return {
            "index_dir": str(self.index_dir),
            "files_found": self.n_files,
            "files_in_added_cases": self.n_files_added,
            "files_already_indexed": self.n_files_already_indexed,
            "files_skipped": len(self.skipped),
            "files_accounted": self.accounted,
            "headers_from_cache": self.n_headers_cached,
            "cases_found": self.n_cases_found,
            "cases_added": self.n_cases_added,
            "cases_already_indexed": self.n_cases_already_indexed,
            "cases_failed": self.n_cases_failed,
            "cases_in_index": self.n_cases_total,
            "images_encoded": self.n_images_encoded,
            "skipped_by_reason": self.skipped_by_reason,
            "commits": self.n_commits,
            "workers": self.workers,
            "seconds": round(self.seconds, 2),
            "files_per_second": round(self.n_files / rate, 2) if self.seconds > 0 else None,
            "cases_per_second": round(self.n_cases_added / rate, 2) if self.seconds > 0 else None,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "labels": self.labels,
            **({"dicomweb": self.dicomweb} if self.dicomweb is not None else {}),
        }


