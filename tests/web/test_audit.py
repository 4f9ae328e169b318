"""The audit log: one JSON line per query, with who asked, what and which cases came back, and nothing
that could identify a patient or name a file."""

from __future__ import annotations

import json
import stat

import pydicom
import pytest
from fastapi.testclient import TestClient
from web.pages import QUERY, SECRET, USER, page_app

from medsearch.errors import ConfigError
from medsearch.filters import Filter
from medsearch.web import AuditLog, Credentials


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_record_is_one_line_in_an_owner_only_file(tmp_path):
    path = tmp_path / "local" / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.record(user="dr-lee", client="127.0.0.1", via="page", k=5, filters=[Filter.parse("sex=F"), "age>=60"],
                     options={"exclude_same_patient": True}, cases=["c-1", "c-2"])
        audit.record(user="dr-lee", client="127.0.0.1", via="api", k=3, status=415)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first, second = _lines(path)
    assert first["user"] == "dr-lee" and first["via"] == "page" and first["k"] == 5 and first["status"] == 200
    assert first["filters"] == ["sex=F", "age>=60"] and first["cases"] == ["c-1", "c-2"]
    assert first["options"] == {"exclude_same_patient": True} and first["time"].endswith("Z")
    assert second["status"] == 415 and second["cases"] == []
    with AuditLog(path) as again:  # appends, never truncates
        again.record(user="x", client="y", via="api", k=1)
    assert len(_lines(path)) == 3


@pytest.mark.parametrize("value", ["Doe^Jane", "1.2.840.113619.2.55.3.604688", "20190417", "jane.doe@example.org"])
def test_a_filter_value_that_could_identify_someone_is_withheld(tmp_path, value):
    with AuditLog(tmp_path / "audit.jsonl") as audit:
        entry = audit.record(user="u", client="c", via="api", k=1, filters=[Filter("model", "~", value), f"model~{value}"])
    assert entry["filters"] == ["model~(withheld)", "(withheld)"]
    assert value not in (tmp_path / "audit.jsonl").read_text()


def test_an_unwritable_log_stops_the_service_from_starting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="the audit log .* cannot be written.*--audit-log"):
        AuditLog(blocker / "audit.jsonl")


def test_every_page_query_is_logged_with_its_user(page_searcher, tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    client = TestClient(page_app(page_searcher, credentials=Credentials({USER: SECRET}), audit=audit))
    headers = {"Authorization": f"Bearer {SECRET}"}
    with open(QUERY, "rb") as f:
        first = client.post("/api/search", params={"k": 3, "where": "sex=F"}, files={"file": ("Doe_Jane_CT.dcm", f)},
                            headers=headers).json()
    client.get("/api/search", params={"study": first["study"], "k": 2}, headers=headers)
    client.post("/api/search?k=3", files={"file": ("notes.txt", b"not dicom" * 50)}, headers=headers)
    client.get("/api/search", params={"study": first["study"], "k": 2})  # refused at the gate: not a query
    upload, again, failed = _lines(path)
    assert upload["user"] == USER and upload["via"] == "page" and upload["filters"] == ["sex=F"]
    assert upload["cases"] == [r["case_id"] for r in first["results"]]
    assert again["k"] == 2 and len(again["cases"]) == 2
    assert failed["status"] == 415 and failed["cases"] == []
    ds = pydicom.dcmread(QUERY)
    text = path.read_text()
    for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.PatientID, "Doe_Jane", ".dcm", "notes"):
        assert str(value) not in text


def test_a_query_that_cannot_be_logged_is_not_answered(page_searcher, tmp_path, monkeypatch):
    audit = AuditLog(tmp_path / "audit.jsonl")
    client = TestClient(page_app(page_searcher, audit=audit))

    def full(**_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "record", full)
    with open(QUERY, "rb") as f:
        response = client.post("/api/search?k=3", files={"file": ("q.dcm", f)})
    assert response.status_code == 503 and "cannot be recorded in the audit log" in response.json()["error"]
    assert "results" not in response.json()


def test_the_json_api_is_logged_too(page_searcher, tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from medsearch.web import PageEngine, mount_page

    app = FastAPI()

    @app.post("/query")
    async def query(k: int = 10) -> JSONResponse:
        if k > 5:
            return JSONResponse({"error": "too many"}, status_code=422)
        return JSONResponse({"results": [{"case_id": f"c-{i}"} for i in range(k)]})

    audit = AuditLog(tmp_path / "audit.jsonl")
    mount_page(app, PageEngine(page_searcher), max_upload_bytes=1000, credentials=Credentials({USER: SECRET}),
               audit=audit, audited_paths=("/query",))
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {SECRET}"}
    assert client.post("/query?k=2&where=sex%3DF&exclude_same_patient=true", headers=headers).json()["results"]
    assert client.post("/query?k=9", headers=headers).status_code == 422
    assert client.post("/query?k=2").status_code == 401  # refused at the gate: no query, no line
    answered, refused = _lines(tmp_path / "audit.jsonl")
    assert answered["via"] == "api" and answered["user"] == USER and answered["cases"] == ["c-0", "c-1"]
    assert answered["filters"] == ["sex=F"] and answered["options"] == {"exclude_same_patient": True}
    assert refused["status"] == 422 and refused["cases"] == [] and refused["k"] == 9
    client.post("/query?k=1&slices=4:9&roi=10,10,90,90", headers=headers)
    client.post("/query?k=1&roi=Doe^Jane", headers=headers)
    region, malformed = _lines(tmp_path / "audit.jsonl")[2:]
    assert region["options"] == {"region": {"slices": [4, 9], "roi": [10, 10, 90, 90]}}
    assert malformed["options"] == {"region": "(malformed)"} and "Doe" not in (tmp_path / "audit.jsonl").read_text()

    monkeypatch.setattr(audit, "record", lambda **_: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    response = client.post("/query?k=2", headers=headers)
    assert response.status_code == 503 and "audit log" in response.json()["error"]


def test_a_region_query_is_logged_with_its_slab_and_box(page_searcher, tmp_path):
    path = tmp_path / "audit.jsonl"
    client = TestClient(page_app(page_searcher, audit=AuditLog(path)))
    with open(QUERY, "rb") as f:
        first = client.post("/api/search", params={"k": 2, "roi": "100,120,300,320"}, files={"file": ("a.dcm", f)}).json()
    client.get("/api/search", params={"study": first["study"], "k": 2})
    upload, again = _lines(path)
    assert upload["options"]["region"] == {"roi": [100, 120, 300, 320]} == again["options"]["region"]
    assert upload["cases"] == [r["case_id"] for r in first["results"]]
