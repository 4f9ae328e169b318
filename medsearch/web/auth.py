"""Who may use the service: secrets from ``--auth-file`` or the environment, cookie sessions, the gate.

``medsearch serve`` answers anyone who reaches its port. On loopback (the default) that is this
machine only; anywhere else it must check who asks. :class:`Credentials` holds the accepted secrets,
:class:`Sessions` the signed-in browsers, :class:`Access` the three together, and :class:`AuthGate`
(an ASGI middleware) refuses every
request that brings neither, except the sign-in page, the page's static files and ``/health``.

A request proves who it is in one of three ways:

* ``Authorization: Bearer SECRET`` (scripts, ``curl -H``);
* ``Authorization: Basic`` with ``NAME:SECRET`` (``curl -u NAME:SECRET``);
* the session cookie the sign-in page (``POST /login``) sets for a browser. A cookie-borne request
  that changes something must come from the service's own page (its ``Origin`` header, when sent,
  names this service), and the cookie is ``HttpOnly`` and ``SameSite=Strict``.

The auth file holds one person per line, ``NAME:SECRET``; a line without a colon is a token for the
name ``token``. Lines starting with ``#`` are comments. Secrets are at least
:data:`MIN_SECRET_LENGTH` characters and unique. The environment variable
:data:`TOKEN_VARIABLE` may hold one more such line. Example::

    # medsearch serve --auth-file staff.txt
    dr-lee:9sQ3k...a long random secret...
    pacs-bridge:Zt0d...another one...

:func:`check_exposure` refuses to serve a non-loopback address without credentials, unless the
operator says ``--insecure-no-auth``: the CLI calls it before anything loads or binds.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medsearch.errors import ConfigError

__all__ = [
    "ANONYMOUS",
    "MIN_SECRET_LENGTH",
    "SESSION_COOKIE",
    "TOKEN_VARIABLE",
    "Access",
    "AuthGate",
    "Credentials",
    "Sessions",
    "check_exposure",
    "client_address",
    "is_loopback",
    "request_user",
    "session_cookie",
]

log = logging.getLogger(__name__)

#: The environment variable that may hold one ``NAME:SECRET`` (or ``SECRET``) line.
TOKEN_VARIABLE = "MEDSEARCH_AUTH_TOKEN"
#: The shortest secret accepted.
MIN_SECRET_LENGTH = 12
#: The cookie of a signed-in browser.
SESSION_COOKIE = "medsearch_session"
#: The user an audit record names when the service has no credentials (loopback only).
ANONYMOUS = "anonymous"

_TOKEN_USER = "token"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
_SESSION_HOURS = 12.0
_MAX_SESSIONS = 10_000
# Failed attempts from one client address: after _MAX_FAILURES within _FAILURE_WINDOW_S, refused until the window ends.
_MAX_FAILURES = 10
_FAILURE_WINDOW_S = 300.0
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})
# Paths served without credentials: the sign-in page, the page's own scripts and styles, the health check.
_OPEN_PATHS = frozenset({"/login", "/health", "/favicon.ico"})
_OPEN_PREFIXES = ("/static/",)
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` answers this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, credentials: Credentials | None, *, insecure_no_auth: bool = False) -> None:
    """Refuse to serve a non-loopback ``host`` without credentials (before anything binds).

    Raises
    ------
    ConfigError
        ``host`` is not a loopback address, no credentials are given and ``insecure_no_auth`` is False.
    """
    if is_loopback(host) or credentials is not None or insecure_no_auth:
        return
    raise ConfigError(
        f"serving on {host} without authentication would let anyone who reaches the port query the index; "
        f"give --auth-file FILE (or set {TOKEN_VARIABLE}), or --insecure-no-auth behind a gateway that authenticates"
    )


@dataclass(frozen=True)
class Credentials:
    """The accepted secrets: user name -> secret."""

    users: dict[str, str]

    def __post_init__(self) -> None:
        if not self.users:
            raise ConfigError("no credentials given; put NAME:SECRET lines in the --auth-file")

    @classmethod
    def load(cls, path: str | Path | None = None, *, environ: MutableMapping[str, str] | None = None) -> Credentials | None:
        """The secrets of the auth file ``path`` and of :data:`TOKEN_VARIABLE`; None when neither gives any.

        Raises
        ------
        ConfigError
            The file cannot be read, or a line is malformed, too short, or repeats a name or a secret
            (the message names the line number, never a secret).
        """
        env = os.environ if environ is None else environ
        entries: list[tuple[str, str, str]] = []  # (name, secret, where)
        if path is not None:
            path = Path(path)
            try:
                mode = path.stat().st_mode
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"the auth file {path} cannot be read ({type(e).__name__}); give a UTF-8 text file of NAME:SECRET lines") from e
            if stat.S_IMODE(mode) & 0o077:
                log.warning(
                    "the auth file %s can be read by other users of this machine; chmod 600 it", path
                )
            entries += _parse_lines(text.splitlines(), f"{path}")
        token = env.get(TOKEN_VARIABLE, "")
        if token.strip():
            entries += _parse_lines([token], TOKEN_VARIABLE)
        if not entries:
            if path is not None:
                raise ConfigError(f"the auth file {path} holds no NAME:SECRET line; add one per person")
            return None
        users: dict[str, str] = {}
        for name, secret, where in entries:
            if name in users:
                raise ConfigError(f"{where}: the name {name!r} is given twice; give each person one line")
            if any(hmac.compare_digest(secret, other) for other in users.values()):
                raise ConfigError(f"{where}: this secret is already another user's; give each person their own")
            users[name] = secret
        return cls(users)

    def user_for(self, secret: str, name: str | None = None) -> str | None:
        """The user whose secret is ``secret`` (and whose name is ``name``, when given); None otherwise.

        Every secret is compared, in constant time, so the answer's timing tells nothing.
        """
        found = None
        given = secret.encode("utf-8", "surrogateescape")
        for user, expected in self.users.items():
            same = hmac.compare_digest(given, expected.encode("utf-8", "surrogateescape"))
            if same and (name is None or hmac.compare_digest(name.encode("utf-8", "surrogateescape"), user.encode())):
                found = user
        return found


def _parse_lines(lines: Iterable[str], where: str) -> list[tuple[str, str, str]]:
    out = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        place = f"{where} line {number}" if where != TOKEN_VARIABLE else where
        name, sep, secret = line.partition(":")
        if not sep:
            name, secret = _TOKEN_USER, line
        name, secret = name.strip(), secret.strip()
        if not name or not set(name) <= _NAME_CHARS:
            raise ConfigError(f"{place}: a name is letters, digits and . _ - @ only; write NAME:SECRET")
        if len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"{place}: the secret is shorter than {MIN_SECRET_LENGTH} characters; use a longer one, such as "
                "the output of: python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        out.append((name, secret, place))
    return out


@dataclass
class Sessions:
    """Signed-in browsers: a random cookie value -> (user, expiry), in memory, bounded in number."""

    hours: float = _SESSION_HOURS
    limit: int = _MAX_SESSIONS
    _live: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, user: str) -> str:
        """A new session of ``user``; returns its cookie value."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._live[token] = (user, time.monotonic() + self.hours * 3600)
            while len(self._live) > self.limit:
                self._live.popitem(last=False)  # the oldest first
        return token

    def user(self, token: str) -> str | None:
        """The user of a live session, or None."""
        with self._lock:
            entry = self._live.get(token)
            if entry is None:
                return None
            if entry[1] < time.monotonic():
                del self._live[token]
                return None
            return entry[0]

    def close(self, token: str) -> None:
        with self._lock:
            self._live.pop(token, None)


class _Failures:
    """Failed sign-ins per client address, to slow down guessing."""

    def __init__(self) -> None:
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._seen.get(client, ()) if now - t < _FAILURE_WINDOW_S]
            if recent:
                self._seen[client] = recent
            else:
                self._seen.pop(client, None)
            return len(recent) >= _MAX_FAILURES

    def add(self, client: str) -> None:
        with self._lock:
            if len(self._seen) > 100_000:  # a flood from many addresses: forget, rather than grow without bound
                self._seen.clear()
            self._seen.setdefault(client, []).append(time.monotonic())

    def clear(self, client: str) -> None:
        with self._lock:
            self._seen.pop(client, None)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def request_user(scope: Scope) -> str:
    """The user :class:`AuthGate` let in (``scope["state"]["user"]``), :data:`ANONYMOUS` without credentials."""
    return str(scope.get("state", {}).get("user") or ANONYMOUS)


class Access:
    """Who may use the service: its credentials, the signed-in browsers, and the failed attempts.

    Without credentials (``credentials=None``) everyone may, as :data:`ANONYMOUS`.
    """

    def __init__(self, credentials: Credentials | None, *, sessions: Sessions | None = None) -> None:
        self.credentials = credentials
        self.sessions = sessions if sessions is not None else Sessions()
        self.failures = _Failures()

    @property
    def required(self) -> bool:
        return self.credentials is not None

    def identify(self, headers: dict[str, str], client: str, method: str) -> tuple[str | None, str]:
        """The user a request's headers prove, or (None, why not): ``""`` (nothing given), ``bad``,
        ``blocked`` (too many failures lately) or ``origin`` (a cookie sent from another site's page)."""
        if self.credentials is None:
            return ANONYMOUS, ""
        authorization = headers.get("authorization", "")
        if authorization:
            if self.failures.blocked(client):
                return None, "blocked"
            scheme, _, value = authorization.partition(" ")
            user = None
            if scheme.lower() == "bearer":
                user = self.credentials.user_for(value.strip())
            elif scheme.lower() == "basic":
                try:
                    name, _, secret = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    name, secret = "", ""
                user = self.credentials.user_for(secret, name) if secret else None
            if user is None:
                self.failures.add(client)
                return None, "bad"
            return user, ""
        token = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        if token:
            user = self.sessions.user(token)
            if user is None:
                return None, "bad"
            if method in _UNSAFE_METHODS and not _same_origin(headers):
                return None, "origin"
            return user, ""
        return None, ""

    def sign_in(self, name: str, secret: str, client: str) -> str | None:
        """A new session's cookie value for a right name and secret; None otherwise (counted as a failure).

        Raises
        ------
        PermissionError
            Too many failed attempts from ``client`` lately.
        """
        if self.credentials is None:
            return None
        if self.failures.blocked(client):
            raise PermissionError("too many failed sign-ins")
        user = self.credentials.user_for(secret, name.strip() or None)
        if user is None:
            self.failures.add(client)
            return None
        self.failures.clear(client)
        return self.sessions.open(user)


class AuthGate:
    """ASGI middleware: lets in a request with a valid bearer token, basic credentials or session cookie.

    The user let in is put in ``scope["state"]["user"]`` (``request.state.user``). Without one, a
    page request (``GET`` accepting HTML) is sent to ``/login`` (303) and any other gets a 401 JSON
    error, except on the open paths: ``/login``, ``/static/...`` and ``/health``.
    """

    def __init__(self, app: ASGIApp, *, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        headers = _headers(scope)
        user, problem = self.access.identify(headers, client_address(scope), scope.get("method", ""))
        path = scope.get("path", "")
        if user is not None:
            state["user"] = user
            await self.app(scope, receive, send)
            return
        if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        if problem == "blocked":
            await _send_json(send, 429, "too many failed sign-ins from this address; wait five minutes and try again")
            return
        if problem == "origin":
            await _send_json(send, 403, "this request did not come from the medsearch page; reload the page and try again")
            return
        if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
            target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
            await _send(send, 303, b"", [(b"location", f"/login?next={quote(target, safe='')}".encode()),
                                         (b"cache-control", b"no-store")])
            return
        await _send_json(
            send, 401, "this service needs credentials: send Authorization: Bearer TOKEN, or sign in at /login",
            ((b"www-authenticate", b'Bearer realm="medsearch"'),),
        )


def session_cookie(token: str, *, secure: bool, clear: bool = False) -> str:
    """The ``Set-Cookie`` value of a session (or of its removal)."""
    attributes = "Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    if clear:
        return f"{SESSION_COOKIE}=; Max-Age=0; {attributes}"
    return f"{SESSION_COOKIE}={token}; Max-Age={int(_SESSION_HOURS * 3600)}; {attributes}"


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        out[key.decode("latin-1").lower()] = value.decode("latin-1")
    return out


def client_address(scope: Scope) -> str:
    """The address of the client a request came from (``unknown`` when the server does not say)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _cookie(header: str, name: str) -> str:
    if not header:
        return ""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - http.cookies raises CookieError and others on odd headers: no cookie then
        return ""
    morsel = jar.get(name)
    return morsel.value if morsel is not None else ""


def _same_origin(headers: dict[str, str]) -> bool:
    """A cookie-borne request that changes something must come from this service's own page."""
    origin = headers.get("origin")
    if origin is None:
        return True  # browsers send Origin on cross-site POSTs; its absence means a same-origin or non-browser client
    host = headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await _send(send, status, body, [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), *extra])
