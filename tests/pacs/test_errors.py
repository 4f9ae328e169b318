"""What goes wrong with a PACS, with a real Orthanc: unreachable, stopped mid-run, a 500 on one series,
wrong or missing credentials. Each is one line naming the server (never a credential or a UID), exit 2;
a series that fails alone is skipped with fetch_error and its HTTP status, and fetched by the next run."""

from __future__ import annotations

import csv

import pytest
from pacs.orthanc import Orthanc, free_port
from pacs.proxy import Proxy
from pacs.studies import new_studies, sample_files, uids_of
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.errors import DicomWebError
from medsearch.indexing import SKIP_REPORT, build_index
from medsearch.store import IndexStore

pytestmark = pytest.mark.slow

SECRET = "s3cret-Pa55word"


def _index(url: str, index, key, *extra: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(
        app, ["index", url, "--index", str(index), "--key", str(key.path), "--workers", "0", "--quiet", *extra],
        env={"MEDSEARCH_DICOMWEB_TOKEN": None, "MEDSEARCH_DICOMWEB_USER": None, "MEDSEARCH_DICOMWEB_PASSWORD": None,
             "MEDSEARCH_DICOMWEB_AUTH_FILE": None, **(env or {})},
    )


def test_unreachable_server_is_one_line_naming_the_url(tmp_path, key):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = _index(url, tmp_path / "index", key, env={"MEDSEARCH_DICOMWEB_TOKEN": SECRET})
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "connection refused" in lines[0]
    assert SECRET not in result.output


def test_a_500_on_one_series_skips_it_and_the_run_goes_on(tmp_path, key, orthanc):
    failing = new_studies(tmp_path / "new", 1, seed="fails")
    orthanc.upload(failing)
    import pydicom

    series = str(pydicom.dcmread(failing[0], stop_before_pixels=True).SeriesInstanceUID)
    with Proxy(orthanc.url, fail_series=series) as proxy:
        report = build_index(proxy.url(), tmp_path / "index", key=key, workers=0)
    assert report.dicomweb["series_failed"] == 1 and report.dicomweb["failed_by_status"] == {"HTTP 500": 1}
    assert report.n_cases_added == report.dicomweb["series_listed"] - 1 and report.accounted
    with open(tmp_path / "index" / SKIP_REPORT) as f:
        rows = list(csv.DictReader(f))
    assert [(r["reason"], r["detail"]) for r in rows] == [("fetch_error", "fetching its series failed: HTTP 500")]
    assert series not in rows[0]["path"]
    again = build_index(orthanc.dicomweb, tmp_path / "index", key=key, workers=0)
    assert again.dicomweb["series_fetched"] == 1 and again.n_cases_added == 1


def test_server_stopped_mid_run(tmp_path, key):
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(sample_files())
        server.upload(new_studies(tmp_path / "new", 8, seed="stopped"))

        def stop_at(number: int) -> None:
            if number == 12:  # in the second batch: the first (8 series) is fetched and gets committed
                server.stop()

        with Proxy(server.url, on_retrieve=stop_at) as proxy:
            result = _index(proxy.url(), tmp_path / "index", key)
    finally:
        server.stop()
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and proxy.url() in lines[0]
    # the series fetched before the server stopped are indexed, and the index is whole
    assert len(IndexStore.open(tmp_path / "index")) >= 8


@pytest.fixture
def guarded(tmp_path):
    server = Orthanc(tmp_path / "guarded", users={"alice": SECRET}).start()
    try:
        server.upload(sample_files()[:3])
        yield server
    finally:
        server.stop()


def test_credentials(tmp_path, key, guarded):
    none = _index(guarded.dicomweb, tmp_path / "a", key)
    assert none.exit_code == 2 and "401" in none.output and "MEDSEARCH_DICOMWEB_TOKEN" in none.output
    wrong = _index(guarded.dicomweb, tmp_path / "b", key, env={"MEDSEARCH_DICOMWEB_USER": "alice", "MEDSEARCH_DICOMWEB_PASSWORD": "nope-" + SECRET})
    assert wrong.exit_code == 2 and "MEDSEARCH_DICOMWEB_USER and MEDSEARCH_DICOMWEB_PASSWORD" in wrong.output
    assert SECRET not in wrong.output and len(wrong.output.strip().splitlines()) == 1
    auth = tmp_path / "dicomweb.auth"
    auth.write_text(f"alice:{SECRET}\n")
    good = _index(guarded.dicomweb, tmp_path / "c", key, "--dicomweb-auth-file", str(auth), "--json")
    assert good.exit_code == 0, good.output
    assert SECRET not in good.output and not [u for u in uids_of(sample_files()[:3]) if u in good.output]
    by_env = _index(guarded.dicomweb, tmp_path / "d", key, env={"MEDSEARCH_DICOMWEB_USER": "alice", "MEDSEARCH_DICOMWEB_PASSWORD": SECRET})
    assert by_env.exit_code == 0, by_env.output
    for folder in (tmp_path / "c", tmp_path / "d"):
        for path in folder.rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_credentials_in_the_url_are_refused(tmp_path, key):
    result = _index(f"http://alice:{SECRET}@127.0.0.1:1/dicom-web", tmp_path / "index", key)
    assert result.exit_code == 2 and "carries credentials" in result.output and SECRET not in result.output


def test_filters_need_a_server(tmp_path, key):
    result = _index(str(sample_files()[0].parent), tmp_path / "index", key, "--modality", "CT")
    assert result.exit_code == 2 and "apply to a DICOMweb server" in result.output


def test_wrong_root_says_what_a_root_is(tmp_path, key, sample_orthanc):
    result = _index(f"{sample_orthanc.url}/not-dicom-web", tmp_path / "index", key)
    assert result.exit_code == 2 and "is the DICOMweb root" in result.output and "HTTP 404" in result.output


def test_library_error_type(tmp_path, key):
    with pytest.raises(DicomWebError, match="cannot reach the DICOMweb server"):
        build_index(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path / "index", key=key, workers=0)
