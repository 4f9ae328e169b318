"""The query side (medsearch.search): each archive file finds its own case, results as dict and
frame, a mismatched encoder or preprocessing is refused, bad studies give one-line errors, a real
series finds itself; importing it loads nothing of the indexing engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import SAMPLE

from medsearch import Config, build_index, query
from medsearch.errors import EncoderMismatchError, InvalidStudyError
from medsearch.io import SkipReason
from medsearch.search import Searcher

ARCHIVE = SAMPLE / "tcga-luad-ct"
FILES = sorted(ARCHIVE.glob("*.dcm"))
# ID_0006 is a byte-identical copy of ID_0003 (same SOP instance): it is skipped as a duplicate.
DUPLICATE, ORIGINAL = "ID_0006_AGE_0075_CONTRAST_1_CT.dcm", "ID_0003_AGE_0075_CONTRAST_1_CT.dcm"


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


def test_query_result_as_dict_and_frame(sample_index):
    result = query(FILES[0], sample_index, k=4)
    data = result.to_dict()
    assert set(data) == {"query", "distance", "results"}
    assert [r["rank"] for r in data["results"]] == [1, 2, 3, 4]
    assert set(data["results"][0]) == {"rank", "case_id", "distance", "metadata"}
    frame = result.to_frame()
    assert list(frame.columns[:3]) == ["rank", "case_id", "distance"]
    assert frame["distance"].is_monotonic_increasing


def test_other_preprocessing_or_encoder_is_refused(sample_index):
    with pytest.raises(EncoderMismatchError, match=r"other preprocessing \(ct_window, slices differ\)"):
        query(FILES[0], sample_index, config="chest-ct")
    with pytest.raises(EncoderMismatchError, match="slices differ"):
        Searcher(sample_index, config=Config().replace(preprocess={"slices": 3}))


def test_bad_study_errors_are_one_line(sample_index, tmp_path):
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    for study in (tmp_path / "missing.dcm", not_dicom, empty):
        with pytest.raises(InvalidStudyError) as info:
            query(study, sample_index)
        assert "\n" not in str(info.value)


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


# -- the query side loads nothing of the indexing engine -------------------------------------------


@pytest.mark.slow
def test_importing_search_loads_no_indexing_module():
    code = (
        "import sys, medsearch.search\n"
        "loaded = sorted(m for m in sys.modules if m == 'medsearch.indexing' or m.startswith('medsearch.indexing.'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
