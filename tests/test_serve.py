"""``medsearch serve``: the HTTP API answers like ``query --json``, refuses bad uploads, keeps serving;
uploads are decoded in a worker, with a time limit and a memory cap, outside the query lock; a real
uvicorn answers a malformed request with JSON and closes connections that send no request."""

from __future__ import annotations

import json
import logging
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLE
from fastapi.testclient import TestClient
from hostile.files import SEEDED, seeded_value
from typer.testing import CliRunner

from medsearch.cli import app as cli_app
from medsearch.io import load_volume
from medsearch.search import Searcher
from medsearch.serve import create_app, uvicorn_config
from medsearch.store import IndexStore

QUERY = SAMPLE / "tcga-luad-ct" / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"
LIMIT_MB = 1.0  # the sample slices are about 0.5 MB


@pytest.fixture(scope="module")
def searcher(sample_index) -> Searcher:
    return Searcher(sample_index)


@pytest.fixture(scope="module")
def client(sample_index, searcher) -> Iterator[TestClient]:
    with TestClient(create_app(sample_index, searcher=searcher, max_upload_mb=LIMIT_MB)) as client:
        yield client


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
    assert info["decode_workers"] == 1


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


def test_query_leaves_out_the_upload_patient_and_copies(sample_index, sample_key, uploads):
    """Issue 17: POST /query takes exclude_same_patient, one_per_patient and collapse_copies."""
    headers = {"Content-Type": "application/dicom"}
    searcher = Searcher(sample_index, key=sample_key)
    with TestClient(create_app(sample_index, searcher=searcher, max_upload_mb=LIMIT_MB)) as client:
        plain = client.post("/query", params={"k": 3}, content=QUERY.read_bytes(), headers=headers).json()
        own = searcher.patient_of(QUERY)
        assert plain["results"][0]["metadata"]["patient"] == own and plain["query"]["excluded"] == {"copies": 0}
        params = {"k": 3, "exclude_same_patient": "true", "one_per_patient": "true", "collapse_copies": "false"}
        response = client.post("/query", params=params, content=QUERY.read_bytes(), headers=headers)
        assert response.status_code == 200, response.text
        data = response.json()
        assert len(data["results"]) == 3 and own not in [r["metadata"]["patient"] for r in data["results"]]
        assert data["query"]["excluded"] == {"same_patient": 1, "other_cases_of_patient": 0}


def test_exclude_same_patient_without_the_key_is_a_422(client, uploads, monkeypatch, tmp_path):
    monkeypatch.delenv("MEDSEARCH_SITE_KEY", raising=False)
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(tmp_path / "missing.key"))
    response = client.post("/query", params={"exclude_same_patient": "true"}, content=QUERY.read_bytes(),
                           headers={"Content-Type": "application/dicom"})
    assert response.status_code == 422 and "needs the site key" in response.json()["error"]
    assert client.get("/health").status_code == 200


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
    for option in ("--host", "--port", "--max-upload-mb", "--request-timeout", "--header-timeout", "--worker-memory-gib",
                   "--decode-workers"):
        assert option in result.output
    assert "127.0.0.1" in result.output


def test_serve_command_passes_its_decoder_workers_on(sample_index, monkeypatch):
    import medsearch.serve

    seen: dict[str, object] = {}
    monkeypatch.setattr(medsearch.serve, "serve", lambda index_dir, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(cli_app, ["serve", str(sample_index), "--decode-workers", "3", "--worker-memory-gib", "1.5"])
    assert result.exit_code == 0, result.output
    assert seen["decode_workers"] == 3 and seen["worker_memory_gib"] == 1.5
    assert CliRunner().invoke(cli_app, ["serve", str(sample_index)]).exit_code == 0 and seen["decode_workers"] == 1
    refused = CliRunner().invoke(cli_app, ["serve", str(sample_index), "--decode-workers", "0"])
    assert refused.exit_code == 2 and "--decode-workers" in refused.output


def test_the_service_picks_up_new_commits_and_survives_a_broken_one(sample_index, sample_key, tmp_path, uploads, caplog):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(sample_index, index)
    with TestClient(create_app(index, max_upload_mb=LIMIT_MB, warm_up=False)) as client:
        _picks_up_commits(client, index, sample_key, caplog)


def _picks_up_commits(client, index, sample_key, caplog) -> None:
    from pydicom.data import get_testdata_file

    from medsearch.indexing import build_index

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


# -- an upload's header values are never quoted -------------------------------------------------------


def test_a_header_value_a_parser_quotes_is_not_in_the_answer_or_the_log(client, uploads, tmp_path, caplog):
    """'SLOPEZQX' in Rescale Slope: the 422 says what is wrong without quoting it (it once did)."""
    path = seeded_value(tmp_path / "seeded.dcm")
    with caplog.at_level(logging.DEBUG):
        response = client.post("/query", content=path.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 422, response.text
    assert "Rescale Slope or Rescale Intercept is not a number" in response.json()["error"]
    assert SEEDED not in response.text and SEEDED not in caplog.text


# -- decoding happens in a worker: outside the query lock, within a time limit and a memory cap --------

WAIT = "medsearch-test-wait:"


def _waits_for_release(case):
    """Decodes a case, after waiting for the file its ImageComments names, if any (runs in a worker)."""
    comment = str(case.header.get("ImageComments", "") or "")
    if comment.startswith(WAIT):
        release = Path(comment[len(WAIT):])
        release.with_suffix(".started").touch()
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return load_volume(case)


def _allocates_3_gib(case):
    """Decodes a case after allocating 3 GiB (runs in a worker)."""
    np.ones(3 * 2**30, dtype=np.uint8)
    return load_volume(case)


def _slow_upload(tmp_path: Path) -> tuple[bytes, Path]:
    """A query study whose decoding waits for a file: its bytes, and the file to create to let it go."""
    release = tmp_path / "release"
    ds = pydicom.dcmread(QUERY)
    ds.ImageComments = f"{WAIT}{release}"
    path = tmp_path / "slow.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path.read_bytes(), release


def _post(client: TestClient, data: bytes, out: dict[str, object], **params: object) -> None:
    out["response"] = client.post("/query", params=params or None, content=data, headers={"Content-Type": "application/dicom"})


@pytest.mark.slow
def test_health_and_other_queries_do_not_wait_for_an_upload_being_decoded(sample_index, searcher, uploads, tmp_path):
    slow, release = _slow_upload(tmp_path)
    app = create_app(sample_index, searcher=searcher, warm_up=False, decode_workers=2, load=_waits_for_release)
    with TestClient(app) as client:
        first: dict[str, object] = {}
        waiting = threading.Thread(target=_post, args=(client, slow, first), kwargs={"k": 2})
        waiting.start()
        try:
            deadline = time.monotonic() + 60
            while not release.with_suffix(".started").exists():
                assert time.monotonic() < deadline, "the slow upload never started decoding"
                time.sleep(0.05)
            assert client.get("/health").status_code == 200
            second: dict[str, object] = {}
            other = threading.Thread(target=_post, args=(client, QUERY.read_bytes(), second), kwargs={"k": 3})
            other.start()
            other.join(timeout=60)  # the lock is free while the first upload decodes
            assert "response" in second, "a query waited for another upload's decoding"
            assert second["response"].status_code == 200 and len(second["response"].json()["results"]) == 3
        finally:
            release.touch()
            waiting.join(timeout=60)
        assert first["response"].status_code == 200 and len(first["response"].json()["results"]) == 2


@pytest.mark.slow
def test_an_upload_that_takes_longer_than_the_time_limit_is_stopped_and_the_service_goes_on(sample_index, searcher, uploads, tmp_path):
    slow, _ = _slow_upload(tmp_path)  # never released
    app = create_app(sample_index, searcher=searcher, warm_up=False, request_timeout=5, load=_waits_for_release)
    with TestClient(app) as client:
        response = client.post("/query", content=slow, headers={"Content-Type": "application/dicom"})
        assert response.status_code == 422 and "could not be decoded" in response.json()["error"]
        assert "5 s" in response.json()["error"]
        assert client.get("/health").status_code == 200
        for _ in range(5):  # the stopped worker is replaced
            again = client.post("/query?k=1", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"})
            if again.status_code == 200:
                break
        assert again.status_code == 200, again.text


@pytest.mark.slow
def test_an_upload_that_needs_more_memory_than_the_decoder_may_use_fails_alone(sample_index, searcher, uploads):
    app = create_app(sample_index, searcher=searcher, warm_up=False, worker_memory_gib=0.5, load=_allocates_3_gib)
    peak_before = _peak_rss()
    with TestClient(app) as client:
        response = client.post("/query", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"})
        assert response.status_code == 422 and "needs more memory" in response.json()["error"]
        assert client.get("/health").status_code == 200
    assert _peak_rss() - peak_before < 2**30  # the 3 GiB were never asked of this process


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_bad_limits_are_refused(sample_index, searcher):
    from medsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="request_timeout must be positive"):
        create_app(sample_index, searcher=searcher, request_timeout=0)
    with pytest.raises(ConfigError, match="decode_workers must be 0 or more"):
        create_app(sample_index, searcher=searcher, decode_workers=-1)


# -- a real uvicorn on 127.0.0.1: malformed requests and connections that send nothing ---------------

HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def live(sample_index, searcher) -> Iterator[tuple[str, int]]:
    """The service under uvicorn, as ``medsearch serve`` runs it, on a free port of 127.0.0.1."""
    import uvicorn

    app = create_app(sample_index, searcher=searcher, warm_up=False, request_timeout=2, decode_workers=0)
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, log_level="warning", header_timeout=HEADER_TIMEOUT_S))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(timeout=10)


def _exchange(address: tuple[str, int], data: bytes, *, wait: float = 10.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or ``wait`` seconds pass)."""
    with socket.create_connection(address, timeout=wait) as conn:
        conn.sendall(data)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            received += b"<still open>"
    return received


def _answer(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_malformed_content_length_gets_the_json_error_of_every_answer(live):
    """h11 refuses it before the application sees the request: the protocol answers, as JSON."""
    raw = _exchange(live, b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\nContent-Length: 12abc\r\n\r\n")
    status, headers, body = _answer(raw)
    assert status == 400 and headers["content-type"] == "application/json"
    assert "Content-Length that is not a whole number" in body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a request"])
def test_a_connection_that_sends_no_complete_request_is_closed(live, sent):
    started = time.monotonic()
    assert _exchange(live, sent, wait=15 * HEADER_TIMEOUT_S) == b""  # closed, not left open
    assert time.monotonic() - started < 15 * HEADER_TIMEOUT_S


def test_an_upload_that_stops_arriving_gets_a_408(live):
    head = b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\nContent-Length: 100000\r\n\r\n"
    status, _, body = _answer(_exchange(live, head + b"\0" * 1000))
    assert status == 408 and "did not arrive within 2 s" in body["error"]


def test_the_live_service_answers_health(live):
    status, _, body = _answer(_exchange(live, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 200 and body["status"] == "ok"


def test_region_queries_carry_where_each_case_matched(phantom_index, tmp_path, uploads):
    """``?slices=`` and ``?roi=`` as ``query --slices/--roi``: an upload decoded in a worker, its region
    embedded there, the answer with the best-matching slice of each result (a classic multi-frame CT)."""
    from series import phantom, write_multiframe

    archive, index = phantom_index
    upload = write_multiframe(tmp_path / "mf.dcm", phantom(1), seed=1).read_bytes()
    headers = {"Content-Type": "application/dicom"}
    own = Searcher(index).search(archive / "s1", k=1).results[0].case_id
    with TestClient(create_app(index, decode_workers=1)) as client:
        slab = client.post("/query", params={"k": 2, "slices": "6:12"}, content=upload, headers=headers).json()
        box = client.post("/query", params={"k": 2, "roi": "8,8,56,56", "slices": "12"}, content=upload, headers=headers).json()
        whole = client.post("/query", params={"k": 2, "rerank": "false"}, content=upload, headers=headers).json()
        bad = client.post("/query", params={"slices": "40:50"}, content=upload, headers=headers)
    top = slab["results"][0]
    assert slab["query"]["region"] == {"slices": [6, 12]} and slab["query"]["rerank"]["used"] is True
    assert top["case_id"] == own and top["best_slice"] == top["query_slice"] and top["best_slice_mm"] == 2.5 * top["best_slice"]
    assert box["query"]["region"]["roi"] == [8, 8, 56, 56] and box["results"][0]["query_slice"] == 12
    assert "rerank" not in whole["query"] and "best_slice" in whole["results"][0]
    assert bad.status_code == 422 and "outside the study's 24 slice" in bad.json()["error"]


def test_a_box_query_names_the_tile_on_an_index_with_crop_vectors(phantom_index, tmp_path, uploads):
    """``?roi=`` on an index built with ``crop_grid``: the box widened to a tile in the decoding
    worker, each result naming the tile it matched, as ``query --roi`` does."""
    from series import phantom, write_multiframe

    from medsearch.config import load_config
    from medsearch.indexing import build_index

    archive, _ = phantom_index
    index = tmp_path / "ix"
    build_index(archive, index, config=load_config("default").replace(preprocess={"slice_spacing_mm": 2.5}, index={"crop_grid": 2}))
    upload = write_multiframe(tmp_path / "mf.dcm", phantom(1), seed=1).read_bytes()
    with TestClient(create_app(index, decode_workers=1)) as client:
        box = client.post("/query", params={"k": 2, "roi": "40,40,56,56", "slices": "12"}, content=upload,
                          headers={"Content-Type": "application/dicom"}).json()
        slab = client.post("/query", params={"k": 3, "slices": "8:16"}, content=upload,
                           headers={"Content-Type": "application/dicom"}).json()
    searcher = Searcher(index)
    expected = searcher.search(archive / "s1", k=2, slices="12", roi="40,40,56,56")
    top = box["results"][0]
    assert box["query"]["rerank"]["crop_vectors"] is True
    assert top["case_id"] == expected.results[0].case_id and top["best_box"] == expected.results[0].location["best_box"]
    # a slab is matched in layout (its tiles cut in the decoding worker), as query --slices matches it
    in_layout = searcher.search(archive / "s1", k=3, slices="8:16")
    assert slab["query"]["rerank"]["layout"] is True and in_layout.query["rerank"]["layout"] is True
    assert [(r["case_id"], r["best_slice"]) for r in slab["results"]] == [(m.case_id, m.location["best_slice"]) for m in in_layout.results]
    assert [r["distance"] for r in slab["results"]] == pytest.approx([m.distance for m in in_layout.results], abs=1e-5)
