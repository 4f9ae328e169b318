from __future__ import annotations

import json
import shutil

import pydicom
import pytest
from conftest import SAMPLE
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medsearch.cli import app

ARCHIVE = SAMPLE / "tcga-luad-ct"
QUERY = ARCHIVE / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_help_explains_every_command(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("index", "query", "info", "demo"):
        assert command in result.output
    assert "--index" in runner.invoke(app, ["query", "--help"]).output


def test_query_prints_a_ranked_table(runner, sample_index):
    result = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(lines) == 3
    assert lines[0].split("│")[1].strip() == "1" and "0.0000" in lines[0]
    assert "Contrast" in result.output and "distance = 1 - cosine similarity" in result.output


def test_query_json(runner, sample_index):
    result = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "-k", "4", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) == {"query", "distance", "results"}
    assert [r["rank"] for r in data["results"]] == [1, 2, 3, 4]
    assert data["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert data["results"][0]["metadata"]["Contrast"] is False
    header = pydicom.dcmread(QUERY, stop_before_pixels=True)
    for value in (header.PatientID, header.StudyInstanceUID, header.SeriesInstanceUID, header.StudyDate):
        assert value not in result.output


def test_info_text_and_json(runner, sample_index):
    text = runner.invoke(app, ["info", str(sample_index)])
    assert text.exit_code == 0 and "12 case(s)" in text.output and "efficientnet-lite0" in text.output
    data = json.loads(runner.invoke(app, ["info", str(sample_index), "--json"]).stdout)
    assert data["cases"] == 12 and data["metric"] == "cosine"
    assert data["last_run"]["skipped_by_reason"] == {"duplicate": 1}
    assert "k-anonymity: smallest group 1 patient(s) over " in text.output
    assert data["k_anonymity"]["smallest_group"] == 1
    # what the kept vectors let a query do (12 single slices, no tiles)
    assert "slice vectors: 12, 1 a case (2.6 KB): re-ranking, region queries" in text.output
    assert "crop vectors: none (boxes against whole slices; tiles need crop_grid = 2)" in text.output


def test_info_verify_hashes_every_file_and_names_a_damaged_one(runner, sample_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    ok = runner.invoke(app, ["info", str(copy), "--verify"])
    assert ok.exit_code == 0 and "checksums: all 5 data file(s) match the manifest" in ok.output  # with the slice vectors
    data = json.loads(runner.invoke(app, ["info", str(copy), "--verify", "--json"]).stdout)
    assert any(name.startswith("vectors-") for name in data["verified"])
    cases = next(copy.glob("cases-*.csv"))
    text = bytearray(cases.read_bytes())
    text[-2] = ord("x") if text[-2] != ord("x") else ord("y")
    cases.write_bytes(bytes(text))
    bad = runner.invoke(app, ["info", str(copy), "--verify"])
    assert bad.exit_code == 2 and f"{cases.name} does not match its checksum" in bad.stderr


def test_index_summary_and_json(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(tmp_path / "keys" / "site.key"))
    archive = tmp_path / "archive"
    archive.mkdir()
    for f in sorted(ARCHIVE.glob("*.dcm"))[:2]:
        shutil.copy(f, archive / f.name)
    (archive / "README.txt").write_text("not an image")
    first = runner.invoke(app, ["index", str(archive), "--index", str(tmp_path / "ix"), "-q"])
    assert first.exit_code == 0, first.output
    assert "indexed 2 new case(s) from 3 file(s)" in first.stdout
    assert "skipped 1 file(s): 1 not_dicom" in first.stdout
    assert "created a new site key" in first.stderr
    again = runner.invoke(app, ["index", str(archive), "--index", str(tmp_path / "ix"), "--json"])
    data = json.loads(again.stdout)
    assert data["cases_added"] == 0 and data["cases_already_indexed"] == 2 and data["files_skipped"] == 1


def _sr_file():
    return get_testdata_file("test-SR.dcm")


def _truncated(tmp_path):
    data = QUERY.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_dicom(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really")
    return path


def _empty_folder(tmp_path):
    path = tmp_path / "nothing"
    path.mkdir()
    return path


BAD_QUERIES = [
    ("missing", lambda tmp: tmp / "nowhere.dcm", "does not exist"),
    ("not dicom", _not_dicom, "not a DICOM file"),
    ("not an image", lambda tmp: _sr_file(), "holds no image: Comprehensive SR Storage is not an image storage class"),
    ("truncated", _truncated, "truncated"),
    ("empty folder", _empty_folder, "no files"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_QUERIES, ids=[c[0] for c in BAD_QUERIES])
def test_bad_study_gets_one_line_and_exit_2(runner, sample_index, tmp_path, name, make, message):
    result = runner.invoke(app, ["query", str(make(tmp_path)), "--index", str(sample_index)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message.lower() in lines[0].lower()
    assert "Traceback" not in result.output


def test_a_folder_that_is_not_an_index(runner, tmp_path):
    result = runner.invoke(app, ["query", str(QUERY), "--index", str(tmp_path)])
    assert result.exit_code == 2 and "is not a medsearch index" in result.stderr
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_an_index_built_with_another_encoder(runner, sample_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["encoder"]["weights_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["query", str(QUERY), "--index", str(copy)])
    assert result.exit_code == 2
    assert "was built with encoder efficientnet-lite0 (weights 000000000000)" in result.stderr


USAGE = [
    (["query"], "Usage: medsearch query [OPTIONS] [STUDY]"),  # or --study-uid with --dicomweb
    (["index"], "Usage: medsearch index [OPTIONS] ARCHIVE"),
    (["info"], "Usage: medsearch info [OPTIONS] INDEX_DIR"),
    (["export-index"], "Usage: medsearch export-index [OPTIONS] INDEX_DIR DESTINATION"),
    (["evaluate", "--help"], "Usage: medsearch evaluate [OPTIONS] [DATA]"),
]


@pytest.mark.parametrize(("args", "usage"), USAGE, ids=[u[0][0] for u in USAGE])
def test_usage_lines_name_the_arguments(runner, args, usage):
    """Issue 17: usage lines read ``{study}``, like a literal or a template."""
    result = runner.invoke(app, args)
    assert usage in " ".join(result.output.split())
    assert "{" not in result.output.split("Usage:")[1].splitlines()[0]


def test_bad_config_is_one_line(runner, sample_index):
    result = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "--config", "nope"])
    assert result.exit_code == 2 and "no config file or preset named 'nope'" in result.stderr


def test_demo_runs_offline_and_prints_ranked_cases(runner, tmp_path, monkeypatch):
    # No network: any attempt to open a socket fails the test.
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the demo tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["index"]["cases_in_index"] == 12
    assert data["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert (tmp_path / "demo" / "site.key").exists()
    assert not list((tmp_path / "demo" / "index").glob("*.key"))
