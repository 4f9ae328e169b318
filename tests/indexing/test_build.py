"""Building an index (medsearch.indexing.build): every file accounted for, labels and metadata in the
case table, reruns and new folders, interrupted runs, another key, a second writer, bad labels, a
folder of other files, damaged index files, and every real DICOM set indexed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import SAMPLE
from indexing.archives import CT
from typer.testing import CliRunner

from medsearch import Config, build_index, index_info, query
from medsearch.cli import app
from medsearch.deid import SiteKey
from medsearch.errors import IndexCorruptError, KeyFileError, MedsearchError
from medsearch.indexing import cases, engine
from medsearch.io import SkipReason
from medsearch.store import IndexStore

ARCHIVE = SAMPLE / "tcga-luad-ct"
FILES = sorted(ARCHIVE.glob("*.dcm"))
# ID_0006 is a byte-identical copy of ID_0003 (same SOP instance): it is skipped as a duplicate.
DUPLICATE, ORIGINAL = "ID_0006_AGE_0075_CONTRAST_1_CT.dcm", "ID_0003_AGE_0075_CONTRAST_1_CT.dcm"


def test_sample_index_accounts_for_every_file(sample_index):
    store = IndexStore.open(sample_index)
    assert len(store) == 12
    report = pd.read_csv(sample_index / "skipped.csv")
    assert report.to_dict("records") == [
        {"path": DUPLICATE, "reason": "duplicate", "detail": report.loc[0, "detail"]}
    ]
    assert len(store) + len(report) == len(FILES)
    # case ids are pseudonyms, and nothing in the table is a UID or a patient's name
    assert store.cases["case_id"].str.match(r"^c-[0-9a-f]{16}$").all()
    header = pydicom.dcmread(FILES[0], stop_before_pixels=True)
    table = store.cases.to_csv()
    for value in (str(header.PatientName), header.PatientID, header.StudyInstanceUID, header.SeriesInstanceUID):
        assert value not in table


def test_labels_and_metadata_reach_the_case_table(sample_index):
    cases = IndexStore.open(sample_index).cases
    assert sorted(cases["Contrast"].astype(str).value_counts().to_dict().items()) == [("False", 6), ("True", 6)]
    assert set(cases["modality"]) == {"CT"}
    assert set(cases["manufacturer"]) == {"SIEMENS", "GE MEDICAL SYSTEMS"}
    assert cases["n_slices"].tolist() == [1] * 12
    info = index_info(sample_index)
    assert info["cases"] == 12 and info["label_columns"] == ["Contrast"]
    assert info["encoder"]["name"] == "efficientnet-lite0"


@pytest.mark.parametrize("file_cache", [True, False], ids=["file-cache", "no-file-cache"])
def test_rerun_adds_nothing_and_decodes_nothing(sample_index, sample_key, tmp_path, monkeypatch, file_cache):
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    manifest = (copy / "manifest.json").read_bytes()

    def no_decoding(job, setup):
        raise AssertionError("a case already indexed was decoded again")

    def no_header(path):
        raise AssertionError("the header of an unchanged file was read again")

    monkeypatch.setattr(engine, "prepare_case", no_decoding)
    if file_cache:  # unchanged files (same path, size, mtime) are not even opened
        for module in (cases, engine):  # headers are read by the scan (cases) and, for a lost UID, by the planner
            monkeypatch.setattr(module, "summarize_file", no_header)
    report = build_index(ARCHIVE, copy, key=sample_key, workers=0, file_cache=file_cache)
    assert report.n_cases_added == 0 and report.n_cases_already_indexed == 12
    assert report.n_headers_cached == (len(FILES) if file_cache else 0)
    assert report.n_files_already_indexed == 12 and len(report.skipped) == 1 and report.accounted
    assert len(IndexStore.open(copy)) == 12
    assert (copy / "manifest.json").read_bytes() == manifest  # nothing new: the index is not rewritten


def test_adding_a_new_folder_to_an_index(tmp_path, sample_key):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    distinct = [f for f in FILES if f.name != DUPLICATE]
    for i, f in enumerate(distinct[:6]):
        shutil.copy(f, (first if i < 3 else second) / f.name)
    index = tmp_path / "index"
    assert build_index(first, index, key=sample_key).n_cases_total == 3
    report = build_index(second, index, key=sample_key)
    assert report.n_cases_added == 3 and report.n_cases_total == 6
    assert query(first / distinct[0].name, index, k=1).results[0].distance < 1e-4


def test_interrupted_run_keeps_committed_work_and_resumes(tmp_path, sample_key, monkeypatch):
    index = tmp_path / "index"
    real_pool = engine.pool_slices
    calls = {"n": 0}

    def pool_then_die(*args, **kwargs):  # called once per encoded case, before it joins a chunk
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("power cut")
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(engine, "pool_slices", pool_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(ARCHIVE, index, key=sample_key, commit_every=2, batch_images=2, workers=0)
    assert len(IndexStore.open(index)) == 4  # two committed chunks of two
    monkeypatch.setattr(engine, "pool_slices", real_pool)
    report = build_index(ARCHIVE, index, key=sample_key, commit_every=2, workers=0)
    assert report.n_cases_already_indexed == 4 and report.n_cases_total == 12


def test_another_key_is_refused_for_adding(sample_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    other = SiteKey.load(tmp_path / "other.key", create=True)
    with pytest.raises(KeyFileError, match="another site key"):
        build_index(ARCHIVE, copy, key=other)


def test_a_second_writer_gets_a_clear_message(tmp_path, sample_key):
    from filelock import FileLock

    index = tmp_path / "index"
    index.mkdir()
    with FileLock(str(index / ".lock")):
        with pytest.raises(MedsearchError, match="another medsearch process is writing"):
            build_index(FILES[0], index, key=sample_key, lock_timeout=0.1)


def test_labels_file_errors(tmp_path, sample_key):
    bad = tmp_path / "labels.csv"
    bad.write_text("name,value\na,1\n")
    with pytest.raises(MedsearchError, match="--label-key"):
        build_index(FILES[0], tmp_path / "ix", key=sample_key, labels=bad)
    with pytest.raises(MedsearchError, match="does not exist"):
        build_index(FILES[0], tmp_path / "ix", key=sample_key, labels=tmp_path / "nope.csv")


@pytest.mark.slow
def test_index_all_real_dicom_and_pydicom_test_files(shared_dicom, tmp_path, sample_key):
    """Every image-bearing file's case is indexed; every other file is reported with a reason."""
    from pydicom.data import get_testdata_files

    archive = tmp_path / "archive"
    shutil.copytree(shared_dicom, archive / "shared")
    for i, f in enumerate(f for f in get_testdata_files() if Path(f).is_file()):
        target = archive / "pydicom" / f"{i:03d}_{Path(f).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    fast = Config().replace(preprocess={"size": 64, "slices": 1})
    report = build_index(archive, tmp_path / "index", key=sample_key, config=fast)
    n_files = sum(1 for p in archive.rglob("*") if p.is_file())
    assert report.n_files == n_files
    assert report.n_cases_added > 100
    skipped = pd.read_csv(tmp_path / "index" / "skipped.csv")
    assert len(skipped) == len(report.skipped)
    assert skipped["reason"].isin([r.value for r in SkipReason]).all()
    assert (skipped["detail"].fillna("") != "").all()
    # the shared sets' known contents: 5 duplicates in tcga-luad-ct100, labels and licenses not DICOM
    assert (skipped["path"].str.startswith("shared/tcga-luad-ct100") & (skipped["reason"] == "duplicate")).sum() == 5
    store = IndexStore.open(tmp_path / "index")
    assert np.isfinite(store.vectors()).all()
    # every file is in an indexed case or in the skip report, once, and the totals add up
    assert report.accounted and skipped["path"].is_unique
    assert report.n_files_added + len(report.skipped) == n_files and report.n_files_already_indexed == 0
    # the same archive again: nothing decoded, unchanged headers not read, the same skip report
    again = build_index(archive, tmp_path / "index", key=sample_key)
    assert again.n_cases_added == 0 and again.accounted
    assert again.n_files_already_indexed == report.n_files_added
    assert again.n_headers_cached >= n_files - report.skipped_by_reason.get("unreadable", 0) - report.skipped_by_reason.get(
        "unsupported_transfer_syntax", 0)
    assert again.skipped_by_reason == report.skipped_by_reason
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "index" / "skipped.csv"), skipped)


def test_index_refuses_a_folder_of_other_files_or_a_file(tmp_path, sample_key):
    with pytest.raises(MedsearchError, match="is not a medsearch index and holds other files"):
        build_index(FILES[0], SAMPLE, key=sample_key)
    assert not (SAMPLE / ".lock").exists()
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(MedsearchError, match="is a file; give a folder"):
        build_index(FILES[0], target, key=sample_key)


def test_index_with_a_damaged_manifest_is_not_overwritten(tmp_path, sample_key):
    from medsearch.errors import IndexCorruptError

    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{broken")
    with pytest.raises(IndexCorruptError, match="not readable JSON"):
        build_index(FILES[0], index, key=sample_key)
    assert (index / "manifest.json").read_text() == "{broken"


# -- a second writer, damaged index files --------------------------------------------------------


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
