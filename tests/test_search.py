"""The query side (medsearch.search): each archive file finds its own case, results as dict and
frame, a mismatched encoder or preprocessing is refused, bad studies give one-line errors, a real
series finds itself; importing it loads nothing of the indexing engine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE
from mixed.archive import write_patients

from medsearch import Config, build_index, query
from medsearch.errors import ConfigError, EncoderMismatchError, IndexNotFoundError, InvalidStudyError
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
    with pytest.raises(EncoderMismatchError, match=r"other preprocessing \(ct_window, slice_spacing_mm, slices differ\)"):
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


def test_index_info_measures_the_groups_of_patients(sample_index):
    """Finding 2 of issue 16: what leaves the site is measured; info shows the smallest group."""
    from medsearch.errors import ConfigError
    from medsearch.search import index_info

    groups = index_info(sample_index)["k_anonymity"]
    assert groups["k"] == 5 and groups["patients"] == 11
    assert groups["smallest_group"] == 1 and groups["unique_patients"] == 11  # every sample patient stands out
    assert {"sex", "age_band", "manufacturer", "model", "spacing_mm"} <= set(groups["quasi_identifiers"])
    assert index_info(sample_index, k_anonymity=1)["k_anonymity"]["patients_below_k"] == 0
    assert Searcher(sample_index).info()["k_anonymity"] == groups  # what serve's /info answers
    with pytest.raises(ConfigError, match="k-anonymity must be a whole number of at least 1"):
        index_info(sample_index, k_anonymity=0)


# -- results that are different cases (issue 17) ---------------------------------------------------

# name -> (sample file, PatientID): each a new series (new UIDs); q-copy and c1..c3 are exact pixel copies
PATIENTS = {
    "q": ("ID_0050_AGE_0074_CONTRAST_0_CT.dcm", "PAT-Q"),
    "q-again": ("ID_0054_AGE_0082_CONTRAST_0_CT.dcm", "PAT-Q"),
    "q-copy": ("ID_0050_AGE_0074_CONTRAST_0_CT.dcm", "PAT-Q"),
    "c1": ("ID_0070_AGE_0074_CONTRAST_0_CT.dcm", "PAT-C1"),
    "c2": ("ID_0070_AGE_0074_CONTRAST_0_CT.dcm", "PAT-C2"),
    "c3": ("ID_0070_AGE_0074_CONTRAST_0_CT.dcm", "PAT-C3"),
    "y1": ("ID_0002_AGE_0074_CONTRAST_1_CT.dcm", "PAT-Y"),
    "y2": ("ID_0003_AGE_0075_CONTRAST_1_CT.dcm", "PAT-Y"),
    "a": ("ID_0000_AGE_0060_CONTRAST_1_CT.dcm", "PAT-A"),
    "b": ("ID_0008_AGE_0051_CONTRAST_1_CT.dcm", "PAT-B"),
    "d": ("ID_0018_AGE_0074_CONTRAST_1_CT.dcm", "PAT-D"),
    "e": ("ID_0022_AGE_0074_CONTRAST_1_CT.dcm", "PAT-E"),
    "f": ("ID_0060_AGE_0080_CONTRAST_0_CT.dcm", "PAT-F"),
    "g": ("ID_0063_AGE_0073_CONTRAST_0_CT.dcm", "PAT-G"),
    "h": ("ID_0074_AGE_0074_CONTRAST_0_CT.dcm", "PAT-H"),
}
SMALL = Config().replace(preprocess={"size": 64, "slices": 1})


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """An index of PATIENTS, labelled by a CSV with a path, an id and an integer column; its key and report."""
    from medsearch.deid import SiteKey

    root = tmp_path_factory.mktemp("patients")
    files = write_patients(root / "archive", PATIENTS)
    rows = ["file,source_path,PatientID,Age,grade"]
    for i, (name, path) in enumerate(sorted(files.items())):
        if name != "h":  # one file without a row, and one row without a file
            rows.append(f"{path.name},C:\\export\\{path.name},{PATIENTS[name][1]},{60 + i},{'G' + str(i % 3)}")
    rows.append("missing.dcm,C:\\export\\missing.dcm,PAT-Z,70,G1")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    key = SiteKey.load(root / "site.key", create=True)
    report = build_index(root / "archive", root / "index", config=SMALL, key=key, labels=root / "labels.csv", workers=0)
    return {"index": root / "index", "key": key, "key_path": root / "site.key", "files": files, "report": report}


def _patient_of(result, searcher) -> list[str]:
    return [m.metadata["patient"] for m in result.results]


def test_exact_copies_count_once_by_default(patients):
    """Finding 2 of issue 17: copies of one image filled the first ranks at distance ~0."""
    searcher = Searcher(patients["index"])
    everything = searcher.search(patients["files"]["c1"], k=15, collapse_copies=False)
    assert len(everything.results) == 15 and [m.distance for m in everything.results[:3]] == [0.0, 0.0, 0.0]
    result = searcher.search(patients["files"]["c1"], k=15)
    hashes = [m.metadata["pixel_hash"] for m in result.results]
    assert len(hashes) == len(set(hashes)) == 12  # c1..c3 count once, so do q and q-copy
    assert result.results[0].distance == 0.0 and result.results[1].distance > 1e-3
    assert result.query["excluded"] == {"copies": 3}
    assert [m.rank for m in result.results] == list(range(1, 13))


def test_exclude_same_patient_leaves_out_every_case_of_the_query_patient(patients):
    searcher = Searcher(patients["index"], key=patients["key"])
    query_file = patients["files"]["q"]
    plain = searcher.search(query_file, k=5)
    own = searcher.patient_of(query_file)
    assert plain.results[0].metadata["patient"] == own  # the query's own case comes first
    result = searcher.search(query_file, k=5, exclude_same_patient=True)
    assert len(result.results) == 5  # more candidates were asked of faiss
    assert own not in _patient_of(result, searcher)
    assert result.query["excluded"]["same_patient"] == 3  # q, q-again and q-copy
    # through query() and a key file, and with a volume decoded beforehand
    from medsearch.io import load_study

    again = query(query_file, patients["index"], k=5, exclude_same_patient=True, key=patients["key_path"],
                  volume=load_study(query_file)[1])
    assert [m.case_id for m in again.results] == [m.case_id for m in result.results]


def test_one_per_patient_keeps_the_best_case_of_each(patients):
    searcher = Searcher(patients["index"])
    result = searcher.search(patients["files"]["y1"], k=15, one_per_patient=True, collapse_copies=False)
    patients_seen = _patient_of(result, searcher)
    assert len(patients_seen) == len(set(patients_seen)) == 12  # 15 cases of 12 patients
    assert result.query["excluded"] == {"other_cases_of_patient": 3}


def test_k_results_come_back_while_enough_cases_remain(patients):
    searcher = Searcher(patients["index"], key=patients["key"])
    q = patients["files"]["q"]
    # 15 cases - 3 of the query's patient - 2 copies of c1 = 10 different cases
    assert len(searcher.search(q, k=10, exclude_same_patient=True).results) == 10
    assert len(searcher.search(q, k=11, exclude_same_patient=True).results) == 10
    assert len(searcher.search(q, k=1, exclude_same_patient=True).results) == 1


def test_exclude_same_patient_needs_the_index_key(patients, tmp_path, monkeypatch):
    from medsearch.deid import SiteKey
    from medsearch.errors import KeyFileError

    monkeypatch.delenv("MEDSEARCH_SITE_KEY", raising=False)
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(tmp_path / "no.key"))
    searcher = Searcher(patients["index"])
    assert searcher.search(patients["files"]["q"], k=2).results  # no key needed without the option
    with pytest.raises(KeyFileError, match="leaving out the query's patient needs the site key"):
        searcher.search(patients["files"]["q"], k=2, exclude_same_patient=True)
    other = SiteKey.load(tmp_path / "other.key", create=True)
    with pytest.raises(KeyFileError, match="built with another site key"):
        Searcher(patients["index"], key=other).search(patients["files"]["q"], k=2, exclude_same_patient=True)


def test_query_cli_leaves_out_the_patient_and_copies(patients):
    from typer.testing import CliRunner

    from medsearch.cli import app

    q = str(patients["files"]["q"])
    args = ["query", q, "--index", str(patients["index"]), "--json", "-k", "15"]
    run = CliRunner().invoke(app, [*args, "--exclude-same-patient", "--key", str(patients["key_path"]), "--one-per-patient"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout)
    own = Searcher(patients["index"], key=patients["key"]).patient_of(q)
    found = [r["metadata"]["patient"] for r in data["results"]]
    assert own not in found and len(found) == len(set(found)) == 9  # 11 other patients, copies c2, c3 counted once
    assert data["query"]["excluded"] == {"same_patient": 3, "copies": 2, "other_cases_of_patient": 1}
    kept = json.loads(CliRunner().invoke(app, [*args, "--keep-copies"]).stdout)
    assert len(kept["results"]) == 15 and "excluded" not in kept["query"]


# -- labels on purpose (issue 17) ------------------------------------------------------------------


def test_labels_leave_out_paths_and_ids_and_say_how_many_rows_matched(patients):
    """Finding 3 of issue 17: every column became a label and nothing said how many rows matched."""
    labels = patients["report"].to_dict()["labels"]
    assert labels["columns"] == ["Age", "grade"]
    assert labels["dropped"] == {"source_path": "file paths", "PatientID": "identifiers"}
    assert (labels["rows"], labels["rows_matched"]) == (15, 14)
    assert (labels["cases_labelled"], labels["cases_added"]) == (14, 15)


def test_integer_labels_stay_integers(patients):
    result = Searcher(patients["index"]).search(patients["files"]["a"], k=3)
    top = result.results[0]
    assert isinstance(top.metadata["Age"], int) and top.metadata["grade"].startswith("G")
    frame = result.to_frame()
    assert "71.0" not in frame.to_string() and ".0" not in json.dumps(result.to_dict()["results"][0]["metadata"]["Age"])


def test_index_summary_prints_label_coverage_and_dropped_columns(patients, tmp_path):
    from typer.testing import CliRunner

    from medsearch.cli import app

    root = patients["index"].parent
    run = CliRunner().invoke(app, ["index", str(root / "archive"), "--index", str(tmp_path / "index"),
                                   "--labels", str(root / "labels.csv"), "--key", str(patients["key_path"]),
                                   "--workers", "0", "--quiet", "--config", str(_small_config(tmp_path))])
    assert run.exit_code == 0, run.output
    assert "labels from labels.csv: 14 of 15 row(s) matched a case added now; 14 of 15 new case(s) have labels; columns: Age, grade" in run.output
    assert "label columns left out: source_path (file paths); PatientID (identifiers); choose the columns with --label-columns" in run.output


def _small_config(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text("[preprocess]\nsize = 64\nslices = 1\n")
    return path


# -- an archive given where an index belongs (issue 17) --------------------------------------------


def test_an_archive_given_as_index_says_to_index_it_first(tmp_path):
    """Issue 17: "build one with: medsearch index ARCHIVE --index <the archive>" pointed at the archive."""
    from medsearch.search import index_info

    message = (r"is not a medsearch index but a folder of 13 file\(s\).*index it first: "
               r"medsearch index .*tcga-luad-ct --index NEW_FOLDER, then query with --index NEW_FOLDER")
    with pytest.raises(IndexNotFoundError, match=message):
        query(FILES[0], ARCHIVE)
    with pytest.raises(IndexNotFoundError, match=message):
        index_info(ARCHIVE)
    with pytest.raises(IndexNotFoundError, match="build one with: medsearch index ARCHIVE --index"):
        query(FILES[0], tmp_path)  # an empty folder: there the advice to build one is right


# -- a cold query pays for what it uses (issue 17) -------------------------------------------------


def test_embeddings_are_the_monai_pipeline_s(patients):
    """The query's numpy preprocessing feeds the encoder exactly what the MONAI pipeline gives."""
    import torch

    from medsearch.embedding import embed_volume, pool_slices
    from medsearch.io import load_study
    from medsearch.transforms import build_slice_transform, select_slices

    searcher = Searcher(patients["index"])
    info, preprocess = searcher.encoder.info, searcher.config.preprocess
    for name in ("q", "a", "y2"):
        volume = load_study(patients["files"][name])[1]
        slices = select_slices(volume.pixels, spacing=volume.spacing, mode=preprocess.slice_mode, count=preprocess.slices)
        monai = build_slice_transform(preprocess, modality=volume.modality, rgb=volume.rgb, channels=info.in_channels,
                                      mean=info.mean, std=info.std)
        batch = torch.stack([monai(s) for s in slices]).numpy()
        expected = pool_slices(searcher.encoder.embed(batch), preprocess.pool)
        np.testing.assert_array_equal(embed_volume(volume, searcher.encoder, searcher.config), expected)


_COLD = """
import atexit, sys
atexit.register(lambda: sys.stderr.write(f"\\nLOADED torch={'torch' in sys.modules} monai={'monai' in sys.modules}\\n"))
from medsearch.cli import app
app(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_query_through_onnx_imports_neither_torch_nor_monai(patients, tmp_path):
    """Finding 5 of issue 17: a cold query spent most of its seconds importing MONAI and torch."""
    pytest.importorskip("onnxruntime")
    config = tmp_path / "onnx.toml"
    config.write_text("[preprocess]\nsize = 64\nslices = 1\n[encoder]\nruntime = \"onnx\"\n")
    Searcher(patients["index"], config=config)  # the ONNX export exists (made now if not)
    args = ["query", str(patients["files"]["q"]), "--index", str(patients["index"]), "--config", str(config), "--json"]
    done = subprocess.run([sys.executable, "-c", _COLD, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["distance"] == 0.0
    assert "LOADED torch=False monai=False" in done.stderr


@pytest.mark.parametrize(("extra", "message"), [
    (["--where", "modality"], "filter 'modality' has no operator"),
    (["--html", "sheet.png"], "must end in .html or .htm"),
])
def test_query_argument_errors_are_told_before_heavy_imports(tmp_path, extra, message):
    """A typo costs no library import: the error comes before torch, MONAI, faiss or pandas are loaded."""
    study = FILES[0]
    for args in ([str(tmp_path / "missing.dcm"), "--index", str(tmp_path)], [str(study), "--index", str(tmp_path), *extra]):
        done = subprocess.run([sys.executable, "-c", _COLD, "query", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert "LOADED torch=False monai=False" in done.stderr
        assert ("does not exist; check the path" if "missing" in args[0] else message) in done.stderr
    code = "import sys; from medsearch.cli import _check_query_arguments; print(sorted(m for m in ('pandas', 'faiss', 'pydicom', 'torch') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.strip() == "[]"


def test_where_matching_nothing_says_so_and_exits_non_zero(sample_index):
    from typer.testing import CliRunner

    from medsearch.cli import app

    run = CliRunner().invoke(app, ["query", str(FILES[0]), "--index", str(sample_index), "--where", "modality=PT"])
    assert run.exit_code == 1
    assert f"no case of {sample_index} matches modality=PT; nothing to rank" in run.output


# -- volumes and regions: slice vectors, late-interaction re-ranking, region queries -----------------


def _slab(volume, start: int, length: int, *, seed: int):
    """Slices ``start:start + length`` of a volume, with noise and a 2-pixel shift, as a new volume."""
    from medsearch.io import Volume

    rng = np.random.default_rng(seed)
    cut = volume.pixels[start:start + length]
    pixels = np.roll(cut, (2, -2), axis=(1, 2)) + rng.normal(0, 30, cut.shape)
    return Volume(pixels.astype(np.float32), volume.spacing, volume.modality, volume.rgb, z_known=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_slab_finds_its_series_and_where_it_lies(phantom_index, seed):
    archive, index = phantom_index
    result = query(archive / f"s{seed}", index, k=3, slices="6:12")
    top = result.results[0]
    assert result.query["region"] == {"slices": [6, 12]} and result.query["rerank"]["used"] is True
    assert top.distance == pytest.approx(0.0, abs=1e-4)
    assert top.location["best_slice"] == top.location["query_slice"] and 6 <= top.location["query_slice"] < 12
    assert top.location["best_slice_mm"] == pytest.approx(2.5 * top.location["best_slice"])
    assert result.distance.startswith("1 - late-interaction similarity")
    assert {"best_slice", "best_slice_mm", "query_slice", "query_slice_mm", "slice_score"} <= set(top.to_dict())
    own = query(archive / f"s{seed}", index, k=1).results[0].case_id
    assert top.case_id == own


@pytest.mark.parametrize("start", [0, 7, 14])
def test_a_noisy_shifted_slab_lands_within_two_slices(phantom_index, start):
    from medsearch.io import load_study

    archive, index = phantom_index
    searcher = Searcher(index)
    own = searcher.search(archive / "s1", k=1).results[0].case_id
    slab = _slab(load_study(archive / "s1")[1], start, 8, seed=start)
    top = searcher.search("slab", volume=slab, k=3).results[0]
    assert top.case_id == own
    assert abs(top.location["best_slice"] - top.location["query_slice"] - start) <= 2


def test_a_box_on_a_slice_is_matched_against_slices(phantom_index):
    archive, index = phantom_index
    result = query(archive / "s2", index, k=3, slices="12", roi="8,8,56,56")
    assert result.query["region"] == {"slices": [12, 13], "roi": [8, 8, 56, 56], "embedded_box": [8, 8, 56, 56]}
    top = result.results[0]
    assert top.case_id == query(archive / "s2", index, k=1).results[0].case_id
    assert top.location["query_slice"] == 12 and abs(top.location["best_slice"] - 12) <= 2


def test_pooled_ranking_still_says_where_each_result_matched(phantom_index):
    archive, index = phantom_index
    pooled = query(archive / "s0", index, k=3, rerank=False)
    assert "rerank" not in pooled.query and not pooled.distance.startswith("1 - late")
    assert all(m.location is not None for m in pooled.results)


def test_an_index_without_slice_vectors_ranks_by_case_vector_and_says_so(phantom_index, tmp_path):
    import shutil

    from medsearch.store import IndexStore

    archive, index = phantom_index
    old = tmp_path / "old"
    shutil.copytree(index, old)
    store = IndexStore.open(old)
    store.slices = None  # as an index of an older medsearch: no slice files
    store.commit()
    assert "slices" not in IndexStore.open(old).manifest.files
    result = query(archive / "s1", old, k=2, slices="6:12")
    assert "no slice vectors" in result.query["rerank"]["note"] and result.query["rerank"]["used"] is False
    assert result.results[0].location is None and "best_slice" not in result.results[0].to_dict()
    assert result.results[0].case_id == query(archive / "s1", index, k=1).results[0].case_id


@pytest.mark.parametrize(("slices", "roi", "error", "message"), [
    ("30:40", None, InvalidStudyError, "outside the study's 24 slice"),
    (None, "0,0,100,10", InvalidStudyError, "outside the study's 64 x 64"),
    ("9:3", None, ConfigError, "is empty"),
])
def test_a_bad_region_is_one_line_that_says_what_to_do(phantom_index, slices, roi, error, message):
    archive, index = phantom_index
    with pytest.raises(error, match=message):
        query(archive / "s0", index, slices=slices, roi=roi)


def test_query_json_carries_the_match_location(phantom_index):
    from typer.testing import CliRunner

    from medsearch.cli import app

    archive, index = phantom_index
    run = CliRunner().invoke(app, ["query", str(archive / "s1"), "--index", str(index), "-k", "2", "--slices", "6:12", "--json"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout)
    top = data["results"][0]
    assert data["query"]["region"] == {"slices": [6, 12]}
    assert top["best_slice"] == top["query_slice"] and top["best_slice_mm"] == pytest.approx(2.5 * top["best_slice"])
    table = CliRunner().invoke(app, ["query", str(archive / "s1"), "--index", str(index), "-k", "2", "--roi", "8,8,56,56"])
    assert table.exit_code == 0 and "matched at" in table.stdout and "<- 12 (30.0 mm)" in table.stdout
    bad = CliRunner().invoke(app, ["query", str(archive / "s1"), "--index", str(index), "--roi", "1,2"])
    assert bad.exit_code == 2 and "roi must be four whole pixel numbers" in bad.output


def test_a_slab_of_a_real_series_finds_it(shared_dicom, tmp_path):
    from medsearch.config import load_config
    from medsearch.io import load_study

    series = shared_dicom / "ct-head-ge-gantry-tilt"
    config = load_config("default").replace(preprocess={"slice_spacing_mm": 5.0})
    build_index(series, tmp_path / "ix", config=config)
    build_index(shared_dicom / "mr-philips-fmri", tmp_path / "ix", config=config)
    searcher = Searcher(tmp_path / "ix")
    own = searcher.search(series, k=1).results[0].case_id
    result = searcher.search(series, k=2, slices="10:18")
    top = result.results[0]
    assert top.case_id == own and top.location["best_slice"] == top.location["query_slice"]
    assert top.location["best_slice_mm"] == pytest.approx(top.location["best_slice"] * 4.0, rel=0.01)  # 4 mm apart
    slab = _slab(load_study(series)[1], 12, 8, seed=0)
    moved = searcher.search("slab", volume=slab, k=2).results[0]
    assert moved.case_id == own and abs(moved.location["best_slice"] - moved.location["query_slice"] - 12) <= 2


# -- box queries against crop vectors (index.crop_grid) ------------------------------------------------


@pytest.fixture(scope="module")
def crop_index(phantom_index, tmp_path_factory):
    """The phantom archive indexed again with crop vectors: each kept slice in 2 x 2 tiles."""
    from medsearch.config import load_config

    archive, _ = phantom_index
    index = tmp_path_factory.mktemp("crops") / "index"
    build_index(archive, index, config=load_config("default").replace(preprocess={"slice_spacing_mm": 2.5}, index={"crop_grid": 2}))
    return archive, index


def test_a_box_query_names_the_tile_it_matched(crop_index):
    from medsearch.search import index_info

    archive, index = crop_index
    info = index_info(index)
    assert info["crop_vectors"]["kept"] and info["crop_vectors"]["vectors"] == 4 * info["slice_vectors"]["vectors"]
    result = query(archive / "s2", index, k=3, slices="12", roi="40,40,56,56")
    assert result.query["rerank"]["crop_vectors"] is True and "crop_note" not in result.query["rerank"]
    # a 16 px box, widened about its centre to a tile (43 px of a 64 px slice) and kept inside the image
    assert result.query["region"]["embedded_box"] == [21, 21, 64, 64]
    top = result.results[0]
    assert top.case_id == query(archive / "s2", index, k=1).results[0].case_id
    x0, y0, x1, y1 = top.location["best_box"]
    assert x0 <= 48 < x1 and y0 <= 48 < y1  # the tile holds the box's centre
    assert abs(top.location["best_slice"] - 12) <= 2 and top.to_dict()["best_box"] == [x0, y0, x1, y1]
    frame = result.to_frame()  # a researcher's table says where each case matched too
    assert list(frame.columns[:4]) == ["rank", "case_id", "distance", "best_slice"] and "body_part" in frame
    assert list(frame.loc[0, "best_box"]) == [x0, y0, x1, y1] and frame.loc[0, "best_slice"] == top.location["best_slice"]


def test_a_box_query_on_an_index_without_crops_says_what_it_compared(phantom_index):
    archive, index = phantom_index
    result = query(archive / "s2", index, k=2, slices="12", roi="40,40,56,56")
    assert result.query["rerank"]["crop_vectors"] is False and "crop_grid" in result.query["rerank"]["crop_note"]
    assert result.query["region"]["embedded_box"] == [40, 40, 56, 56]  # no tiles: the box as given
    assert "best_box" not in result.results[0].to_dict()


def test_query_json_and_table_carry_the_matched_tile(crop_index):
    from typer.testing import CliRunner

    from medsearch.cli import app

    archive, index = crop_index
    run = CliRunner().invoke(app, ["query", str(archive / "s1"), "--index", str(index), "-k", "2", "--roi", "4,4,20,20", "--json"])
    assert run.exit_code == 0, run.output
    top = json.loads(run.stdout)["results"][0]
    assert len(top["best_box"]) == 4 and top["best_box"][0] <= 12 < top["best_box"][2]
    table = CliRunner().invoke(app, ["query", str(archive / "s1"), "--index", str(index), "-k", "2", "--roi", "4,4,20,20"])
    assert table.exit_code == 0 and "box " in table.stdout


def test_a_box_on_a_real_ct_slice_finds_its_series_and_tile(shared_dicom, tmp_path):
    from medsearch.config import load_config
    from medsearch.io import load_study

    series = shared_dicom / "ct-head-ge-gantry-tilt"
    config = load_config("default").replace(preprocess={"slice_spacing_mm": 5.0}, index={"crop_grid": 2})
    build_index(series, tmp_path / "ix", config=config)
    build_index(shared_dicom / "mr-philips-fmri", tmp_path / "ix", config=config)
    searcher = Searcher(tmp_path / "ix")
    own = searcher.search(series, k=1).results[0].case_id
    moved = _slab(load_study(series)[1], 14, 1, seed=0)  # one slice, noisy and shifted by 2 px
    top = searcher.search("box", volume=moved, k=2, roi="300,150,400,250").results[0]
    x0, y0, x1, y1 = top.location["best_box"]
    assert top.case_id == own and abs(top.location["best_slice"] - 14) <= 2
    assert x0 <= 352 < x1 and y0 <= 198 < y1


def test_a_slab_is_matched_in_layout_on_an_index_with_tiles(crop_index, phantom_index):
    archive, index = crop_index
    searcher = Searcher(index)
    slab = searcher.search(archive / "s2", k=3, slices="8:16")
    assert slab.query["rerank"]["layout"] is True and "layout_note" not in slab.query["rerank"]
    assert "in layout" in slab.distance and "tiles'" in slab.distance
    assert slab.results[0].case_id == searcher.search(archive / "s2", k=1).results[0].case_id
    assert abs(slab.results[0].location["best_slice"] - slab.results[0].location["query_slice"]) <= 2
    plain = searcher.search(archive / "s2", k=3, slices="8:16", layout=False)
    assert plain.query["rerank"]["layout"] is False
    assert [m.distance for m in slab.results] != [m.distance for m in plain.results]  # the tiles weigh in
    assert searcher.search(archive / "s2", k=1).query["rerank"]["layout"] is False  # a whole study: when asked
    assert searcher.search(archive / "s2", k=1, layout=True).query["rerank"]["layout"] is True
    box = searcher.search(archive / "s2", k=1, slices="12", roi="40,40,56,56", layout=True)
    assert box.query["rerank"]["layout"] is False and "one tile" in box.query["rerank"]["layout_note"]
    _, no_tiles = phantom_index
    asked = query(archive / "s2", no_tiles, k=1, slices="8:16", layout=True)
    assert asked.query["rerank"]["layout"] is False and "crop_grid = 2" in asked.query["rerank"]["layout_note"]
    assert "in layout" not in asked.distance


def test_query_layout_on_the_command_line(crop_index, phantom_index):
    from typer.testing import CliRunner

    from medsearch.cli import app

    archive, index = crop_index
    run = CliRunner().invoke(app, ["query", str(archive / "s2"), "--index", str(index), "-k", "2", "--slices", "8:16", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["query"]["rerank"]["layout"] is True
    run = CliRunner().invoke(app, ["query", str(archive / "s2"), "--index", str(index), "-k", "2", "--slices", "8:16", "--no-layout", "--json"])
    assert json.loads(run.stdout)["query"]["rerank"]["layout"] is False
    _, no_tiles = phantom_index
    run = CliRunner().invoke(app, ["query", str(archive / "s2"), "--index", str(no_tiles), "-k", "2", "--layout"])
    assert run.exit_code == 0 and "note: slices matched without layout" in run.stderr and "crop_grid = 2" in run.stderr
