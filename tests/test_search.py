from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import medsearch.pipeline as pipeline_module
from medsearch import Config, build_index, index_info, query
from medsearch.deid import SiteKey
from medsearch.errors import EncoderMismatchError, InvalidStudyError, KeyFileError, MedsearchError
from medsearch.io import SkipReason
from medsearch.search import Searcher
from medsearch.store import IndexStore

from conftest import SAMPLE

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


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name[:7])
def test_each_archive_file_finds_its_own_case_first(sample_index, path):
    result = query(path, sample_index, k=3)
    top = result.results[0]
    assert top.rank == 1 and top.distance == pytest.approx(0.0, abs=1e-4)
    assert result.results[1].distance > 1e-3
    expected = "True" if "CONTRAST_1" in path.name else "False"
    assert str(top.metadata["Contrast"]) == expected


def test_duplicate_file_and_original_give_the_same_case(sample_index):
    a = query(ARCHIVE / DUPLICATE, sample_index, k=1).results[0]
    b = query(ARCHIVE / ORIGINAL, sample_index, k=1).results[0]
    assert a.case_id == b.case_id


def test_labels_and_metadata_reach_the_case_table(sample_index):
    cases = IndexStore.open(sample_index).cases
    assert sorted(cases["Contrast"].astype(str).value_counts().to_dict().items()) == [("False", 6), ("True", 6)]
    assert set(cases["modality"]) == {"CT"}
    assert set(cases["manufacturer"]) == {"SIEMENS", "GE MEDICAL SYSTEMS"}
    assert cases["n_slices"].tolist() == [1] * 12
    info = index_info(sample_index)
    assert info["cases"] == 12 and info["label_columns"] == ["Contrast"]
    assert info["encoder"]["name"] == "efficientnet-lite0"


def test_query_result_as_dict_and_frame(sample_index):
    result = query(FILES[0], sample_index, k=4)
    data = result.to_dict()
    assert set(data) == {"query", "distance", "results"}
    assert [r["rank"] for r in data["results"]] == [1, 2, 3, 4]
    assert set(data["results"][0]) == {"rank", "case_id", "distance", "metadata"}
    frame = result.to_frame()
    assert list(frame.columns[:3]) == ["rank", "case_id", "distance"]
    assert frame["distance"].is_monotonic_increasing


@pytest.mark.parametrize("file_cache", [True, False], ids=["file-cache", "no-file-cache"])
def test_rerun_adds_nothing_and_decodes_nothing(sample_index, sample_key, tmp_path, monkeypatch, file_cache):
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    manifest = (copy / "manifest.json").read_bytes()

    def no_decoding(job, setup):
        raise AssertionError("a case already indexed was decoded again")

    def no_header(path):
        raise AssertionError("the header of an unchanged file was read again")

    monkeypatch.setattr(pipeline_module, "prepare_case", no_decoding)
    if file_cache:  # unchanged files (same path, size, mtime) are not even opened
        monkeypatch.setattr(pipeline_module, "summarize_file", no_header)
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
    real_pool = pipeline_module.pool_slices
    calls = {"n": 0}

    def pool_then_die(*args, **kwargs):  # called once per encoded case, before it joins a chunk
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("power cut")
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "pool_slices", pool_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(ARCHIVE, index, key=sample_key, commit_every=2, batch_images=2, workers=0)
    assert len(IndexStore.open(index)) == 4  # two committed chunks of two
    monkeypatch.setattr(pipeline_module, "pool_slices", real_pool)
    report = build_index(ARCHIVE, index, key=sample_key, commit_every=2, workers=0)
    assert report.n_cases_already_indexed == 4 and report.n_cases_total == 12


def test_another_key_is_refused_for_adding(sample_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    other = SiteKey.load(tmp_path / "other.key", create=True)
    with pytest.raises(KeyFileError, match="another site key"):
        build_index(ARCHIVE, copy, key=other)


def test_other_preprocessing_or_encoder_is_refused(sample_index):
    with pytest.raises(EncoderMismatchError, match=r"other preprocessing \(ct_window, slices differ\)"):
        query(FILES[0], sample_index, config="chest-ct")
    with pytest.raises(EncoderMismatchError, match="slices differ"):
        Searcher(sample_index, config=Config().replace(preprocess={"slices": 3}))


def test_a_second_writer_gets_a_clear_message(tmp_path, sample_key):
    from filelock import FileLock

    index = tmp_path / "index"
    index.mkdir()
    with FileLock(str(index / ".lock")):
        with pytest.raises(MedsearchError, match="another medsearch process is writing"):
            build_index(FILES[0], index, key=sample_key, lock_timeout=0.1)


def test_bad_study_errors_are_one_line(sample_index, tmp_path):
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    for study in (tmp_path / "missing.dcm", not_dicom, empty):
        with pytest.raises(InvalidStudyError) as info:
            query(study, sample_index)
        assert "\n" not in str(info.value)


def test_labels_file_errors(tmp_path, sample_key):
    bad = tmp_path / "labels.csv"
    bad.write_text("name,value\na,1\n")
    with pytest.raises(MedsearchError, match="--label-key"):
        build_index(FILES[0], tmp_path / "ix", key=sample_key, labels=bad)
    with pytest.raises(MedsearchError, match="does not exist"):
        build_index(FILES[0], tmp_path / "ix", key=sample_key, labels=tmp_path / "nope.csv")


# -- the real archives of ../shared/data ----------------------------------------------------------


def test_gantry_tilt_series_query_finds_itself(shared_dicom, tmp_path, sample_key):
    series = shared_dicom / "ct-head-ge-gantry-tilt" / "In" / "GE"
    index = tmp_path / "index"
    report = build_index(shared_dicom / "ct-head-ge-gantry-tilt", index, key=sample_key)
    assert report.n_cases_total == 1
    assert {s.reason for s in report.skipped} <= {SkipReason.NOT_DICOM}  # the LICENSE file
    result = query(series, index, k=1)
    assert result.results[0].distance == pytest.approx(0.0, abs=1e-4)
    assert result.results[0].metadata["n_slices"] == 28


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
