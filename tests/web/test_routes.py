"""The page's endpoints: the page and its files, a study of one or several files, the same query again
from a kept study, the preview's pixels, thumbnails, and errors as one JSON line without a path."""

from __future__ import annotations

import json
import re
import tempfile
import zlib

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from web.pages import LIMIT, QUERY, make_series, page_app

from medsearch.errors import EncoderMismatchError, FilterError, IndexNotFoundError, KeyFileError
from medsearch.io import load_study
from medsearch.web import pictures, routes
from medsearch.web.routes import SCRIPTS


@pytest.fixture(scope="module")
def client(page_searcher) -> TestClient:
    return TestClient(page_app(page_searcher))


@pytest.fixture()
def uploads(tmp_path, monkeypatch):
    """Send the page's temporary folders to an empty folder, to check that none is left."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert not list(folder.iterdir()), "an upload was left on disk"


def _upload(client, paths, **params):
    files = [("file", (f"file-{i}.dcm", p.read_bytes(), "application/dicom")) for i, p in enumerate(paths)]
    return client.post("/api/search", params={"k": 3, **params}, files=files)


def test_the_page_and_its_files_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, kind in [(script, "text/javascript") for script in SCRIPTS] + [("style.css", "text/css")]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    # every module the script imports is served (./NAME.js, nothing from elsewhere)
    imported = {m for name in SCRIPTS for m in re.findall(r'from "\./([\w-]+\.js)"', client.get(f"/static/{name}").text)}
    assert imported == set(SCRIPTS) - {"app.js"}
    text = page.text + "".join(client.get(f"/static/{name}").text for name in SCRIPTS) + client.get("/static/style.css").text
    # no address of another host, no font file, no CDN
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(|\.woff|fonts\.", text, re.IGNORECASE)
    for name in ("index.html", "../app.js", "nothing.js"):
        assert client.get(f"/static/{name}").status_code == 404


def test_one_file_gives_the_results_of_query(client, page_searcher, uploads):
    response = _upload(client, [QUERY])
    assert response.status_code == 200, response.text
    data = response.json()
    expected = page_searcher.search(QUERY, k=3)
    assert [r["case_id"] for r in data["results"]] == [m.case_id for m in expected.results]
    assert [r["distance"] for r in data["results"]] == pytest.approx([m.distance for m in expected.results], abs=1e-4)
    assert data["results"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert data["query"]["n_slices"] == 1 and data["query"]["modality"] == "CT"
    assert data["labels"] == ["Contrast"] and re.fullmatch(r"[\w-]{20,}", data["study"])
    preview = data["preview"]
    assert (preview["rows"], preview["columns"], preview["format"]) == (512, 512, "int16")
    ds = pydicom.dcmread(QUERY)
    assert preview["window"] == {"center": float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter),
                                 "width": float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth),
                                 "source": "header"}
    assert set(preview["presets"]) == {"soft tissue", "lung", "bone", "brain"}
    assert all(r["thumbnail"].startswith(f"/api/thumbnail/{r['case_id']}?v=") for r in data["results"])


def test_the_files_of_a_series_are_one_study(client, page_searcher, tmp_path, uploads):
    paths = make_series(tmp_path / "series", slices=3)
    response = _upload(client, paths, k=4)
    assert response.status_code == 200, response.text
    data = response.json()
    expected = page_searcher.search(tmp_path / "series", k=4)
    assert data["query"]["n_slices"] == 3 and data["preview"]["slices"] == [0, 1, 2]
    assert [r["case_id"] for r in data["results"]] == [m.case_id for m in expected.results]
    # slice 2 of the preview is the third slice of the series, with its values in HU
    raw = client.get(f"/api/study/{data['study']}/slice/2")
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    pixels = np.frombuffer(raw.content, "<i2").reshape(512, 512) * data["preview"]["scale"] + data["preview"]["offset"]
    np.testing.assert_array_equal(pixels, load_study(tmp_path / "series")[1].pixels[2])
    assert client.get(f"/api/study/{data['study']}/slice/3").status_code == 404


def test_the_same_query_again_from_a_kept_study(client, uploads):
    first = _upload(client, [QUERY], k=10).json()
    again = client.get("/api/search", params={"study": first["study"], "k": 10})
    assert again.status_code == 200
    assert [r["case_id"] for r in again.json()["results"]] == [r["case_id"] for r in first["results"]]
    men = client.get("/api/search", params={"study": first["study"], "k": 4, "where": ["sex=M", "modality=CT"]}).json()
    assert len(men["results"]) == 4 and all(r["metadata"]["sex"] == "M" for r in men["results"])
    assert men["query"]["where"] == ["sex=M", "modality=CT"]
    gone = client.get("/api/search", params={"study": "no-such-study", "k": 3})
    assert gone.status_code == 404 and "drop the study on the page again" in gone.json()["error"]


def test_leaving_out_the_same_patient(client, page_searcher, uploads):
    data = _upload(client, [QUERY], k=12, exclude_same_patient="true").json()
    own = page_searcher.patient_of(QUERY)
    assert data["results"] and all(r["metadata"]["patient"] != own for r in data["results"])
    assert data["query"]["excluded"]["same_patient"] >= 1
    again = client.get("/api/search", params={"study": data["study"], "k": 12}).json()
    assert own in {r["metadata"]["patient"] for r in again["results"]}


BAD_UPLOADS = [
    ("not DICOM", [("notes.txt", b"hello, this is text " * 20)], 415, r"^the uploaded file is not a DICOM file"),
    ("several files, none DICOM", [("a.txt", b"a" * 300), ("b.txt", b"b" * 300)], 415, r"uploaded file 1 of 2 is not a DICOM file"),
    ("DICOM, not an image", [("plan.dcm", pydicom.examples.get_path("rt_plan").read_bytes())], 422,
     r"^the uploaded file .*RT Plan Storage is not an image"),
    ("CT without pixel data", "no-pixels", 422, r"^the uploaded file holds no image"),
    ("two series", "two-series", 422, r"holds 2 series; give one series folder"),
    ("too large", [("big.dcm", b"\0" * (LIMIT + 1))], 413, r"larger than 2 MB.*--max-upload-mb"),
]


@pytest.mark.parametrize(("name", "files", "status", "message"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_a_bad_study_is_one_line_that_names_no_path(client, tmp_path, uploads, name, files, status, message):
    if files == "two-series":
        paths = make_series(tmp_path / "a", slices=1) + make_series(tmp_path / "b", slices=1)
        files = [(p.name, p.read_bytes()) for p in paths]
    elif files == "no-pixels":
        ds = pydicom.dcmread(QUERY)
        del ds.PixelData
        ds.save_as(tmp_path / "empty.dcm")
        files = [("empty.dcm", (tmp_path / "empty.dcm").read_bytes())]
    response = client.post("/api/search", params={"k": 3}, files=[("file", (n, b, "application/dicom")) for n, b in files])
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error and re.search(message, error), error
    assert "medsearch-upload" not in error and "/tmp" not in error and ".txt" not in error
    assert _upload(client, [QUERY]).status_code == 200


@pytest.mark.parametrize(("params", "message"), [({"k": 0}, "k must be between 1 and 1000"),
                                                  ({"where": "colour=red"}, "colour"),
                                                  ({"slices": "9:3"}, "slices 9:3 is empty"),
                                                  ({"roi": "1,2,3"}, "roi must be four whole pixel numbers")])
def test_a_bad_query_is_refused_before_the_upload_is_read(client, uploads, params, message):
    response = _upload(client, [QUERY], **params)
    assert response.status_code == 422 and message in response.json()["error"]


def test_a_body_that_is_not_a_form_or_dicom(client, uploads):
    response = client.post("/api/search?k=3", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]
    empty = client.post("/api/search?k=3", files=[("note", (None, "text only"))])
    assert empty.status_code == 400 and "holds no file" in empty.json()["error"]


def test_too_many_files(client, uploads, monkeypatch):
    monkeypatch.setattr("medsearch.web.uploads.MAX_FILES", 2)
    response = _upload(client, [QUERY] * 3)
    assert response.status_code == 400 and "more than 2 files" in response.json()["error"]


def test_a_raw_body_is_one_file(client, uploads):
    response = client.post("/api/search?k=2", content=QUERY.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_thumbnails_are_the_stored_ones(client, page_searcher):
    store = page_searcher.store
    case_id = str(store.cases["case_id"].iloc[4])
    response = client.get(f"/api/thumbnail/{case_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(_read_png(response.content), store.thumbnails[4])
    assert client.get("/api/thumbnail/c-0000000000000000").status_code == 404


def test_options_offer_what_the_index_holds(client, page_searcher):
    options = client.get("/api/options").json()
    cases = page_searcher.store.cases
    assert options["cases"] == len(cases)
    assert {v for v, _ in options["fields"]["sex"]} == set(cases["sex"])
    assert dict(options["fields"]["body_part"]) == cases["body_part"].value_counts().to_dict()
    assert {v for v, _ in options["labels"]["Contrast"]} == {"True", "False"}
    assert options["age"]["min"] == 50 and options["features"]["exclude_same_patient"] is True
    assert options["features"]["dicomweb"] is False and options["user"] is None


def test_no_answer_carries_a_header_value(client, uploads):
    ds = pydicom.dcmread(QUERY)
    secrets = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID)]
    data = _upload(client, [QUERY], k=12)
    text = data.text + json.dumps(client.get("/api/options").json())
    assert not [s for s in secrets if s and s in text]


def _read_png(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit gray or RGB PNG of one IDAT chunk with unfiltered rows (what the service writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    channels = {0: 1, 2: 3}[data[25]]
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    rows = np.frombuffer(zlib.decompress(data[start:start + length]), np.uint8).reshape(height, width * channels + 1)
    assert not rows[:, 0].any()
    return rows[:, 1:] if channels == 1 else rows[:, 1:].reshape(height, width, 3)


def test_png_is_readable_by_matplotlib():
    from io import BytesIO

    from matplotlib.image import imread

    image = (np.arange(12 * 7) % 256).astype(np.uint8).reshape(12, 7)
    np.testing.assert_array_equal(np.rint(imread(BytesIO(pictures.png(image))) * 255).astype(np.uint8), image)


FAILURES = [
    (routes.Refused(413, "too large"), 413, "too large"),
    (IndexNotFoundError("my-index holds no index"), 503, r"the index cannot be read \(my-index holds no index\)"),
    (EncoderMismatchError("built with another encoder"), 409, "built with another encoder"),
    (KeyFileError("no site key"), 422, "no site key"),
    (FilterError("filter 'x' has no operator"), 422, "no operator"),
    (ZeroDivisionError("a value read from the upload: Doe^Jane"), 500, r"^the query failed \(ZeroDivisionError\); see the service log$"),
]


@pytest.mark.parametrize(("error", "status", "message"), FAILURES, ids=[type(f[0]).__name__ for f in FAILURES])
def test_each_failure_is_a_status_and_one_line(error, status, message, caplog):
    got_status, got_message = routes._failure(error)
    assert got_status == status and re.search(message, got_message)
    assert "Doe^Jane" not in got_message + caplog.text


def test_a_series_answer_carries_the_best_slice_the_page_shows(phantom_index, tmp_path, uploads):
    """The page's cards read ``best_slice`` and ``query_slice`` of each result (app.js, "Best slice N of M")."""
    from medsearch.search import Searcher

    archive, index = phantom_index
    searcher = Searcher(index)
    own = searcher.search(archive / "s2", k=1).results[0]
    paths = sorted((archive / "s2").glob("*.dcm"))
    data = _upload(TestClient(page_app(searcher)), paths).json()
    top = data["results"][0]
    assert top["case_id"] == own.case_id and top["best_slice"] == own.location["best_slice"]
    assert {"best_slice", "query_slice", "best_slice_mm", "slice_score"} <= set(top)
    assert data["query"]["rerank"]["used"] is True


def test_a_region_of_a_series_is_searched_as_query_slices_roi(phantom_index, tmp_path, uploads):
    """``slices`` and ``roi`` on the page's search: only the region is embedded (decoded in this process
    here; the service's decoder in tests/web/test_page.py), re-ranked, with the answer naming the
    region, as ``medsearch query --slices/--roi``; the kept token searches the region again."""
    from medsearch.search import Searcher

    archive, index = phantom_index
    searcher = Searcher(index)
    client = TestClient(page_app(searcher))
    paths = sorted((archive / "s1").glob("*.dcm"))
    for params in ({"slices": "6:12"}, {"slices": "12", "roi": "8,8,56,56"}):
        expected = searcher.search(archive / "s1", k=3, **params)
        data = _upload(client, paths, **params).json()
        assert [r["case_id"] for r in data["results"]] == [m.case_id for m in expected.results]
        assert data["query"]["region"] == expected.query["region"] and data["query"]["rerank"]["used"] is True
        assert data["results"][0]["best_slice"] == expected.results[0].location["best_slice"]
        assert data["preview"]["n_slices"] == 24 and len(data["preview"]["slices"]) == 24  # the whole study to draw
        again = client.get("/api/search", params={"study": data["study"], "k": 3}).json()
        assert again["results"] == data["results"] and again["query"]["region"] == data["query"]["region"]
    outside = _upload(client, paths, slices="20:30")
    assert outside.status_code == 422 and "outside the study's 24 slice" in outside.json()["error"]


def test_with_the_link_table_a_result_shows_the_slice_that_matched(phantom_index, tmp_path, uploads):
    """``GET /api/case/ID/slice/I``: the case's slice read from the archive, as the result sheet draws
    it (``?box=`` outlined); without a link table, or for files gone, a 404 line naming no file."""
    from medsearch.search import Searcher
    from medsearch.sharing import LinkTable
    from medsearch.sheets import matched_picture

    archive, index = phantom_index
    links = index.parent / "links.csv"
    searcher = Searcher(index)
    client = TestClient(page_app(searcher, links=links))
    assert client.get("/api/options").json()["features"]["case_slices"] is True
    top = _upload(client, sorted((archive / "s2").glob("*.dcm"))).json()["results"][0]
    url = f"/api/case/{top['case_id']}/slice/{top['best_slice']}"
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    size = searcher.store.thumbnails.shape[1]
    source = LinkTable(links).resolve(top["case_id"])
    expected = matched_picture(source, top["best_slice"], searcher.config.preprocess, size)
    np.testing.assert_array_equal(_read_png(response.content), expected)
    boxed = _read_png(client.get(url, params={"box": "0,0,32,32"}).content)
    assert boxed.shape == (size, size, 3) and (boxed[:, :, 0] != boxed[:, :, 2]).any()  # the box, in colour
    for bad, status in ((f"/api/case/{top['case_id']}/slice/99", 404), ("/api/case/c-nobody/slice/0", 404),
                        (url + "?box=1,2,3", 422)):
        answer = client.get(bad)
        assert answer.status_code == status and "error" in answer.json()
    plain = TestClient(page_app(searcher)).get(url)
    assert plain.status_code == 404 and "--links" in plain.json()["error"]
    # files moved away: one line, naming none of them
    moved = tmp_path / "links.csv"
    moved.write_text(links.read_text().replace(str(archive), str(tmp_path / "gone")))
    gone = TestClient(page_app(searcher, links=moved)).get(url)
    assert gone.status_code == 404 and "cannot be read" in gone.json()["error"] and str(tmp_path) not in gone.text
