"""The page inside ``medsearch serve``: the service mounts it beside its JSON API, decodes the page's
uploads in the same bounded worker, puts its credentials in front of every route and records every
query, from the page and from the API; and ``serve`` refuses a non-loopback address without
credentials before anything loads or binds."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from web.pages import QUERY, SECRET, USER, make_series

import medsearch.serve
from medsearch.cli import app as cli_app
from medsearch.serve import create_app
from medsearch.web import Credentials

BEARER = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture(scope="module")
def service(sample_index, page_searcher, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    app = create_app(sample_index, searcher=page_searcher, credentials=Credentials({USER: SECRET}), audit_log=audit)
    with TestClient(app) as client:
        yield client, audit


def test_the_page_and_the_api_need_credentials(service):
    client, _ = service
    assert client.get("/health").status_code == 200  # for a load balancer: no credentials needed
    for method, url in (("GET", "/info"), ("POST", "/query?k=3"), ("GET", "/api/options")):
        assert client.request(method, url).status_code == 401, url
    assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).headers["location"] == "/login?next=%2F"
    assert client.get("/", headers=BEARER).text.startswith("<!DOCTYPE html>")
    assert client.get("/info", headers=BEARER).json()["cases"] == 12


def test_a_page_upload_is_decoded_by_the_service_and_every_query_is_logged(service, page_searcher, tmp_path):
    client, audit = service
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    paths = make_series(tmp_path / "series", slices=3)
    files = [("file", (f"f{i}.dcm", p.read_bytes(), "application/dicom")) for i, p in enumerate(paths)]
    page = client.post("/api/search?k=4", files=files, headers=BEARER)
    assert page.status_code == 200, page.text
    data = page.json()
    assert [r["case_id"] for r in data["results"]] == [m.case_id for m in page_searcher.search(tmp_path / "series", k=4).results]
    assert data["preview"]["slices"] == [0, 1, 2] and data["query"]["n_slices"] == 3
    api = client.post("/query?k=2&where=sex%3DM", content=QUERY.read_bytes(), headers={**BEARER, "Content-Type": "application/dicom"})
    assert api.status_code == 200
    bad = client.post("/api/search?k=2", files={"file": ("notes.txt", b"plain text " * 40)}, headers=BEARER)
    assert bad.status_code == 415 and "medsearch-upload" not in bad.text
    lines = [json.loads(line) for line in audit.read_text().splitlines()][before:]
    assert [(e["via"], e["status"], e["user"]) for e in lines] == [("page", 200, USER), ("api", 200, USER), ("page", 415, USER)]
    assert lines[0]["cases"] == [r["case_id"] for r in data["results"]]
    assert lines[1]["filters"] == ["sex=M"] and lines[1]["cases"] == [r["case_id"] for r in api.json()["results"]]


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Fail the test if serve gets as far as loading the index (let alone binding a port)."""

    def loaded(*args, **kwargs):
        raise AssertionError("serve loaded the index")

    monkeypatch.setattr(medsearch.serve, "create_app", loaded)
    monkeypatch.delenv("MEDSEARCH_AUTH_TOKEN", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "radiology.example.org"])
def test_serving_another_address_without_credentials_is_refused_before_anything_binds(sample_index, nothing_loads, host):
    result = CliRunner().invoke(cli_app, ["serve", str(sample_index), "--host", host])
    assert result.exit_code == 2, result.output
    assert f"serving on {host} without authentication" in result.output and "--auth-file" in result.output


@pytest.mark.parametrize("extra", [["--auth-file", "AUTH"], ["--insecure-no-auth"]])
def test_credentials_or_an_explicit_choice_let_it_go_on(sample_index, nothing_loads, tmp_path, extra):
    (tmp_path / "auth.txt").write_text(f"{USER}:{SECRET}\n")
    args = [str(tmp_path / "auth.txt") if a == "AUTH" else a for a in extra]
    result = CliRunner().invoke(cli_app, ["serve", str(sample_index), "--host", "0.0.0.0", *args])
    assert isinstance(result.exception, AssertionError) and "loaded the index" in str(result.exception)


def test_the_archive_slices_the_page_shows_are_read_in_the_bounded_workers(phantom_index, tmp_path):
    """``serve --links``: a case's matched slice is read and drawn in the service's decoder worker,
    its headers kept in the service for the next picture; a file of the archive that became a
    decompression bomb since it was indexed costs that worker (the stored thumbnail stands in),
    never the service's memory."""
    import resource
    import shutil
    from pathlib import Path

    from hostile.files import deflate_bomb

    from medsearch.search import Searcher
    from medsearch.sharing import LinkTable
    from medsearch.sheets import matched_picture
    from medsearch.web.pictures import png

    archive, index = phantom_index
    copy = tmp_path / "archive"
    shutil.copytree(archive, copy)
    links = tmp_path / "links.csv"
    links.write_text((index.parent / "links.csv").read_text().replace(str(archive), str(copy)))
    table = LinkTable(links)
    ids = sorted(table.rows)
    searcher = Searcher(index)
    size = int(searcher.store.thumbnails.shape[1])
    app = create_app(index, searcher=searcher, links=links, decode_workers=1)
    with TestClient(app) as client:
        first = client.get(f"/api/case/{ids[0]}/slice/5")
        assert first.status_code == 200
        assert first.content == png(matched_picture(table.resolve(ids[0]), 5, searcher.config.preprocess, size))
        assert client.get(f"/api/case/{ids[0]}/slice/6").status_code == 200  # its headers kept: one slice read
        # one file of another case turns into a deflate bomb: 3 GiB once inflated, past a worker's 2 GiB
        deflate_bomb(Path(table.resolve(ids[1])["files"][0]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        bombed = client.get(f"/api/case/{ids[1]}/slice/5")
        assert bombed.status_code == 404 and "stored thumbnail stands in" in bombed.json()["error"]
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**20  # not a GiB more in the service
        assert client.get("/health").status_code == 200
        assert client.get(f"/api/case/{ids[0]}/slice/5").content == first.content  # the worker was replaced
