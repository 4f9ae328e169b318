"""The DICOMweb connection without a server: URLs, credentials, dates, viewer links."""

from __future__ import annotations

import pytest

from medsearch.errors import ConfigError
from medsearch.pacs import Credentials, DicomWeb, date_range, is_dicomweb_url, public_url, read_credentials, viewer_url

URLS = [
    ("http://127.0.0.1:8042/dicom-web", "http://127.0.0.1:8042/dicom-web"),
    ("https://pacs.example.org/dicom-web/?x=1#top", "https://pacs.example.org/dicom-web"),
    ("http://u:p@host:80/wado", "http://host:80/wado"),
    ("http://[::1]:8042/dicom-web/", "http://[::1]:8042/dicom-web"),
]


@pytest.mark.parametrize(("url", "shown"), URLS)
def test_public_url_strips_credentials_query_and_slash(url, shown):
    assert public_url(url) == shown


@pytest.mark.parametrize(("value", "expected"), [("http://x/dicom-web", True), ("HTTPS://x", True), ("/data/archive", False),
                                                 ("ftp://x", False), (None, False)])
def test_is_dicomweb_url(value, expected):
    assert is_dicomweb_url(value) is expected


CREDENTIALS = [
    ({"MEDSEARCH_DICOMWEB_TOKEN": "tok"}, "bearer", "", "tok", "MEDSEARCH_DICOMWEB_TOKEN"),
    ({"MEDSEARCH_DICOMWEB_USER": "u", "MEDSEARCH_DICOMWEB_PASSWORD": "p"}, "basic", "u", "p", "MEDSEARCH_DICOMWEB_USER and MEDSEARCH_DICOMWEB_PASSWORD"),
    ({}, "none", "", "", ""),
]


@pytest.mark.parametrize(("env", "kind", "user", "secret", "source"), CREDENTIALS)
def test_credentials_from_the_environment(env, kind, user, secret, source):
    found = read_credentials(environ=env)
    assert (found.kind, found.user, found.secret, found.source) == (kind, user, secret, source)
    assert secret not in repr(found) or not secret


@pytest.mark.parametrize(("text", "kind", "user", "secret"), [("Bearer abc.def\n", "bearer", "", "abc.def"),
                                                               ("alice:s3:cret\n", "basic", "alice", "s3:cret")])
def test_credentials_file(tmp_path, text, kind, user, secret):
    path = tmp_path / "auth"
    path.write_text(text)
    found = read_credentials(path, environ={"MEDSEARCH_DICOMWEB_TOKEN": "ignored"})
    assert (found.kind, found.user, found.secret) == (kind, user, secret)
    env_file = read_credentials(environ={"MEDSEARCH_DICOMWEB_AUTH_FILE": str(path)})
    assert env_file.secret == secret


def test_bad_credentials_file_is_told_without_its_content(tmp_path):
    path = tmp_path / "auth"
    path.write_text("just-a-secret-word\n")
    with pytest.raises(ConfigError, match="'Bearer TOKEN' or 'USER:PASSWORD'") as error:
        read_credentials(path, environ={})
    assert "just-a-secret-word" not in str(error.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_credentials(tmp_path / "missing", environ={})
    with pytest.raises(ConfigError, match="MEDSEARCH_DICOMWEB_PASSWORD is not"):
        read_credentials(environ={"MEDSEARCH_DICOMWEB_USER": "u"})


@pytest.mark.parametrize(("url", "message"), [("http://alice:secret@127.0.0.1:8042/dicom-web", "carries credentials"),
                                              ("file:///tmp/x", "not a DICOMweb URL")])
def test_bad_urls_are_refused(url, message):
    with pytest.raises(ConfigError, match=message) as error:
        DicomWeb(url, credentials=Credentials())
    assert "secret" not in str(error.value)


def test_repr_names_no_secret():
    server = DicomWeb("http://127.0.0.1:1/dicom-web", credentials=Credentials("bearer", secret="tok-123", source="X"))
    assert "tok-123" not in repr(server)


DATES = [((None, None), None), (("20240101", None), "20240101-"), (("2024-01-01", "2024-12-31"), "20240101-20241231"),
         ((None, "20241231"), "-20241231")]


@pytest.mark.parametrize(("given", "expected"), DATES)
def test_date_range(given, expected):
    assert date_range(*given) == expected


@pytest.mark.parametrize(("given", "message"), [(("2024/01/01", None), "not a date"), (("20250101", "20240101"), "after")])
def test_bad_dates(given, message):
    with pytest.raises(ConfigError, match=message):
        date_range(*given)


VIEWER = [
    ("ohif", "http://pacs:8042/viewer?StudyInstanceUIDs=1.2.3"),
    ("orthanc", "http://pacs:8042/ui/app/#/filtered-studies?StudyInstanceUID=1.2.3&expand=study"),
    ("stone", "http://pacs:8042/stone-webviewer/index.html?study=1.2.3"),
    ("{root}/studies/{study_uid}/series/{series_uid}", "http://pacs:8042/dicom-web/studies/1.2.3/series/4.5"),
]


@pytest.mark.parametrize(("template", "expected"), VIEWER)
def test_viewer_url(template, expected):
    assert viewer_url(template, root="http://pacs:8042/dicom-web/", study_uid="1.2.3", series_uid="4.5") == expected


def test_viewer_template_with_an_unknown_field():
    with pytest.raises(ConfigError, match="'patient'"):
        viewer_url("{base}/{patient}", root="http://x", study_uid="1")


def test_orthanc_missing_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """The tests that need Orthanc fail under CI when it is missing (CI must run them), and skip elsewhere."""
    from pacs import orthanc

    monkeypatch.setattr(orthanc, "orthanc_binary", lambda: None)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install orthanc orthanc-dicomweb"):
        orthanc.require_orthanc()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        orthanc.require_orthanc()


def test_ray_engine_with_a_server_is_refused(tmp_path):
    from medsearch.indexing import build_index

    with pytest.raises(ConfigError, match="does not index a DICOMweb server"):
        build_index("http://127.0.0.1:1/dicom-web", tmp_path / "index", key=tmp_path / "k" / "site.key", engine="ray")
    assert not (tmp_path / "index").exists()
