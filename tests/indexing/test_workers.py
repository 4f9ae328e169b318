"""The worker processes (medsearch.indexing.workers): a case that hangs or crashes its worker is
skipped and the run goes on; a worker's memory is capped, so a file that needs more is skipped; a
pool that cannot start fails the run with the reason."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from conftest import SAMPLE
from hostile.files import sparse_multiframe
from indexing.archives import FAST

from medsearch import build_index
from medsearch.errors import MedsearchError
from medsearch.indexing import IndexOptions, build, workers
from medsearch.io import SkipReason, load_volume
from medsearch.store import IndexStore

# -- workers that hang or crash ----------------------------------------------------------------------


def _unreliable_decoder(case):
    """Hangs on one case and crashes its process on another (runs in a worker)."""
    name = case.files[0].name
    if name.startswith("ID_0002"):
        time.sleep(3600)
    if name.startswith("ID_0008"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return load_volume(case)


def _with_options(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    """Make ``build_index`` run with IndexOptions it takes no argument for (a test's decoder, a memory cap)."""
    monkeypatch.setattr(build, "IndexOptions", functools.partial(IndexOptions, **changes))


@pytest.mark.slow
def test_a_case_that_hangs_or_crashes_its_worker_is_skipped_and_the_run_goes_on(tmp_path, sample_key, monkeypatch):
    archive = SAMPLE / "tcga-luad-ct"
    index = tmp_path / "index"
    before = _workers()
    started = time.monotonic()
    _with_options(monkeypatch, load=_unreliable_decoder)
    report = build_index(archive, index, key=sample_key, config=FAST, workers=2, case_timeout=5.0)
    assert time.monotonic() - started < 120
    reasons = {s.path.name[:7]: s for s in report.skipped}
    assert reasons["ID_0002"].reason is SkipReason.DECODE_ERROR and "no result within 5 s" in reasons["ID_0002"].detail
    assert reasons["ID_0008"].reason is SkipReason.DECODE_ERROR and "crashed (signal 11)" in reasons["ID_0008"].detail
    assert report.n_cases_added == 10 and report.n_cases_failed == 2 and report.accounted
    assert len(IndexStore.open(index)) == 10
    # the stopped and crashed workers were replaced, and every worker has gone
    deadline = time.monotonic() + 15
    while _workers() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers() - before == set()


# -- a worker's memory is capped ----------------------------------------------------------------------


def test_a_worker_caps_its_address_space_at_its_start_plus_the_budget():
    code = (
        "import resource, numpy as np\n"
        "from medsearch.indexing import workers\n"
        "workers._limit_memory(256 * 2**20)\n"
        "soft, _ = resource.getrlimit(resource.RLIMIT_AS)\n"
        "try:\n"
        "    np.ones(2**30, dtype=np.uint8)\n"
        "except MemoryError:\n"
        "    print('refused', soft)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused"), out.stdout


@pytest.mark.slow
def test_a_file_that_needs_more_memory_than_a_worker_may_use_is_skipped(tmp_path, sample_key, monkeypatch):
    """A valid multi-frame whose pixels need 1.5 GiB to decode, under a 0.5 GiB cap: skipped, not a crash."""
    archive = tmp_path / "archive"
    sparse_multiframe(archive / "large.dcm")
    shutil.copy(min((SAMPLE / "tcga-luad-ct").glob("*.dcm")), archive / "ct.dcm")
    _with_options(monkeypatch, worker_memory_gib=0.5)
    peaks = _peak_worker_rss(lambda: build_index(archive, tmp_path / "index", key=sample_key, config=FAST, workers=1))
    report = peaks.result
    (skip,) = report.skipped
    assert skip.path.name == "large.dcm" and skip.reason is SkipReason.TOO_LARGE
    assert "more memory than" in skip.detail
    assert report.n_cases_added == 1 and report.accounted
    assert max(peaks.rss.values()) < 0.5 * 2**30 + _START_RSS


# What a worker holds once started (torch and MONAI loaded), with a margin.
_START_RSS = 0.6 * 2**30


@dataclass
class _Peaks:
    result: Any
    rss: dict[int, int]  # pid -> peak resident bytes (VmHWM) of each process started below this one


def _peak_worker_rss(run: Callable[[], Any]) -> _Peaks:
    """Call ``run`` in a thread while this one records the peak RSS of every child process."""
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", run()), daemon=True)
    thread.start()
    peaks: dict[int, int] = {}
    me = psutil.Process()
    while thread.is_alive():
        for child in me.children(recursive=True):
            peaks[child.pid] = max(peaks.get(child.pid, 0), _hwm(child.pid))
        thread.join(0.05)
    if "result" not in out:
        raise AssertionError("the run failed (see the log above)")
    return _Peaks(out["result"], peaks)


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _workers() -> set[int]:
    """Processes started below this one, multiprocessing's fork server and resource tracker left aside."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            command = " ".join(p.cmdline())
            if "forkserver" not in command and "resource_tracker" not in command:
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def test_a_pool_that_cannot_start_fails_the_run_with_the_reason(mixed_archive, sample_key, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise MedsearchError("worker processes cannot start (no fork server here)")

    monkeypatch.setattr(workers._WorkerPool, "__init__", broken)
    with pytest.raises(MedsearchError, match="cannot start"):
        build_index(mixed_archive, tmp_path / "index", key=sample_key, config=FAST, workers=2)
