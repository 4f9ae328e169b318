"""Query by Study UID from a real Orthanc (CLI and service), and links back to the viewer.

The index is built from the files and the query study comes from the PACS (and the other way round
for the links): no UID appears in what the commands print or the service answers, or in the index.
"""

from __future__ import annotations

import json

import pydicom
import pytest
from fastapi.testclient import TestClient
from pacs.studies import sample_files, uids_of
from typer.testing import CliRunner

from medsearch.deid import case_id
from medsearch.indexing import build_index
from medsearch.serve import create_app

pytestmark = pytest.mark.slow


def _uids(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _no_uid(data: bytes | str, uids: set[str]) -> None:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    leaked = [u for u in uids if u in text]
    assert not leaked


def test_query_by_study_uid_finds_its_own_case(sample_key, sample_orthanc, sample_index):
    from medsearch.cli import app

    study, series = _uids(sample_files()[3])
    result = CliRunner().invoke(app, ["query", "--study-uid", study, "--dicomweb", sample_orthanc.dicomweb, "--index", str(sample_index),
                                      "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["results"][0]["case_id"] == case_id(sample_key, study, series)
    assert data["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert sample_orthanc.dicomweb in data["query"]["path"]
    _no_uid(result.output, uids_of(sample_files()))
    table = CliRunner().invoke(app, ["query", "--study-uid", study, "--series-uid", series, "--dicomweb", sample_orthanc.dicomweb,
                                     "--index", str(sample_index)])
    assert table.exit_code == 0 and data["results"][0]["case_id"] in table.output
    _no_uid(table.output, uids_of(sample_files()))


QUERY_ERRORS = [
    (["query", "--index", "IDX"], "give the query study as STUDY"),
    (["query", "STUDY", "--study-uid", "1.2.3", "--dicomweb", "URL", "--index", "IDX"], "not both"),
    (["query", "--study-uid", "1.2.3", "--index", "IDX"], "--study-uid needs --dicomweb"),
    (["query", "STUDY", "--series-uid", "1.2.3", "--index", "IDX"], "give --study-uid too"),
    (["query", "--study-uid", "1.2.3.999", "--dicomweb", "URL", "--index", "IDX"], "does not hold the study"),
]


@pytest.mark.parametrize(("args", "message"), QUERY_ERRORS)
def test_query_argument_errors(args, message, sample_orthanc, sample_index):
    from medsearch.cli import app

    values = {"IDX": str(sample_index), "URL": sample_orthanc.dicomweb, "STUDY": str(sample_files()[0])}
    result = CliRunner().invoke(app, [values.get(a, a) for a in args])
    assert result.exit_code == 2 and message in result.output


def test_links_back_to_the_viewer(tmp_path, key, sample_orthanc):
    from medsearch.cli import app

    links = tmp_path / "links.csv"
    build_index(sample_orthanc.dicomweb, tmp_path / "index", key=key, workers=0, links=links)
    study, series = _uids(sample_files()[0])
    result = CliRunner().invoke(app, ["query", str(sample_files()[0]), "--index", str(tmp_path / "index"), "--resolve", str(links),
                                      "--viewer", "orthanc", "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    source = json.loads(result.output)["results"][0]["source"]
    assert source["dicomweb_root"] == sample_orthanc.dicomweb and source["files"] == []
    assert source["viewer_url"] == f"{sample_orthanc.url}/ui/app/#/filtered-studies?StudyInstanceUID={study}&expand=study"
    table = CliRunner().invoke(app, ["query", str(sample_files()[0]), "--index", str(tmp_path / "index"), "--resolve", str(links)])
    assert f"{sample_orthanc.url}/viewer?StudyInstanceUIDs=" in table.output  # the default: OHIF (the table folds the rest)
    # the index itself, local/ included, holds no UID and no server
    for path in (tmp_path / "index").rglob("*"):
        if path.is_file():
            _no_uid(path.read_bytes(), uids_of(sample_files()) | {f"127.0.0.1:{sample_orthanc.port}"})


def test_service_answers_a_query_by_study_uid(tmp_path, sample_key, sample_orthanc, sample_index):
    study, series = _uids(sample_files()[5])
    audit = tmp_path / "audit.jsonl"
    app = create_app(sample_index, dicomweb=sample_orthanc.dicomweb, decode_workers=0, warm_up=False, audit_log=audit)
    with TestClient(app) as client:
        answer = client.post("/query", params={"study_uid": study, "k": 2})
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["results"][0]["case_id"] == case_id(sample_key, study, series)
        assert data["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
        _no_uid(answer.content, uids_of(sample_files()))
        missing = client.post("/query", params={"study_uid": "1.2.3.4.5.6.7.999"})
        assert missing.status_code == 404 and "1.2.3.4.5.6.7.999" not in missing.text
        alone = client.post("/query", params={"series_uid": series})
        assert alone.status_code == 422
    _no_uid(audit.read_bytes(), uids_of(sample_files()) | {"1.2.3.4.5.6.7.999"})
    assert audit.read_text().count("\n") == 3
    with TestClient(create_app(sample_index, decode_workers=0, warm_up=False)) as client:
        refused = client.post("/query", params={"study_uid": study})
        assert refused.status_code == 422 and "--dicomweb" in refused.text


def test_page_fetches_a_study_by_uid(sample_key, sample_orthanc, sample_index):
    """The page's Study UID field: POST /api/search?study_uid=... searches with the study of the PACS."""
    study, series = _uids(sample_files()[7])
    app = create_app(sample_index, dicomweb=sample_orthanc.dicomweb, decode_workers=0, warm_up=False)
    with TestClient(app) as client:
        assert client.get("/api/options").json()["features"]["dicomweb"] is True
        answer = client.post("/api/search", params={"study_uid": study, "k": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["case_id"] == case_id(sample_key, study, series)
        _no_uid(answer.content, uids_of(sample_files()))
        missing = client.post("/api/search", params={"study_uid": "1.2.3.4.5.6.7.999"})
        assert missing.status_code == 404 and "1.2.3.4.5.6.7.999" not in missing.text


def test_access_log_withholds_uids():
    import logging

    from medsearch.serve.pacs import UidsHidden

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", "/query?k=3&study_uid=1.2.3&series_uid=4.5.6", "1.1", 200), None)
    UidsHidden().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "POST /query?k=3&study_uid=(withheld)&series_uid=(withheld) HTTP/1.1" 200'
