"""The indexing engine (medsearch.indexing.engine): workers give the serial index and every file is
accounted for; kill -9 and resume, with readers during the write; a rerun reads only what changed;
the progress bar and summary; commits spaced out on large indexes."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pydicom
import pytest
from conftest import SAMPLE
from indexing.archives import DISTINCT_CT, FAST, ROOT, _derive, _same_vectors, _vectors
from typer.testing import CliRunner

from medsearch import build_index, search
from medsearch.cli import app
from medsearch.deid import case_id
from medsearch.encoders import load_encoder
from medsearch.indexing import FILE_STATE, SKIP_REPORT, IndexOptions, IndexReport, build, cases, engine, workers
from medsearch.io import SkipReason, find_files, load_volume, scan
from medsearch.store import IndexStore

# -- workers give the serial index -----------------------------------------------------------------


def test_workers_give_the_serial_index_and_account_for_every_file(serial_index, mixed_archive, sample_key, tmp_path):
    serial, serial_report = serial_index
    parallel = tmp_path / "index"
    report = build_index(mixed_archive, parallel, key=sample_key, config=FAST, workers=2, batch_images=4)
    _same_vectors(_vectors(serial), _vectors(parallel))
    a, b = IndexStore.open(serial), IndexStore.open(parallel)
    pd.testing.assert_frame_equal(a.cases, b.cases)
    assert np.array_equal(a.thumbnails, b.thumbnails)
    assert (serial / SKIP_REPORT).read_bytes() == (parallel / SKIP_REPORT).read_bytes()

    # ... and the vectors of the one-case-at-a-time loop (scan, load_volume, embed_volume)
    encoder = load_encoder(FAST.encoder, input_size=FAST.preprocess.size)
    found = scan(mixed_archive)
    loop = {}
    for case in found.cases:
        try:
            volume, _ = load_volume(case)
        except Exception:  # noqa: BLE001, S112 - the cases that fail are compared through the skip report
            continue
        loop[case_id(sample_key, case.study_uid, case.series_uid, case.part)] = search.embed_volume(volume, encoder, FAST)
    _same_vectors(loop, _vectors(parallel))

    # every file is in an indexed case or skipped with a reason, and the totals add up
    files = list(find_files(mixed_archive))
    for r in (serial_report, report):
        assert r.accounted and r.n_files == len(files)
        assert r.n_files_added + r.n_files_already_indexed + len(r.skipped) == len(files)
        assert len({s.path for s in r.skipped}) == len(r.skipped)
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert reasons["README.txt"] is SkipReason.NOT_DICOM
    assert reasons["report-sr.dcm"] is SkipReason.NOT_AN_IMAGE
    assert reasons["truncated.dcm"] is SkipReason.TRUNCATED
    assert reasons["huge.dcm"] is SkipReason.TOO_LARGE
    assert reasons["ID_0006_AGE_0075_CONTRAST_1_CT.dcm"] is SkipReason.DUPLICATE
    summary = report.to_dict()
    assert summary["files_accounted"] and summary["workers"] == 2
    assert set(summary["stage_seconds"]) == {"discover", "startup", "scan", "decode", "preprocess", "encode", "store", "wait"}
    assert summary["images_encoded"] > summary["cases_added"]  # several slices of the multi-slice cases


# -- kill -9, resume, readers and a second writer --------------------------------------------------


@pytest.fixture(scope="module")
def kill_archive(tmp_path_factory) -> Path:
    """24 single-slice CT cases derived from the sample, with new UIDs."""
    root = tmp_path_factory.mktemp("kill") / "archive"
    for i in range(24):
        src = DISTINCT_CT[i % len(DISTINCT_CT)]
        _derive(src, root / f"p{i:02d}" / src.name, seed=f"kill-{i}")
    return root


def _index_command(archive: Path, index: Path, key: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "medsearch", "index", str(archive), "--index", str(index), "--key", str(key),
            "--config", str(config), "--commit-every", "2", "--workers", "1", "--json", "-q"]


def _cases_on_disk(index: Path) -> int:
    try:
        return int(json.loads((index / "manifest.json").read_text())["counts"]["cases"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_command_finishes_the_job(kill_archive, sample_key, tmp_path):
    reference = tmp_path / "reference"
    build_index(kill_archive, reference, key=sample_key, config=FAST, workers=0)
    total = len(IndexStore.open(reference))
    config = tmp_path / "fast.toml"
    config.write_text("[preprocess]\nsize = 64\nslices = 3\n")
    index = tmp_path / "index"
    command = _index_command(kill_archive, index, sample_key.path, config)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while _cases_on_disk(index) < 2:  # the first chunk is committed
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no commit within 300 s"
        time.sleep(0.01)
    family = psutil.Process(run.pid).children(recursive=True)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    committed = IndexStore.open(index)  # a complete earlier state, never a partial one
    assert 0 < len(committed) < total, "the run ended before it could be killed mid-way"
    # the worker processes (and the fork server) go with it
    _, alive = psutil.wait_procs(family, timeout=20)
    assert alive == []

    # the same command again, while a reader queries the index it writes
    resumed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    seen = []
    probe = next(iter(_vectors(reference).values()))
    while resumed.poll() is None:
        store = IndexStore.open(index)  # old or new state: checksums and counts agree, never an error
        hits = store.search(probe[None, :], 3)
        assert (hits.ids[0] < len(store)).all()
        assert store.cases["case_id"].is_unique
        seen.append(len(store))
        time.sleep(0.05)
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["cases_already_indexed"] == len(committed)  # committed work is not redone
    assert summary["cases_added"] == total - len(committed) and summary["files_accounted"]
    assert seen == sorted(seen)
    _same_vectors(_vectors(reference), _vectors(index))  # no duplicates, same case set, same vectors


def test_rerun_reads_only_what_changed_and_remembers_failed_cases(mixed_archive, sample_key, tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    shutil.copytree(mixed_archive, archive)
    index = tmp_path / "index"
    first = build_index(archive, index, key=sample_key, config=FAST, workers=0)

    # unchanged: no header read, nothing decoded, the same skip report, nothing rewritten
    read, decoded = [], []
    real_summarize, real_prepare = engine.summarize_file, engine.prepare_case
    for module in (cases, engine):  # headers are read by the scan (cases) and, for a lost UID, by the planner
        monkeypatch.setattr(module, "summarize_file", lambda p, **options: read.append(p) or real_summarize(p, **options))
    monkeypatch.setattr(engine, "prepare_case", lambda job, setup: decoded.append(job) or real_prepare(job, setup))
    skipped_before = (index / SKIP_REPORT).read_bytes()
    again = build_index(archive, index, key=sample_key, workers=0)
    assert read == [] and decoded == []
    assert again.n_cases_added == 0 and again.accounted
    assert again.skipped_by_reason == first.skipped_by_reason
    assert (index / SKIP_REPORT).read_bytes() == skipped_before

    # a new slice of an indexed series, a changed file and a removed one
    read.clear()
    _derive(archive / "series4" / "slice0.dcm", archive / "series4" / "slice4.dcm", seed="s4-4",
            study=pydicom.dcmread(archive / "series4" / "slice0.dcm").StudyInstanceUID,
            series=pydicom.dcmread(archive / "series4" / "slice0.dcm").SeriesInstanceUID, z=20.0)
    os.utime(archive / "pydicom" / "MR_small.dcm", ns=(time.time_ns(), time.time_ns()))
    (archive / "README.txt").unlink()
    changed = build_index(archive, index, key=sample_key, workers=0)
    assert sorted(p.name for p in read) == ["MR_small.dcm", "slice4.dcm"]
    assert decoded == [] and changed.n_cases_added == 0  # the series is indexed: not decoded again
    assert changed.n_files == first.n_files and changed.accounted
    with sqlite3.connect(index / FILE_STATE) as db:
        names = {Path(os.fsdecode(p)).name for (p,) in db.execute("SELECT path FROM headers")}
    assert "README.txt" not in names and "slice4.dcm" in names

    # the case that failed is not decoded again unless asked
    retried = build_index(archive, index, key=sample_key, workers=0, retry_skipped=True)
    assert [Path(j.case.files[0]).name for j in decoded] == ["huge.dcm"]
    assert retried.skipped_by_reason == changed.skipped_by_reason


# -- progress and summary ------------------------------------------------------------------------


def test_cli_progress_bar_json_summary_and_a_quick_rerun(tmp_path, sample_key):
    runner = CliRunner()
    config = tmp_path / "fast.toml"
    config.write_text("[preprocess]\nsize = 64\nslices = 3\n")
    args = ["index", str(SAMPLE / "tcga-luad-ct"), "--index", str(tmp_path / "ix"), "--key", str(sample_key.path),
            "--config", str(config), "--workers", "0"]
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    assert "file/s" in first.stderr and "cases/s" in first.stderr and "1 skipped" in first.stderr
    summary = json.loads(first.stdout)
    assert summary["files_found"] == 13 and summary["files_in_added_cases"] == 12 and summary["files_skipped"] == 1
    again = runner.invoke(app, [*args, "-q"])
    assert again.exit_code == 0 and again.stderr == ""
    assert "nothing new to index" in again.stdout and "12 already indexed + 1 skipped = 13 found" in again.stdout


# -- progress is committed while a worker is stuck ---------------------------------------------------


def _stuck_on_first(case):
    """Decodes every case, except that the first one waits for a file named ``release`` (runs in a worker)."""
    first = case.files[0]
    if first.name.startswith("ID_0000"):
        (first.parent / "stuck").touch()
        deadline = time.monotonic() + 300
        while not (first.parent / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return load_volume(case)


@pytest.mark.slow
def test_progress_is_committed_while_a_worker_is_stuck(tmp_path, sample_key, monkeypatch):
    """A worker sits on the first case (as on a huge sparse file, until --case-timeout): the cases the
    other worker decoded meanwhile are encoded and committed after commit_seconds, not after it."""
    archive = tmp_path / "archive"
    shutil.copytree(SAMPLE / "tcga-luad-ct", archive)
    index = tmp_path / "index"
    monkeypatch.setattr(build, "IndexOptions", functools.partial(IndexOptions, load=_stuck_on_first))
    run: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: run.setdefault("report", build_index(
        archive, index, key=sample_key, config=FAST, workers=2, commit_seconds=0.5, commit_every=1000, case_timeout=600)))
    thread.start()
    try:
        # 12 cases: all but the stuck one and the one queued behind it on the same worker
        deadline = time.monotonic() + 120
        while _cases_on_disk(index) < 10 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.1)
        committed_while_stuck = _cases_on_disk(index)
        assert (archive / "stuck").exists() and not (archive / "release").exists()
    finally:
        (archive / "release").touch()
        thread.join(timeout=300)
    assert committed_while_stuck >= 10, "the cases decoded while a worker was stuck were not committed"
    report = run["report"]
    assert report.n_cases_added == 12 and report.accounted and report.n_commits >= 2
    assert len(IndexStore.open(index)) == 12


class _OneStuckPool:
    """A stand-in worker pool: every case is done at once, except ``stuck`` until it is released."""

    size = 1

    def __init__(self, stuck: int) -> None:
        self.stuck, self.ready, self.released = stuck, [], False

    def submit(self, seq, kind, payload):
        if seq != self.stuck:
            self.ready.append(seq)

    def get(self, timeout=None):
        if self.released:
            self.released = False
            return workers._Task(self.stuck, "case", None), f"case {self.stuck}"
        return (workers._Task(self.ready[0], "case", None), f"case {self.ready.pop(0)}") if self.ready else None


def test_results_wait_for_the_case_ahead_of_them_only_until_a_commit_is_due():
    jobs = [cases.CaseJob(i, f"c{i}", None) for i in range(5)]
    pool = _OneStuckPool(stuck=0)
    report = IndexReport(index_dir=Path("."))
    handed = []
    results = engine._prepared(jobs, None, pool, report, batch_images=1, patience=0.0)
    for item in results:
        handed.append(item)
        if item is None and len([i for i in handed if i is not None]) == 4:
            pool.released = True  # the others are handed over: now the stuck worker finishes
    assert [i for i in handed if i is not None] == [(1, "case 1"), (2, "case 2"), (3, "case 3"), (4, "case 4"), (0, "case 0")]
    assert handed.index(None) > 0  # ticks came while the first case was awaited, so a commit could run

    # with patience, the same results come in job order
    pool = _OneStuckPool(stuck=0)
    pool.released = True
    in_order = [i for i in engine._prepared(jobs, None, pool, report, batch_images=1, patience=60.0) if i is not None]
    assert [seq for seq, _ in in_order] == [0, 1, 2, 3, 4]


# -- commits of a large index are spaced out ---------------------------------------------------------


def test_slow_commits_are_spaced_out():
    clock = {"now": 0.0}
    commits = []

    def slow_commit(chunk, force):
        commits.append(len(chunk))
        clock["now"] += 2.0  # rewriting a large index takes 2 s
        return True

    committer = engine._Committer(slow_commit, None, IndexReport(index_dir=Path(".")), every=1, seconds=60,
                                  clock=lambda: clock["now"])
    for _ in range(50):
        committer.chunk.vectors.append(np.zeros(4, np.float32))
        committer.chunk.rows.append({})
        committer.maybe_commit()
        clock["now"] += 1.0  # one case a second
    # not after every case: at least 10 x 2 s apart, so that commits take at most a tenth of the run
    assert commits[0] == 1 and all(n >= 10 for n in commits[1:]) and sum(commits) <= 50
