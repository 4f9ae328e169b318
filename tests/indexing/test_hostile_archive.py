"""An archive of hostile files (tests/hostile/files.py) is indexed with worker processes: every file is in
the totals, no worker crashes or stalls, and no worker's memory goes above the stated bound.

The bound (docs/indexing.md, "Memory and time"): a worker may allocate ``worker_memory_gib`` (2 GiB) beyond
what it holds once started, and stays under 2.5 GiB resident. Before the bound, the same files took a
worker to 13 GB and the run to 500 s (six cases stopped at a 120 s --case-timeout).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from hostile.files import SEEDED, write_corpus
from indexing.archives import FAST

from medsearch import build_index
from medsearch.indexing import SKIP_REPORT

BOUND = 2.5 * 2**30  # resident bytes no worker may exceed
CASE_TIMEOUT_S = 120.0  # far above what any of these files needs now: reaching it is a stall


def _hwm(pid: int) -> int:
    """The peak resident size of a process (VmHWM), in bytes; 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures worker memory with /proc (Linux)")
def test_a_hostile_archive_is_indexed_with_every_file_accounted_for_within_the_memory_bound(tmp_path, sample_key):
    archive = tmp_path / "archive"
    corpus = write_corpus(archive)
    run: dict[str, Any] = {}

    def index() -> None:
        started = time.monotonic()
        run["report"] = build_index(archive, tmp_path / "index", key=sample_key, config=FAST, workers=2,
                                    case_timeout=CASE_TIMEOUT_S)
        run["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=index, daemon=True)
    thread.start()
    peaks: dict[int, int] = {}
    me = psutil.Process()
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        for child in me.children(recursive=True):
            peaks[child.pid] = max(peaks.get(child.pid, 0), _hwm(child.pid))
        thread.join(0.05)
    assert not thread.is_alive(), "the run did not end within 600 s"
    report = run["report"]

    # every file is in the totals, each with the outcome its kind should have
    assert report.n_files == len(corpus) and report.accounted
    skipped = {s.path.name: s for s in report.skipped}
    for name, hostile in corpus.items():
        if hostile.reasons is None:
            assert name not in skipped, f"{name}: {skipped[name].reason.value} ({skipped[name].detail})"
        else:
            assert name in skipped and skipped[name].reason.value in hostile.reasons, (name, skipped.get(name))
    # no crash, no stall, and no header value in the report
    for skip in report.skipped:
        assert "crashed" not in skip.detail and "no result within" not in skip.detail, (skip.path.name, skip.detail)
    assert SEEDED not in (tmp_path / "index" / SKIP_REPORT).read_text()
    assert run["seconds"] < CASE_TIMEOUT_S
    # no worker above the bound
    assert peaks and max(peaks.values()) < BOUND, {pid: round(v / 2**30, 2) for pid, v in peaks.items()}
