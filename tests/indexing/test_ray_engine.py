"""The Ray engine (medsearch/indexing/ray_engine.py) on a local Ray started by the tests: the same index
as the local engine, a driver killed mid-run then resumed, nothing added twice, no identifying
value in a shard, and a case that hangs, crashes or needs too much memory skipped as the local engine
skips it. Ray binds 127.0.0.1 only: run these through scripts/test.sh, as CI does.

Without Ray these tests skip; with ``CI`` set they fail, so that CI never passes without running them.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import SAMPLE
from hostile.files import sparse_multiframe
from indexing.archives import CT, FAST, ROOT, _same_vectors, _vectors
from indexing.unreliable import ATTEMPTS, CRASHES, HANGS, hang_or_crash
from typer.testing import CliRunner

from medsearch import build_index
from medsearch.cli import app
from medsearch.errors import ConfigError, MedsearchError
from medsearch.indexing import SKIP_REPORT, IndexOptions, build, ray_engine
from medsearch.indexing.shards import SHARD_DIR, read_shard
from medsearch.io import SkipReason
from medsearch.store import IndexStore, read_manifest

pytestmark = pytest.mark.slow

# Keep Ray light: a small object store, no dashboard, no usage reporting, no log deduplication.
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (2 CPUs); its address, for a driver in a subprocess."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail('Ray is not installed, and CI must run the Ray tests: pip install "medsearch[ray]"')
        pytest.skip('Ray is not installed (pip install "medsearch[ray]")')
    # the workers import a test's decoder (tests/indexing/unreliable.py) as the tests do
    env = {**_RAY_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _skip_rows(index: Path) -> list[str]:
    return (index / SKIP_REPORT).read_text().splitlines()


def _same_index(ray_index: Path, local_index: Path) -> None:
    _same_vectors(_vectors(ray_index), _vectors(local_index))
    assert _skip_rows(ray_index) == _skip_rows(local_index)
    mine, theirs = IndexStore.open(ray_index), IndexStore.open(local_index)
    pd.testing.assert_frame_equal(mine.cases, theirs.cases)  # the same rows, in the same order
    assert (mine.slices is None) == (theirs.slices is None)
    if mine.slices is not None and theirs.slices is not None:  # the same slice vectors of each case
        assert np.array_equal(mine.slices.offsets, theirs.slices.offsets)
        assert np.array_equal(mine.slices.indices, theirs.slices.indices)
        for row in range(len(mine.cases)):
            (a, _, gap_a), (b, _, gap_b) = mine.slices.case(row), theirs.slices.case(row)
            assert np.allclose(a, b, atol=2e-3) and gap_a == gap_b
    assert not (ray_index / SHARD_DIR).exists() or not any((ray_index / SHARD_DIR).iterdir()), "shards left behind"


def test_same_index_and_report_as_the_local_engine(ray_cluster, mixed_archive, serial_index, sample_key, tmp_path):
    local, local_report = serial_index
    report = build_index(mixed_archive, tmp_path / "index", key=sample_key, config=FAST, engine="ray")
    _same_index(tmp_path / "index", local)
    for field in ("n_files", "n_cases_found", "n_cases_added", "n_cases_failed", "n_files_added", "n_images_encoded"):
        assert getattr(report, field) == getattr(local_report, field), field
    assert sorted(map(str, report.skipped)) == sorted(map(str, local_report.skipped))
    assert report.accounted


def test_the_shipped_sample_with_labels(ray_cluster, sample_key, tmp_path):
    args = {"labels": SAMPLE / "labels.csv", "key": sample_key, "config": FAST}
    build_index(SAMPLE / "tcga-luad-ct", tmp_path / "local", workers=0, **args)
    report = build_index(SAMPLE / "tcga-luad-ct", tmp_path / "ray", engine="ray", **args)
    _same_index(tmp_path / "ray", tmp_path / "local")
    assert report.n_cases_labelled > 0


def test_shared_dicom_sets(ray_cluster, shared_dicom, sample_key, tmp_path):
    local = build_index(shared_dicom, tmp_path / "local", key=sample_key, config=FAST, workers=0)
    ray_run = build_index(shared_dicom, tmp_path / "ray", key=sample_key, config=FAST, engine="ray")
    _same_index(tmp_path / "ray", tmp_path / "local")
    assert ray_run.n_cases_added == local.n_cases_added > 0


def test_a_second_run_adds_nothing(ray_cluster, mixed_archive, sample_key, tmp_path):
    index = tmp_path / "index"
    build_index(mixed_archive, index, key=sample_key, config=FAST, engine="ray")
    generation = read_manifest(index).generation
    result = CliRunner().invoke(app, ["index", str(mixed_archive), "--index", str(index), "--key", str(sample_key.path),
                                      "--engine", "ray", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert '"cases_added": 0' in result.output
    assert read_manifest(index).generation == generation


_KILLED_DRIVER = """
import os, signal, sys
from medsearch import build_index
from medsearch.deid import SiteKey
from medsearch.indexing import ray_engine, shards
from indexing.archives import FAST

ray_engine.SHARD_CASES = 2
written = []
add = shards.ShardFolder.add

def add_then_die(self, cases):
    path = add(self, cases)
    written.append(path)
    if len(written) == 2:  # the driver dies with two shards written and nothing committed
        os.kill(os.getpid(), signal.SIGKILL)
    return path

shards.ShardFolder.add = add_then_die
archive, index, key, address = sys.argv[1:]
build_index(archive, index, key=SiteKey.load(key), config=FAST, engine="ray", ray_address=address)
"""


def test_a_killed_driver_resumes_from_its_shards(ray_cluster, mixed_archive, serial_index, sample_key, tmp_path, caplog):
    index = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_DRIVER), str(mixed_archive), str(index), str(sample_key.path),
         ray_cluster],
        env=env, capture_output=True, timeout=600,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    shard_files = sorted((index / SHARD_DIR).glob("*.npz"))
    assert len(shard_files) == 2
    _no_identifying_value(shard_files, mixed_archive, sample_key)
    done = {case.case_id for path in shard_files for case in read_shard(path)[1]}
    assert len(done) == 4

    with caplog.at_level(logging.INFO, logger="medsearch.indexing.ray_engine"):
        report = build_index(mixed_archive, index, key=sample_key, config=FAST, engine="ray")
    assert "already in shards of an earlier run" in caplog.text
    planned = [r.getMessage() for r in caplog.records if "to encode on the cluster" in r.getMessage()]
    local, local_report = serial_index
    to_encode = local_report.n_cases_added + local_report.n_cases_failed - len(done)
    assert planned == [f"{to_encode} case(s) to encode on the cluster, 4 already in shards of an earlier run"]
    _same_index(index, local)  # no case twice (_vectors checks), the same skip report
    assert report.n_cases_added == local_report.n_cases_added


def test_a_case_that_hangs_crashes_or_needs_too_much_memory_is_skipped_as_by_the_local_engine(
    ray_cluster, sample_key, tmp_path, monkeypatch
):
    """The sample CT, one case of which hangs its decoder and one crashes it, and a file that needs more
    memory than a worker may use: both engines skip the same three cases with the same reasons and
    index the others; a rerun adds nothing, and decodes again what the local engine decodes again."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for f in CT:
        shutil.copy(f, archive / f.name)
    sparse_multiframe(archive / "large.dcm")
    monkeypatch.setattr(build, "IndexOptions", functools.partial(IndexOptions, load=hang_or_crash, worker_memory_gib=0.5))
    run = functools.partial(build_index, archive, key=sample_key, config=FAST, case_timeout=5.0)
    local = run(tmp_path / "local", workers=2)
    started = time.monotonic()
    report = run(tmp_path / "ray", engine="ray")
    assert time.monotonic() - started < 120
    reasons = {s.path.name[:7]: s for s in report.skipped}
    assert reasons[HANGS].reason is SkipReason.DECODE_ERROR and "no result within 5 s" in reasons[HANGS].detail
    assert reasons[CRASHES].reason is SkipReason.DECODE_ERROR and "crashed (signal 11)" in reasons[CRASHES].detail
    assert reasons["large.d"].reason is SkipReason.TOO_LARGE and "more memory than" in reasons["large.d"].detail
    assert report.n_cases_added == 10 and report.n_cases_failed == 3 and report.accounted
    _same_index(tmp_path / "ray", tmp_path / "local")
    assert sorted(map(str, report.skipped)) == sorted(map(str, local.skipped))
    assert sorted((tmp_path / ATTEMPTS).read_text().split()) == [HANGS] * 2 + [CRASHES] * 2  # once per engine

    # a rerun: nothing added; as by the local engine, the case that crashed and the one that hung are
    # tried again (a crash or a stall may be the node's), the one too large is not (its reason is kept)
    generation = read_manifest(tmp_path / "ray").generation
    local_again, again = run(tmp_path / "local", workers=2), run(tmp_path / "ray", engine="ray")
    for field in ("n_cases_added", "n_cases_failed", "n_cases_already_indexed", "n_files_added"):
        assert getattr(again, field) == getattr(local_again, field), field
    assert again.n_cases_added == 0 and again.n_cases_already_indexed == 10 and again.accounted
    assert sorted(map(str, again.skipped)) == sorted(map(str, report.skipped))
    assert sorted((tmp_path / ATTEMPTS).read_text().split()) == [HANGS] * 4 + [CRASHES] * 4
    assert read_manifest(tmp_path / "ray").generation == generation


# What a Ray task that failed for good wraps, and what the run's one-line error then says.
_FAILED_FOR_GOOD = [
    (MedsearchError("worker processes cannot start (no fork server)"), r"\(worker processes cannot start \(no fork server\)\)"),
    (KeyError("/archive/Doe^Jane/1.dcm"), r"\(KeyError\)"),  # a message that may quote a path: its type only
]


@pytest.mark.parametrize(("cause", "said"), _FAILED_FOR_GOOD)
def test_a_task_that_fails_for_good_stops_the_run_in_one_line(ray_cluster, cause, said):
    import ray

    error = ray.exceptions.RayTaskError("_prepare_batch", "Traceback ... /archive/Doe^Jane/1.dcm", cause)

    class Failing:  # a dataset whose second row never comes
        def iter_rows(self):
            yield {"seq": 0}
            raise error.as_instanceof_cause()

    rows = ray_engine._rows(ray, Failing())
    assert next(rows) == {"seq": 0}
    with pytest.raises(MedsearchError, match="^the Ray run stopped " + said + ".*run the same command again") as raised:
        next(rows)
    assert "Doe" not in str(raised.value) and "\n" not in str(raised.value)


def _no_identifying_value(files: list[Path], archive: Path, key) -> None:
    """The test_leak idea on shards: no UID, name, date, file name or key in their bytes."""
    forbidden = {key._key.hex(), key._key.hex().upper()}
    for path in archive.rglob("*"):
        if not path.is_file():
            continue
        forbidden.add(path.name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - not DICOM: its name is enough
            continue
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "StudyDate", "AccessionNumber", "InstitutionName"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 6:
                forbidden.add(value)
    blob = b"".join(p.read_bytes() for p in files)
    leaked = sorted(v for v in forbidden if v.encode() in blob)
    assert not leaked, leaked


def test_without_ray_a_one_line_error(mixed_archive, sample_key, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r'pip install "medsearch\[ray\]"'):
        build_index(mixed_archive, tmp_path / "index", key=sample_key, config=FAST, engine="ray")


def test_an_unknown_engine_is_refused(mixed_archive, sample_key, tmp_path):
    with pytest.raises(ConfigError, match="engine must be one of 'local', 'ray'"):
        build_index(mixed_archive, tmp_path / "index", key=sample_key, config=FAST, engine="spark")
    assert not (tmp_path / "index").exists()


def test_crop_vectors_are_refused_by_the_ray_engine_in_one_line(mixed_archive, sample_key, tmp_path):
    with pytest.raises(ConfigError, match="crop vectors .* local engine only"):
        build_index(mixed_archive, tmp_path / "index", key=sample_key, config=FAST.replace(index={"crop_grid": 2}), engine="ray")
