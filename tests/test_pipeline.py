"""The indexing pipeline (medsearch.pipeline): workers give the serial index; kill -9 and resume;
readers during a write; a second writer; damaged index files; every file accounted for; the local
file-state cache; workers that hang or crash; commits spaced out on large indexes."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pydicom
import pytest
from conftest import SAMPLE
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from medsearch import Config, build_index, pipeline, search
from medsearch.cli import app
from medsearch.deid import case_id
from medsearch.encoders import load_encoder
from medsearch.errors import IndexCorruptError
from medsearch.io import (
    SkipReason,
    find_files,
    group_headers,
    load_volume,
    scan,
    summarize_file,
)
from medsearch.pipeline import FILE_STATE, IndexReport, index_files
from medsearch.sharing import export_index, shareability_problems
from medsearch.store import IndexStore

# The exact encoder input does not matter here: small images, up to three slices per case.
FAST = Config().replace(preprocess={"size": 64, "slices": 3})
CT = sorted((SAMPLE / "tcga-luad-ct").glob("*.dcm"))
DISTINCT_CT = [f for f in CT if not f.name.startswith("ID_0006")]  # ID_0006 duplicates ID_0003
ROOT = Path(__file__).resolve().parents[1]


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


def _derive(src: Path, dest: Path, *, seed: str, study: str | None = None, series: str | None = None,
            z: float | None = None, **changes: object) -> Path:
    """A copy of a real file with new UIDs (seeded, so the same every run) and some header changes."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study or generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = series or generate_uid(entropy_srcs=[seed, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = int(z)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=False)
    return dest


@pytest.fixture(scope="module")
def mixed_archive(tmp_path_factory) -> Path:
    """Real files of several kinds, plus files that must be skipped, each for its own reason."""
    root = tmp_path_factory.mktemp("mixed") / "archive"
    (root / "ct").mkdir(parents=True)
    (root / "pydicom").mkdir()
    for f in CT:
        shutil.copy(f, root / "ct" / f.name)
    for name in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"):
        shutil.copy(_testfile(name), root / "pydicom" / name)
    # a series of four CT slices, one at each position
    study, series = generate_uid(entropy_srcs=["series4", "study"]), generate_uid(entropy_srcs=["series4", "series"])
    for i in range(4):
        _derive(_testfile("CT_small.dcm"), root / "series4" / f"slice{i}.dcm", seed=f"s4-{i}", study=study,
                series=series, z=float(i * 5))
    (root / "README.txt").write_text("not an image")
    shutil.copy(_testfile("test-SR.dcm"), root / "report-sr.dcm")
    data = _testfile("MR_small.dcm").read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) - 1000])
    # its header declares far more pixels than any file may hold: the decoder is never asked
    _derive(_testfile("MR_small.dcm"), root / "huge" / "huge.dcm", seed="huge", Rows=60000, Columns=60000)
    return root


@pytest.fixture(scope="module")
def serial_index(mixed_archive, sample_key, tmp_path_factory) -> tuple[Path, IndexReport]:
    path = tmp_path_factory.mktemp("serial") / "index"
    report = build_index(mixed_archive, path, key=sample_key, config=FAST, workers=0)
    return path, report


def _vectors(index: Path) -> dict[str, np.ndarray]:
    store = IndexStore.open(index)
    ids = store.cases["case_id"].tolist()
    assert len(ids) == len(set(ids)), "a case is in the index twice"
    return dict(zip(ids, store.vectors()))


def _same_vectors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst


# -- workers give the serial index -----------------------------------------------------------------


def test_workers_give_the_serial_index_and_account_for_every_file(serial_index, mixed_archive, sample_key, tmp_path):
    serial, serial_report = serial_index
    parallel = tmp_path / "index"
    report = build_index(mixed_archive, parallel, key=sample_key, config=FAST, workers=2, batch_images=4)
    _same_vectors(_vectors(serial), _vectors(parallel))
    a, b = IndexStore.open(serial), IndexStore.open(parallel)
    pd.testing.assert_frame_equal(a.cases, b.cases)
    assert np.array_equal(a.thumbnails, b.thumbnails)
    assert (serial / "skipped.csv").read_bytes() == (parallel / "skipped.csv").read_bytes()

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
    assert reasons["report-sr.dcm"] is SkipReason.NO_PIXEL_DATA
    assert reasons["truncated.dcm"] is SkipReason.TRUNCATED
    assert reasons["huge.dcm"] is SkipReason.DECODE_ERROR
    assert reasons["ID_0006_AGE_0075_CONTRAST_1_CT.dcm"] is SkipReason.DUPLICATE
    summary = report.to_dict()
    assert summary["files_accounted"] and summary["workers"] == 2
    assert set(summary["stage_seconds"]) == {"discover", "startup", "scan", "decode", "preprocess", "encode", "store", "wait"}
    assert summary["images_encoded"] > summary["cases_added"]  # several slices of the multi-slice cases


# -- workers that hang or crash ----------------------------------------------------------------------


def _unreliable_decoder(case):
    """Hangs on one case and crashes its process on another (runs in a worker)."""
    name = case.files[0].name
    if name.startswith("ID_0002"):
        time.sleep(3600)
    if name.startswith("ID_0008"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return load_volume(case)


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
        describe=functools.partial(search._case_row, key=sample_key, deid=search.DeidOptions(), labels=None, archive=archive),
        commit=functools.partial(search._flush, store, report=report, archive=archive, link_table=None),
        report=report, workers=2, case_timeout=5.0, load=_unreliable_decoder, must_commit=True,
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


_HOLD_LOCK = (
    "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
    "lock.acquire(); print('locked', flush=True); sys.stdin.read()"
)


def test_a_second_writer_waits_then_fails_with_a_clear_message(tmp_path, sample_key):
    index = tmp_path / "index"
    index.mkdir()
    # another process holds the index's lock, as a running 'medsearch index' does
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(index / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        started = time.monotonic()
        result = CliRunner().invoke(app, ["index", str(CT[0]), "--index", str(index), "--key", str(sample_key.path),
                                          "--wait", "1", "-q"])
        waited = time.monotonic() - started
    finally:
        holder.communicate(b"")
    assert result.exit_code == 2 and waited >= 1
    assert "another medsearch process is writing" in result.stderr and result.stderr.count("\n") == 1
    assert not (index / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_index_file_is_named_in_the_error(serial_index, tmp_path, damage):
    index = tmp_path / "index"
    shutil.copytree(serial_index[0], index)
    manifest = json.loads((index / "manifest.json").read_text())
    name = manifest["files"]["vectors" if damage == "truncate" else "cases"]["name"]
    data = bytearray((index / name).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    (index / name).write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=name):
        IndexStore.open(index)
    result = CliRunner().invoke(app, ["query", str(CT[0]), "--index", str(index)])
    assert result.exit_code == 2 and name in result.stderr and result.stderr.count("\n") == 1


# -- the file-state cache ---------------------------------------------------------------------------


def test_the_file_state_cache_is_local_owner_only_and_holds_no_uid(serial_index, mixed_archive, tmp_path):
    index = serial_index[0]
    cache = index / FILE_STATE
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    content = cache.read_bytes()
    uids = set()
    for path in find_files(mixed_archive):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001, S112 - not DICOM: no UID to look for
            continue
        uids |= {str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    uids.discard("")
    assert uids and not [u for u in uids if u.encode() in content]
    assert shareability_problems(index) == []
    exported = export_index(index, tmp_path / "shared")
    assert FILE_STATE in exported.left_out and not (tmp_path / "shared" / FILE_STATE).exists()


def test_the_file_state_cache_keeps_slice_geometry(tmp_path):
    from medsearch.io import HeaderSummary, SliceGeometry
    from medsearch.pipeline import FileStateCache, _file_states

    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for f in files:
        f.write_bytes(b"x")
    states = _file_states(files)
    geometry = SliceGeometry(512, 512, (0.0, -1.5, 2.25), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 3.0, math.inf)
    items = [HeaderSummary(files[0], "st", "se", "sop1", 1, geometry), HeaderSummary(files[1], "st", "se", "sop2", 4)]
    cache = FileStateCache(tmp_path / FILE_STATE)
    cache.put_headers([(states[i.path], i) for i in items])
    cache.close()
    cache = FileStateCache(tmp_path / FILE_STATE)
    found = cache.lookup(states)
    cache.close()
    assert [found[f].item for f in files] == items


def test_rerun_reads_only_what_changed_and_remembers_failed_cases(mixed_archive, sample_key, tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    shutil.copytree(mixed_archive, archive)
    index = tmp_path / "index"
    first = build_index(archive, index, key=sample_key, config=FAST, workers=0)

    # unchanged: no header read, nothing decoded, the same skip report, nothing rewritten
    read, decoded = [], []
    real_summarize, real_prepare = pipeline.summarize_file, pipeline.prepare_case
    monkeypatch.setattr(pipeline, "summarize_file", lambda p: read.append(p) or real_summarize(p))
    monkeypatch.setattr(pipeline, "prepare_case", lambda job, setup: decoded.append(job) or real_prepare(job, setup))
    skipped_before = (index / "skipped.csv").read_bytes()
    again = build_index(archive, index, key=sample_key, workers=0)
    assert read == [] and decoded == []
    assert again.n_cases_added == 0 and again.accounted
    assert again.skipped_by_reason == first.skipped_by_reason
    assert (index / "skipped.csv").read_bytes() == skipped_before

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
        names = {Path(p).name for (p,) in db.execute("SELECT path FROM headers")}
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


# -- commits of a large index are spaced out ---------------------------------------------------------


def test_slow_commits_are_spaced_out():
    clock = {"now": 0.0}
    commits = []

    def slow_commit(chunk, force):
        commits.append(len(chunk))
        clock["now"] += 2.0  # rewriting a large index takes 2 s
        return True

    committer = pipeline._Committer(slow_commit, None, IndexReport(index_dir=Path(".")), every=1, seconds=60,
                                    clock=lambda: clock["now"])
    for _ in range(50):
        committer.chunk.vectors.append(np.zeros(4, np.float32))
        committer.chunk.rows.append({})
        committer.maybe_commit()
        clock["now"] += 1.0  # one case a second
    # not after every case: at least 10 x 2 s apart, so that commits take at most a tenth of the run
    assert commits[0] == 1 and all(n >= 10 for n in commits[1:]) and sum(commits) <= 50


# -- only the slices that are used get decoded, and they are the same ------------------------------------


def _load_whole(case):
    """The loader without slice selection (a different function, so prepare_case decodes everything)."""
    return load_volume(case)


def _series_from_sample(root: Path, n: int) -> Path:
    study, series = generate_uid(entropy_srcs=["used", "study"]), generate_uid(entropy_srcs=["used", "series"])
    for i in range(n):
        _derive(CT[i % len(CT)], root / f"slice{i:02d}.dcm", seed=f"used-{i}", study=study, series=series, z=float(3 * i))
    return root


def _prepared_both_ways(folder: Path, config: Config, encoder, key, limit: int = 4) -> list[tuple]:
    """prepare_case on the first ``limit`` series of several files, with the default loader and whole."""
    groups, _ = group_headers(summarize_file(p) for p in find_files(folder))
    groups = [g for g in groups if len(g.files) > 1][:limit]
    assert groups, f"no series of several files under {folder}"
    describe = functools.partial(search._case_row, key=key, deid=search.DeidOptions(), labels=None, archive=folder)
    out = []
    for i, group in enumerate(groups):
        job = pipeline.CaseJob(i, f"case-{i}", group)
        used = pipeline.prepare_case(job, pipeline._Setup(config=config, encoder=encoder.info, describe=describe))
        whole = pipeline.prepare_case(job, pipeline._Setup(config=config, encoder=encoder.info, describe=describe, load=_load_whole))
        out.append((used, whole))
    return out


def _check_same(pairs, encoder) -> None:
    for used, whole in pairs:
        assert isinstance(used, pipeline.PreparedCase) and isinstance(whole, pipeline.PreparedCase)
        np.testing.assert_array_equal(used.images, whole.images)
        np.testing.assert_array_equal(used.thumbnail, whole.thumbnail)
        assert used.row == whole.row and used.skipped == whole.skipped and used.n_files == whole.n_files
        np.testing.assert_array_equal(encoder.embed(used.images), encoder.embed(whole.images))


@pytest.mark.parametrize("slices", [5, 3])
def test_decoding_only_the_used_slices_gives_the_same_vectors_on_a_sample_series(tmp_path, sample_key, slices):
    config = Config().replace(preprocess={"slices": slices})
    encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
    _check_same(_prepared_both_ways(_series_from_sample(tmp_path / "series", 11), config, encoder, sample_key), encoder)


def test_decoding_only_the_used_slices_gives_the_same_vectors_on_a_real_series(shared_dicom, sample_key):
    config = Config()
    encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
    for folder in ("ct-head-ge-gantry-tilt", "mr-philips-fmri"):
        _check_same(_prepared_both_ways(shared_dicom / folder, config, encoder, sample_key, limit=2), encoder)


@pytest.mark.parametrize(("preprocess", "spatial_dims", "expected"), [
    ({"slices": 5}, 2, [0, 2, 4, 5, 7]),
    ({"slices": 3}, 2, [1, 4, 6]),  # 4: the thumbnail's middle slice
    ({"slice_mode": "triplanar"}, 2, None),
    ({"slices": 5}, 3, None),
])
def test_used_slices_follow_the_preprocessing(preprocess, spatial_dims, expected):
    config = Config().replace(preprocess=preprocess)
    info = load_encoder(FAST.encoder, input_size=64).info
    info = type(info)(**{**info.__dict__, "spatial_dims": spatial_dims})
    select = pipeline._used_slices(config, info)
    assert (select(8) if select is not None else None) == expected


# -- workers that cannot start; pydicom's log lines -------------------------------------------------


def test_a_pool_that_cannot_start_fails_the_run_with_the_reason(mixed_archive, sample_key, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise pipeline.MedsearchError("worker processes cannot start (no fork server here)")

    monkeypatch.setattr(pipeline._WorkerPool, "__init__", broken)
    with pytest.raises(pipeline.MedsearchError, match="cannot start"):
        build_index(mixed_archive, tmp_path / "index", key=sample_key, config=FAST, workers=2)


def test_headers_read_here_leave_no_pydicom_log_lines(mixed_archive, caplog, monkeypatch):
    # pydicom's log lines quote header values; reading headers in this process must not let them out
    def chatty(path):
        logging.getLogger("pydicom").warning("PatientName=Doe^Jane in %s", path)
        return summarize_file(path)

    monkeypatch.setattr(pipeline, "summarize_file", chatty)
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("pydicom")
    level, disabled = logger.level, logger.disabled  # the CLI's tests may have quieted it for good
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    try:
        found, _ = pipeline._scan_files(list(find_files(mixed_archive))[:3], None)
        assert len(found) == 3
        assert "Doe^Jane" not in caplog.text
        logger.warning("after: Smith")
        assert "after: Smith" in caplog.text  # the logger is given back as it was
    finally:
        logger.setLevel(level)
        logger.disabled = disabled
