"""``medsearch serve``: the HTTP API answers like ``query --json``, refuses bad uploads, keeps serving."""

from __future__ import annotations

import json
import logging
import re
import tempfile

import pydicom
import pytest
from conftest import SAMPLE
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medsearch.cli import app as cli_app
from medsearch.search import Searcher
from medsearch.serve import create_app
from medsearch.store import IndexStore

QUERY = SAMPLE / "tcga-luad-ct" / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"
LIMIT_MB = 1.0  # the sample slices are about 0.5 MB


@pytest.fixture(scope="module")
def searcher(sample_index) -> Searcher:
    return Searcher(sample_index)


@pytest.fixture(scope="module")
def client(sample_index, searcher) -> TestClient:
    return TestClient(create_app(sample_index, searcher=searcher, max_upload_mb=LIMIT_MB))


@pytest.fixture()
def uploads(tmp_path, monkeypatch):
    """Send the service's temporary files to an empty folder, to check that none is left."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert not list(folder.iterdir()), "an upload was left on disk"


def _same_as_cli(sample_index, data: dict, k: int) -> None:
    result = CliRunner().invoke(cli_app, ["query", str(QUERY), "--index", str(sample_index), "-k", str(k), "--json"])
    assert result.exit_code == 0, result.output
    expected = json.loads(result.output)
    assert data["query"]["path"] == QUERY.name
    assert {k: v for k, v in data["query"].items() if k != "path"} == {
        k: v for k, v in expected["query"].items() if k != "path"
    }
    assert data["distance"] == expected["distance"]
    assert [m["case_id"] for m in data["results"]] == [m["case_id"] for m in expected["results"]]
    assert [m["metadata"] for m in data["results"]] == [m["metadata"] for m in expected["results"]]
    for got, want in zip(data["results"], expected["results"]):
        assert got["distance"] == pytest.approx(want["distance"], abs=1e-4)


def test_health_and_info(client, sample_index):
    assert client.get("/health").json() == {"status": "ok", "cases": 12}
    info = client.get("/info").json()
    assert info["cases"] == 12 and info["encoder"]["name"] == "efficientnet-lite0"
    assert info["encoder_runtime"] in ("onnx", "torch") and info["max_upload_bytes"] == 1_000_000


def test_raw_body_query_returns_the_json_of_query_json(client, sample_index, uploads):
    response = client.post(
        "/query?k=3", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    data = response.json()
    data["query"]["path"] = QUERY.name  # a raw body has no file name
    _same_as_cli(sample_index, data, 3)
    assert data["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)


def test_multipart_upload_returns_the_json_of_query_json(client, sample_index, uploads):
    with open(QUERY, "rb") as f:
        response = client.post(
            "/query", params={"k": 4}, data={"note": "x"}, files={"file": (f"some/folder/{QUERY.name}", f, "application/dicom")}
        )
    assert response.status_code == 200, response.text
    _same_as_cli(sample_index, response.json(), 4)


BAD_REQUESTS = [
    ("not DICOM", dict(content=b"hello, this is text" * 20, headers={"Content-Type": "application/octet-stream"}),
     415, "is not a DICOM file"),
    ("DICOM without pixels", dict(content=pydicom.examples.get_path("rt_plan").read_bytes(),
                                  headers={"Content-Type": "application/dicom"}), 422, "the upload"),
    ("empty body", dict(content=b"", headers={"Content-Type": "application/dicom"}), 400, "body is empty"),
    ("form without file", dict(data={"k": "3"}, files={"note": (None, "only text")}), 400, "form holds no file"),
    ("wrong content type", dict(content=b"{}", headers={"Content-Type": "application/json"}), 415,
     "content type 'application/json' is not accepted"),
    ("too large (Content-Length)", dict(content=b"\0" * 1_000_001, headers={"Content-Type": "application/dicom"}),
     413, "larger than 1 MB.*--max-upload-mb"),
    ("too large (streamed)", dict(content=iter([b"\0" * 400_000] * 3), headers={"Content-Type": "application/dicom"}),
     413, "larger than 1 MB"),
]


@pytest.mark.parametrize(("name", "request_kwargs", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_uploads_get_a_4xx_and_the_service_keeps_serving(client, uploads, name, request_kwargs, status, message):
    response = client.post("/query", **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error and re.search(message, error)
    assert "medsearch-upload-" not in error, "the temporary path leaked into the message"
    assert client.get("/health").status_code == 200
    with open(QUERY, "rb") as f:
        assert client.post("/query?k=1", files={"file": (QUERY.name, f)}).status_code == 200


@pytest.mark.parametrize(("query", "message"), [("k=0", "k must be between 1 and 1000"), ("k=abc", "bad value for k")])
def test_bad_k(client, uploads, query, message):
    response = client.post(f"/query?{query}", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 422 and message in response.json()["error"]


def test_where_keeps_matching_cases_and_a_bad_filter_is_a_422(client, sample_index, uploads):
    headers = {"Content-Type": "application/dicom"}
    response = client.post("/query", params={"k": 10, "where": ["sex=F", "modality=CT"]}, content=QUERY.read_bytes(), headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()
    women = sum(1 for s in IndexStore.open(sample_index).cases["sex"] if s == "F")
    assert 0 < len(data["results"]) == min(10, women)
    assert all(r["metadata"]["sex"] == "F" for r in data["results"])
    assert data["query"]["where"] == ["sex=F", "modality=CT"]

    bad = client.post("/query", params={"where": "colour=red"}, content=QUERY.read_bytes(), headers=headers)
    assert bad.status_code == 422 and "colour" in bad.json()["error"]
    assert client.get("/health").status_code == 200


def test_unknown_route_is_a_json_error(client):
    response = client.get("/nothing")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


def test_no_patient_data_in_the_log_or_the_answer(client, uploads, caplog):
    ct = pydicom.examples.get_path("ct")
    name = str(pydicom.dcmread(ct).PatientName)
    with caplog.at_level(logging.DEBUG):
        response = client.post("/query?k=2", content=ct.read_bytes(), headers={"Content-Type": "application/dicom"})
        broken = client.post("/query", content=ct.read_bytes()[:2000], headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200 and broken.status_code in (415, 422)
    for text in (caplog.text, response.text, broken.text):
        assert name not in text and name.split("^")[0] not in text


def test_bad_upload_limit(sample_index, searcher):
    from medsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="max_upload_mb must be positive"):
        create_app(sample_index, searcher=searcher, max_upload_mb=0)


def test_serve_command_help():
    result = CliRunner().invoke(cli_app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--max-upload-mb"):
        assert option in result.output
    assert "127.0.0.1" in result.output


def test_the_service_picks_up_new_commits_and_survives_a_broken_one(sample_index, sample_key, tmp_path, uploads, caplog):
    import shutil

    from pydicom.data import get_testdata_file

    from medsearch.indexing import build_index

    index = tmp_path / "index"
    shutil.copytree(sample_index, index)
    client = TestClient(create_app(index, max_upload_mb=LIMIT_MB, warm_up=False))
    assert client.get("/health").json()["cases"] == 12

    # `medsearch index` adds a case while the service runs: the next request sees it
    build_index(get_testdata_file("CT_small.dcm"), index, key=sample_key)
    assert client.get("/health").json()["cases"] == 13
    assert client.get("/info").json()["cases"] == 13
    response = client.post("/query?k=20", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200 and len(response.json()["results"]) == 13

    # a manifest that no longer reads: logged once, and the loaded index keeps answering
    (index / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="medsearch.serve"):
        for _ in range(3):
            assert client.get("/health").json()["cases"] == 13
        response = client.post("/query?k=3", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "still serving the index loaded before" in warnings[0] and "manifest.json" in warnings[0]
