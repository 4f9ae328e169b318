"""Access to the service: credentials from a file or the environment, the gate in front of every route,
cookie sessions for the page, and the refusal to serve a non-loopback address without credentials."""

from __future__ import annotations

import base64
import os

import pytest
from fastapi.testclient import TestClient
from web.pages import QUERY, SECRET, USER, page_app

from medsearch.errors import ConfigError
from medsearch.web import Credentials, Sessions, check_exposure, is_loopback
from medsearch.web.auth import MIN_SECRET_LENGTH, TOKEN_VARIABLE, Access

OTHER = "pacs-bridge", "Zt0dQ8x1-another-long-secret"


@pytest.fixture(scope="module")
def credentials() -> Credentials:
    return Credentials({USER: SECRET, OTHER[0]: OTHER[1]})


@pytest.fixture()
def client(page_searcher, credentials) -> TestClient:
    return TestClient(page_app(page_searcher, credentials=credentials), follow_redirects=False)


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# -- credentials ----------------------------------------------------------------------------------


def test_an_auth_file_and_the_environment(tmp_path):
    path = tmp_path / "staff.txt"
    path.write_text(f"# staff of the radiology department\n\n{USER}:{SECRET}\n  {OTHER[0]} : {OTHER[1]}  \n")
    path.chmod(0o600)
    loaded = Credentials.load(path, environ={TOKEN_VARIABLE: "a-token-for-scripts-only"})
    assert loaded is not None and loaded.users == {USER: SECRET, OTHER[0]: OTHER[1], "token": "a-token-for-scripts-only"}
    assert loaded.user_for(SECRET) == USER and loaded.user_for(SECRET, USER) == USER
    assert loaded.user_for(SECRET, OTHER[0]) is None and loaded.user_for("wrong-secret-of-some-length") is None
    assert Credentials.load(None, environ={}) is None
    assert Credentials.load(None, environ={TOKEN_VARIABLE: f"{USER}:{SECRET}"}).users == {USER: SECRET}


BAD_FILES = [
    ("short secret", f"{USER}:short", f"line 1: the secret is shorter than {MIN_SECRET_LENGTH} characters"),
    ("name twice", f"{USER}:{SECRET}\n{USER}:{OTHER[1]}", f"line 2: the name '{USER}' is given twice"),
    ("secret twice", f"{USER}:{SECRET}\n{OTHER[0]}:{SECRET}", "line 2: this secret is already another user's"),
    ("odd name", f"dr lee:{SECRET}", "line 1: a name is letters, digits"),
    ("comments only", "# nobody yet\n", "holds no NAME:SECRET line"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_auth_file_is_refused_without_quoting_a_secret(tmp_path, name, text, message):
    path = tmp_path / "auth.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        Credentials.load(path, environ={})
    assert SECRET not in str(caught.value) and "short" not in str(caught.value).split(":")[-1]


def test_a_missing_auth_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        Credentials.load(tmp_path / "none.txt", environ={})


HOSTS = [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
         ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.168.1.20", False), ("radiology.example.org", False)]


@pytest.mark.parametrize(("host", "loopback"), HOSTS)
def test_only_loopback_serves_without_credentials(host, loopback, credentials):
    assert is_loopback(host) is loopback
    if loopback:
        check_exposure(host, None)
    else:
        with pytest.raises(ConfigError, match=f"serving on {host} without authentication.*--auth-file.*--insecure-no-auth"):
            check_exposure(host, None)
    check_exposure(host, credentials)
    check_exposure(host, None, insecure_no_auth=True)


def test_sessions_expire_and_are_bounded(monkeypatch):
    sessions = Sessions(hours=1.0, limit=2)
    first, second = sessions.open("a"), sessions.open("b")
    assert sessions.user(first) == "a" and sessions.user(second) == "b"
    third = sessions.open("c")
    assert sessions.user(first) is None and sessions.user(third) == "c"  # the oldest went
    sessions.close(third)
    assert sessions.user(third) is None
    import medsearch.web.auth as auth

    now = auth.time.monotonic()
    monkeypatch.setattr(auth.time, "monotonic", lambda: now + 3601)
    assert sessions.user(second) is None


# -- the gate -------------------------------------------------------------------------------------


def test_the_page_and_the_api_refuse_a_request_without_credentials(client):
    page = client.get("/?k=5", headers={"Accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F%3Fk%3D5"
    for method, url in (("GET", "/api/options"), ("POST", "/api/search?k=3"), ("GET", "/api/thumbnail/c-1"), ("GET", "/")):
        response = client.request(method, url)
        assert response.status_code == 401, url
        assert response.headers["www-authenticate"].startswith("Bearer") and "sign in at /login" in response.json()["error"]
    assert client.get("/api/options", headers=_bearer("not-the-secret-at-all")).status_code == 401
    # the sign-in page and the page's files are open
    assert client.get("/login").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_a_bearer_token_or_basic_credentials_answer(client):
    assert client.get("/api/options", headers=_bearer(SECRET)).json()["user"] == USER
    basic = base64.b64encode(f"{OTHER[0]}:{OTHER[1]}".encode()).decode()
    assert client.get("/api/options", headers={"Authorization": f"Basic {basic}"}).json()["user"] == OTHER[0]
    wrong = base64.b64encode(f"{USER}:{OTHER[1]}".encode()).decode()  # another user's secret
    assert client.get("/api/options", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    with open(QUERY, "rb") as f:
        response = client.post("/api/search?k=2", files={"file": ("q.dcm", f)}, headers=_bearer(SECRET))
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_signing_in_gives_the_page_a_session(client):
    failed = client.post("/login", data={"user": USER, "password": "wrong-secret-here", "next": "/?k=4"})
    assert failed.status_code == 303 and failed.headers["location"].startswith("/login?failed=1")
    assert "do not match" in client.get(failed.headers["location"]).text
    response = client.post("/login", data={"user": USER, "password": SECRET, "next": "/?k=4"})
    assert response.status_code == 303 and response.headers["location"] == "/?k=4"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/", headers={"Accept": "text/html"}).status_code == 200
    assert client.get("/api/options").json()["user"] == USER
    # a change sent with the cookie from another site's page is refused
    foreign = client.post("/api/search?k=2", content=b"x", headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    client.post("/logout")
    assert client.get("/api/options").status_code == 401


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:alert(1)"])
def test_sign_in_sends_back_to_this_service_only(client, target):
    response = client.post("/login", data={"user": USER, "password": SECRET, "next": target})
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_guessing_is_slowed_down(page_searcher, credentials):
    access = Access(credentials)
    for _ in range(10):
        assert access.sign_in(USER, "a-wrong-guess-of-length", "10.0.0.9") is None
    with pytest.raises(PermissionError):
        access.sign_in(USER, SECRET, "10.0.0.9")
    assert access.sign_in(USER, SECRET, "10.0.0.10") is not None  # another address is not blocked
    assert access.identify({"authorization": f"Bearer {SECRET}"}, "10.0.0.9", "GET") == (None, "blocked")


def test_without_credentials_everyone_is_anonymous(page_searcher):
    client = TestClient(page_app(page_searcher))
    assert client.get("/api/options").json()["user"] is None
    assert client.get("/login", follow_redirects=False).status_code == 303


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_readable_auth_file_is_warned_about(tmp_path, caplog):
    path = tmp_path / "auth.txt"
    path.write_text(f"{USER}:{SECRET}\n")
    path.chmod(0o644)
    Credentials.load(path, environ={})
    assert "can be read by other users" in caplog.text and SECRET not in caplog.text
