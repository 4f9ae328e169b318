"""The worker processes (medsearch.indexing.workers): a case that hangs or crashes its worker is
skipped and the run goes on; a pool that cannot start fails the run with the reason."""

from __future__ import annotations

import functools
import os
import signal
import time

import psutil
import pytest
from conftest import SAMPLE
from indexing.archives import FAST

from medsearch import build_index
from medsearch.deid import DeidOptions
from medsearch.encoders import load_encoder
from medsearch.errors import MedsearchError
from medsearch.indexing import IndexOptions, IndexReport, build, index_files, workers
from medsearch.io import SkipReason, find_files, load_volume
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


@pytest.mark.slow
def test_a_case_that_hangs_or_crashes_its_worker_is_skipped_and_the_run_goes_on(tmp_path, sample_key):
    archive = SAMPLE / "tcga-luad-ct"
    files = list(find_files(archive))
    index = tmp_path / "index"
    encoder = load_encoder(FAST.encoder, input_size=FAST.preprocess.size)
    store = IndexStore.create(index, dim=encoder.dim, encoder=encoder.info.to_dict(),
                              preprocess=FAST.to_dict()["preprocess"], key_check=sample_key.check_value())
    report = IndexReport(index_dir=index, n_files=len(files))
    before = _workers()
    started = time.monotonic()
    index_files(
        files, root=archive, store=store, encoder=encoder, config=FAST, key=sample_key,
        describe=functools.partial(build._case_row, key=sample_key, deid=DeidOptions(), labels=None, archive=archive),
        commit=functools.partial(build._flush, store, report=report, archive=archive, link_table=None),
        report=report, must_commit=True, options=IndexOptions(workers=2, case_timeout=5.0, load=_unreliable_decoder),
    )
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


def _workers() -> set[int]:
    """Processes started below this one, the multiprocessing fork server left aside."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "forkserver" not in " ".join(p.cmdline()):
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
