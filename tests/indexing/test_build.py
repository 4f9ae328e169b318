"""Building an index (medsearch.indexing.build): every file accounted for, labels and metadata in the
case table, reruns and new folders, interrupted runs, another key, a second writer, bad labels, a
folder of other files, damaged index files, every real DICOM set indexed; every path accounted for
(names that are not UTF-8, links, FIFOs, loops), site-only state in local/, the key never inside."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import SAMPLE
from hostile import paths
from indexing.archives import CT, FAST
from mixed.archive import write_mixed_archive
from typer.testing import CliRunner

from medsearch import Config, build_index, index_info, query
from medsearch.cli import app
from medsearch.deid import SiteKey
from medsearch.errors import IndexCorruptError, KeyFileError, MedsearchError
from medsearch.indexing import FILE_STATE, SKIP_REPORT, cases, engine
from medsearch.io import SkipReason
from medsearch.sharing import export_index
from medsearch.store import IndexStore

ARCHIVE = SAMPLE / "tcga-luad-ct"
FILES = sorted(ARCHIVE.glob("*.dcm"))
# ID_0006 is a byte-identical copy of ID_0003 (same SOP instance): it is skipped as a duplicate.
DUPLICATE, ORIGINAL = "ID_0006_AGE_0075_CONTRAST_1_CT.dcm", "ID_0003_AGE_0075_CONTRAST_1_CT.dcm"


def test_sample_index_accounts_for_every_file(sample_index):
    store = IndexStore.open(sample_index)
    assert len(store) == 12
    report = pd.read_csv(sample_index / SKIP_REPORT)
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
    assert set(cases["manufacturer"]) == {"Siemens", "GE"}  # from the vendor vocabulary (medsearch.deid)
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

    def no_header(path, **options):
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
    skipped = pd.read_csv(tmp_path / "index" / SKIP_REPORT)
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
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "index" / SKIP_REPORT), skipped)


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


# -- every path accounted for: names that are not UTF-8, links, FIFOs, loops -------------------------


@pytest.mark.parametrize("workers", [pytest.param(0, id="in-process"), pytest.param(2, id="workers", marks=pytest.mark.slow)])
def test_a_name_that_is_not_utf8_is_indexed(tmp_path, sample_key, workers):
    archive = tmp_path / "archive"
    odd = paths.non_utf8_copy(FILES[0], archive / os.fsdecode(paths.NON_UTF8_FOLDER))
    shutil.copy(FILES[1], archive / FILES[1].name)
    not_dicom = paths.non_utf8_copy(ARCHIVE.parent / "labels.csv", archive, b"notes-\xe9.txt")
    index = tmp_path / "index"
    report = build_index(archive, index, key=sample_key, config=FAST, workers=workers)
    assert report.n_cases_added == 2 and report.accounted and report.n_files == 3
    assert [(s.path, s.reason) for s in report.skipped] == [(not_dicom, SkipReason.NOT_DICOM)]
    skipped = pd.read_csv(index / SKIP_REPORT)
    assert skipped["path"].tolist() == ["notes-\\xe9.txt"]  # readable, the byte escaped
    assert query(odd, index, k=1).results[0].distance < 1e-4
    # the cache keeps the name exactly: the next run reads no header again and adds nothing
    again = build_index(archive, index, key=sample_key, workers=0)
    assert again.n_headers_cached == 3 and again.n_cases_already_indexed == 2 and again.accounted


def test_linked_series_fifos_broken_links_and_loops_are_all_accounted_for(tmp_path, sample_key):
    series = tmp_path / "elsewhere" / "series"  # five valid files, reached through a link
    distinct = [f for f in FILES if f.name != DUPLICATE]
    paths.copy_series(distinct[:5], series)
    archive = tmp_path / "archive"
    shutil.copy(distinct[5], (archive / "direct").mkdir(parents=True) or archive / "direct" / distinct[5].name)
    paths.linked_series(series, archive, "linked")
    paths.fifo(archive / "direct")
    paths.broken_link(archive / "direct")
    paths.loop_to_parent(archive / "direct")
    paths.self_loop(archive)
    index = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(archive), "--index", str(index), "--key", str(sample_key.path),
                                      "--workers", "0", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["cases_added"] == 6 and summary["files_found"] == 10 and summary["files_accounted"]
    assert summary["skipped_by_reason"] == {"broken_link": 1, "not_a_file": 1, "symlink_loop": 2}
    skipped = pd.read_csv(index / SKIP_REPORT)
    assert sorted(zip(skipped["path"], skipped["reason"])) == [
        ("direct/broken.dcm", "broken_link"),
        ("direct/loop", "symlink_loop"),
        ("direct/pipe.dcm", "not_a_file"),
        ("self", "symlink_loop"),
    ]
    cases = {c for c in IndexStore.open(index).cases["case_id"]}
    linked = build_index(archive / "linked", tmp_path / "linked-index", key=sample_key, config=FAST, workers=0)
    assert linked.n_cases_added == 5 and set(IndexStore.open(tmp_path / "linked-index").cases["case_id"]) <= cases


# -- local state: site-only, in local/ -------------------------------------------------------------

_SHAREABLE = re.compile(r"^(manifest\.json|(vectors|cases|thumbs|raw|slices)-\d+\.(faiss|csv|npy)|slicetab-\d+\.npz|local-verified\.json|\.lock)$")


def test_local_state_is_in_local_and_never_leaves_the_site(tmp_path, sample_key):
    archive = tmp_path / "archive"
    patient = archive / "Doe^John_19600101"  # a folder name that identifies someone
    paths.copy_series([f for f in FILES if f.name != DUPLICATE], patient)  # enough patients to share
    shutil.copy(FILES[0], patient / "copy-of-first.dcm")  # a duplicate: its detail names the other file
    (patient / "notes.txt").write_text("not an image")
    index = tmp_path / "index"
    report = build_index(archive, index, key=sample_key, config=FAST, workers=0)
    assert len(report.skipped) == 2
    local = index / "local"
    assert stat.S_IMODE(local.stat().st_mode) == 0o700
    assert sorted(p.name for p in local.iterdir()) == ["file-state.sqlite", "skipped.csv"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in local.iterdir())
    # what the skip report says is relative to the archive, details included
    text = (index / SKIP_REPORT).read_text()
    assert "Doe^John_19600101/notes.txt" in text and str(tmp_path) not in text
    # outside local/: only shareable files, none naming the folder
    outside = [p for p in index.rglob("*") if p.is_file() and local not in p.parents]
    assert all(_SHAREABLE.match(p.name) for p in outside), [p.name for p in outside]
    for p in outside:
        assert b"Doe^John" not in p.read_bytes() and str(archive).encode() not in p.read_bytes(), p.name
    exported = export_index(index, tmp_path / "shared")
    assert not [f for f in exported.files if f.startswith("local") or "skipped" in f]
    assert not (tmp_path / "shared" / "local").exists()
    for p in (tmp_path / "shared").rglob("*"):
        assert b"Doe^John" not in p.read_bytes(), p.name


def test_an_index_with_the_old_layout_opens_and_resumes(sample_index, sample_key, tmp_path, monkeypatch):
    """Before local/, the skip report and the cache (paths as text, version 3) lay beside the data files."""
    index = tmp_path / "index"
    shutil.copytree(sample_index, index)
    os.replace(index / SKIP_REPORT, index / "skipped.csv")
    os.replace(index / FILE_STATE, index / "local-file-state.sqlite")
    (index / "local").rmdir()
    with closing(sqlite3.connect(index / "local-file-state.sqlite")) as db, db:
        for table in ("headers", "decoded"):
            db.execute(f"UPDATE {table} SET path = CAST(path AS TEXT)")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'version'")
    (index / "local-file-state.sqlite-journal").write_bytes(b"")  # left by a run killed between writes
    assert query(FILES[0], index, k=1).results[0].distance < 1e-4  # it opens as it is

    def no_header(path, **options):
        raise AssertionError("the header of an unchanged file was read again")

    for module in (cases, engine):
        monkeypatch.setattr(module, "summarize_file", no_header)
    report = build_index(ARCHIVE, index, key=sample_key, workers=0)
    assert report.n_headers_cached == len(FILES) and report.n_cases_already_indexed == 12 and report.accounted
    assert not [p.name for p in index.iterdir() if p.name.startswith(("skipped", "local-file-state"))]
    assert (index / FILE_STATE).exists() and len(pd.read_csv(index / SKIP_REPORT)) == 1


# -- the site key never inside the index folder --------------------------------------------------------


def test_a_key_inside_a_new_index_folder_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    index = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(FILES[0]), "--index", str(index), "--key", str(index / "site.key"), "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "keep the site key outside the index folder" in result.stderr
    assert not index.exists()
    # the same for a key file named by the environment
    monkeypatch.delenv("MEDSEARCH_SITE_KEY", raising=False)
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(index / "keys" / "site.key"))
    with pytest.raises(KeyFileError, match="keep the site key outside the index folder"):
        build_index(FILES[0], index)
    assert not index.exists()


def test_a_key_inside_an_existing_index_is_refused(sample_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(sample_index, index)
    inside = SiteKey.load(index / "site.key", create=True)
    manifest = (index / "manifest.json").read_bytes()
    with pytest.raises(KeyFileError, match="keep the site key outside the index folder"):
        build_index(FILES[0], index, key=inside)
    assert (index / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize(("models", "kept"), [((), "OTHER"), (("Scanotron 9000",), "Scanotron 9000")])
def test_the_sites_own_models_are_kept_only_when_allow_listed(tmp_path, sample_key, models, kept):
    archive = tmp_path / "archive"
    archive.mkdir()
    ds = pydicom.dcmread(FILES[0])
    ds.ManufacturerModelName = "Scanotron 9000"
    ds.save_as(archive / "one.dcm")
    config = Config().replace(deid={"models": list(models)})
    build_index(archive, tmp_path / "ix", key=sample_key, config=config, workers=0)
    cases = IndexStore.open(tmp_path / "ix").cases
    assert list(cases["model"]) == [kept]


def test_an_allow_list_entry_that_looks_like_a_name_is_refused(tmp_path, sample_key):
    config = Config().replace(deid={"models": ["Doe^Jane"]})
    with pytest.raises(MedsearchError, match="models"):
        build_index(ARCHIVE, tmp_path / "ix", key=sample_key, config=config, workers=0)


def test_a_name_that_is_not_utf8_keeps_its_bytes_in_the_link_table(tmp_path, sample_key):
    archive = tmp_path / "archive"
    odd = paths.non_utf8_copy(FILES[0], archive / os.fsdecode(paths.NON_UTF8_FOLDER))
    links = tmp_path / "private" / "links.csv"
    build_index(archive, tmp_path / "index", key=sample_key, config=FAST, workers=0, links=links)
    result = query(odd, tmp_path / "index", k=1).resolve(links)
    assert [os.fsencode(f) for f in result.results[0].source["files"]] == [os.fsencode(odd.resolve())]


# -- library calls that just work (issue 17) -------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## In Python"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def _readme_folder(tmp_path: Path) -> Path:
    """The files the README example names: archive/, labels.csv, study-folder/, other-study/."""
    shutil.copytree(ARCHIVE, tmp_path / "archive")
    shutil.copy(SAMPLE / "labels.csv", tmp_path / "labels.csv")
    for folder, name in (("study-folder", FILES[7]), ("other-study", FILES[3])):
        (tmp_path / folder).mkdir()
        shutil.copy(name, tmp_path / folder / name.name)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("guard", [False, True], ids=["as-written", "under-a-main-guard"])
def test_readme_python_example_runs_as_a_plain_script(tmp_path, guard):
    """Finding 6 of issue 17: pasted into a script without a main guard, the example spent 33 s,
    printed ~90 lines of worker tracebacks and exited 1. It runs as written, and under a guard."""
    example = _readme_example()
    assert "__main__" not in example and "workers=2" in example  # real worker processes, no guard
    if guard:
        example = 'if __name__ == "__main__":\n' + "".join(f"    {line}\n" if line else "\n" for line in example.splitlines())
    folder = _readme_folder(tmp_path)
    (folder / "example.py").write_text(example)
    env = {**os.environ, "MEDSEARCH_KEY_FILE": str(tmp_path.parent / f"{tmp_path.name}.key")}
    env.pop("MEDSEARCH_SITE_KEY", None)
    done = subprocess.run([sys.executable, "example.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "'cases_added': 12" in done.stdout and (folder / "sheet.png").is_file() and (folder / "sheet.html").is_file()
    assert "worker processes cannot be used" not in done.stderr  # the workers ran


def test_workers_unavailable_means_this_process_indexes_and_says_so(tmp_path, sample_key, monkeypatch, caplog):
    """Where worker processes cannot start (here: this process is a daemon, which may have no
    children), the run goes on in this process, with one line saying why."""
    import multiprocessing

    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    archive = tmp_path / "archive"
    archive.mkdir()
    for f in FILES[:3]:
        shutil.copy(f, archive / f.name)
    with caplog.at_level("WARNING", logger="medsearch.indexing.engine"):
        report = build_index(archive, tmp_path / "index", config=FAST, key=sample_key, workers=2)
    assert report.n_cases_added == 3 and report.workers == 0
    lines = [r.getMessage() for r in caplog.records if "worker processes cannot be used here" in r.getMessage()]
    assert lines == ["worker processes cannot be used here (this process is itself a daemon process, which may not "
                     "start others); indexing in this process instead"]


def test_workers_never_run_the_calling_script_again(monkeypatch):
    """While a worker starts, the main module shows no file to run (unless the workers need a function of it)."""
    import types

    from medsearch.indexing.cases import _Setup
    from medsearch.indexing.options import IndexOptions
    from medsearch.indexing.workers import _main_kept_out

    main = types.ModuleType("__main__")
    main.__file__ = "/somewhere/script.py"
    monkeypatch.setitem(sys.modules, "__main__", main)
    setup = _Setup(config=FAST, encoder=None, describe=None)  # type: ignore[arg-type]  # not used here
    with _main_kept_out(setup):
        assert not hasattr(main, "__file__") and main.__spec__ is None
    assert main.__file__ == "/somewhere/script.py"

    def custom_load(case):  # a decoder of the script: the workers must import it
        raise NotImplementedError

    custom_load.__module__ = "__main__"
    with _main_kept_out(_Setup(config=FAST, encoder=None, describe=None, options=IndexOptions(load=custom_load))):  # type: ignore[arg-type]
        assert main.__file__ == "/somewhere/script.py"


# -- a mixed archive: only images, mosaics split, copies and patients (issue 17) ------------------------


def test_mixed_archive_indexes_only_images_and_splits_the_mosaic(tmp_path, sample_key, shared_dicom):
    """Finding 1 and the checks of issue 17: SEG, RT, SR, KO, PR, a tiny SM and a tiny CT are
    skipped as not_an_image; the Siemens mosaic is a case of 36 slices; the copy with new UIDs
    collapses with its original at query time, and leaving out the patient leaves both out."""
    archive = tmp_path / "archive"
    archive.mkdir()
    expected = write_mixed_archive(archive, shared_dicom=shared_dicom)
    report = build_index(archive, tmp_path / "index", config=FAST, key=sample_key, workers=0)
    skipped = {s.path.relative_to(archive).as_posix(): s for s in report.skipped}
    assert {name: s.reason.value for name, s in skipped.items()} == {n: r for n, r in expected.items() if r}
    assert skipped["pr.dcm"].detail.startswith("Grayscale Softcopy Presentation State Storage is not an image")
    assert skipped["sm-10px.dcm"].detail.startswith("VL Whole Slide Microscopy Image Storage is not an image")
    assert report.n_cases_added == 4 and report.accounted  # ct, the copy with new UIDs, mr, the mosaic
    cases = IndexStore.open(tmp_path / "index").cases
    assert sorted(cases["n_slices"]) == [1, 1, 1, 36]
    mosaic = cases[cases["n_slices"] == 36].iloc[0]
    assert (mosaic["rows"], mosaic["columns"]) == (64, 64)  # one tile, not the 384 x 384 mosaic
    ct = archive / "ct.dcm"
    kept = query(ct, tmp_path / "index", k=4, collapse_copies=False)
    assert [m.distance for m in kept.results[:2]] == [0.0, 0.0]  # ct.dcm and its copy with new UIDs
    result = query(ct, tmp_path / "index", k=4)
    assert len(result.results) == 3 and result.query["excluded"] == {"copies": 1}
    others = query(ct, tmp_path / "index", k=4, exclude_same_patient=True, key=sample_key)
    assert len(others.results) == 2 and others.query["excluded"]["same_patient"] == 2


def test_an_index_keeps_one_crop_grid(phantom_index, tmp_path):
    """Cases added with other tiles than the index's (or none) would not match one query box: refused
    in one line, the index unchanged; without a config, a run adds with the index's own grid."""
    from medsearch.config import load_config
    from medsearch.errors import ConfigError

    archive, _ = phantom_index
    index = tmp_path / "ix"
    five = load_config("default").replace(preprocess={"slice_spacing_mm": 5.0})
    build_index(archive / "s0", index, config=five)
    with pytest.raises(ConfigError, match=r"keeps no crop vectors for its 1 case\(s\), and this config asks for crop_grid = 2"):
        build_index(archive, index, config=five.replace(index={"crop_grid": 2}))
    assert index_info(index)["cases"] == 1
    build_index(archive / "s1", index)  # the index's own settings
    info = index_info(index)
    assert info["cases"] == 2 and not info["crop_vectors"]["kept"]

    tiled = tmp_path / "tiled"
    build_index(archive / "s0", tiled, config=five.replace(index={"crop_grid": 2}))
    build_index(archive / "s1", tiled)
    info = index_info(tiled)
    assert info["cases"] == 2 and info["crop_vectors"]["vectors"] == 4 * info["slice_vectors"]["vectors"]
    config = tmp_path / "five.toml"
    config.write_text("[preprocess]\nslice_spacing_mm = 5\n")
    result = CliRunner().invoke(app, ["index", str(archive / "s2"), "--index", str(tiled), "--config", str(config)])
    assert result.exit_code == 2 and "keeps crop vectors of crop_grid = 2 for its 2 case(s)" in result.output
    assert len(result.output.strip().splitlines()) == 1 and index_info(tiled)["cases"] == 2
