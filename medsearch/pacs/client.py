"""A connection to a DICOMweb server: its URL, its credentials, bounded retries, errors a person can act on.

:class:`DicomWeb` wraps :class:`dicomweb_client.DICOMwebClient` (all HTTP goes through that
library). It reads credentials from the environment or from a file given by path
(:func:`read_credentials`), never from a value on the command line, where ``ps`` would show it to
every user of the machine; a URL that carries ``user:password@`` is refused for the same reason.

:meth:`DicomWeb.call` runs one request with bounded retries (exponential backoff on HTTP 408, 429
and 5xx, on timeouts and on refused connections) and turns what the library raises into
:class:`~medsearch.errors.DicomWebError` subclasses whose one-line messages name the server by
:attr:`DicomWeb.public_url` (credentials, query and fragment stripped) and never carry a UID: the
library's own exception text quotes the request URL, which holds Study and Series UIDs, so it is
never passed on. For the same reason the ``dicomweb_client`` and ``urllib3`` loggers are kept at
WARNING: at INFO and DEBUG they log those URLs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
from dicomweb_client import DICOMwebClient

from medsearch.errors import ConfigError, DicomWebAuthError, DicomWebError

__all__ = [
    "ENV_AUTH_FILE",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "Credentials",
    "DicomWeb",
    "RequestFailed",
    "is_dicomweb_url",
    "public_url",
    "read_credentials",
]

log = logging.getLogger(__name__)

ENV_TOKEN = "MEDSEARCH_DICOMWEB_TOKEN"
ENV_USER = "MEDSEARCH_DICOMWEB_USER"
ENV_PASSWORD = "MEDSEARCH_DICOMWEB_PASSWORD"
ENV_AUTH_FILE = "MEDSEARCH_DICOMWEB_AUTH_FILE"
_ASK_FOR_CREDENTIALS = (
    f"set {ENV_TOKEN} (a bearer token), or {ENV_USER} and {ENV_PASSWORD}, or give --dicomweb-auth-file PATH "
    f"(or {ENV_AUTH_FILE}) to a file holding 'Bearer TOKEN' or 'USER:PASSWORD'"
)
# Worth another try: the server is busy or briefly failing (a gateway, a restarting archive).
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


def is_dicomweb_url(value: object) -> bool:
    """Whether an archive argument is a DICOMweb URL (``http://`` or ``https://``) rather than a path."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def public_url(url: str) -> str:
    """``url`` as it may be shown: without ``user:password@``, query or fragment, and without a trailing slash."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials for a DICOMweb server, and where they were read (for messages; never the values).

    ``kind`` is ``"none"``, ``"bearer"`` (``secret`` is the token) or ``"basic"`` (``user`` and
    ``secret``). The values never appear in ``repr``.
    """

    kind: str = "none"
    user: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    source: str = ""

    def apply(self, session: requests.Session) -> None:
        if self.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.secret}"
        elif self.kind == "basic":
            session.auth = (self.user, self.secret)


def read_credentials(auth_file: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> Credentials:
    """The credentials for a DICOMweb server: from ``auth_file``, else from the environment, else none.

    Looked for in this order: ``auth_file``; ``MEDSEARCH_DICOMWEB_TOKEN`` (a bearer token);
    ``MEDSEARCH_DICOMWEB_USER`` with ``MEDSEARCH_DICOMWEB_PASSWORD`` (HTTP basic);
    ``MEDSEARCH_DICOMWEB_AUTH_FILE``. A file holds one line, ``Bearer TOKEN`` or ``USER:PASSWORD``.

    Raises
    ------
    ConfigError
        The file cannot be read or holds neither form, or a user is set without a password.
    """
    env = os.environ if environ is None else environ
    if auth_file is None and not env.get(ENV_TOKEN) and not env.get(ENV_USER) and env.get(ENV_AUTH_FILE):
        auth_file = env[ENV_AUTH_FILE]
    if auth_file is not None:
        return _credentials_file(Path(auth_file).expanduser())
    if env.get(ENV_TOKEN):
        return Credentials("bearer", secret=env[ENV_TOKEN].strip(), source=ENV_TOKEN)
    if env.get(ENV_USER):
        if ENV_PASSWORD not in env:
            raise ConfigError(f"{ENV_USER} is set but {ENV_PASSWORD} is not; set both (or use {ENV_TOKEN})")
        return Credentials("basic", user=env[ENV_USER], secret=env[ENV_PASSWORD], source=f"{ENV_USER} and {ENV_PASSWORD}")
    return Credentials()


def _credentials_file(path: Path) -> Credentials:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the DICOMweb credentials file {path}: {getattr(e, 'strerror', None) or type(e).__name__}; check the path and its permissions") from None
    first = lines[0] if lines else ""
    source = f"the file {path}"
    if first.lower().startswith("bearer "):
        return Credentials("bearer", secret=first[7:].strip(), source=source)
    user, colon, password = first.partition(":")
    if colon and user:
        return Credentials("basic", user=user, secret=password, source=source)
    # the message never quotes the line: it is a secret
    raise ConfigError(f"the DICOMweb credentials file {path} must hold one line, 'Bearer TOKEN' or 'USER:PASSWORD'")


class RequestFailed(DicomWebError):
    """One request failed for good (after the retries): ``status`` is the HTTP status, or None (a bad answer)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class DicomWeb:
    """A DICOMweb server: ``DicomWeb("http://127.0.0.1:8042/dicom-web")``.

    Parameters
    ----------
    url
        The DICOMweb root (the prefix before ``/studies``). It must not carry credentials.
    auth_file
        A file with the credentials (see :func:`read_credentials`); default: from the environment.
    credentials
        Credentials already read (instead of ``auth_file`` and the environment).
    timeout
        Seconds to connect, and to wait for each piece of an answer.
    attempts, backoff
        Tries per request, and the first wait between them in seconds (doubled after each retry).

    Raises
    ------
    ConfigError
        The URL is not http(s), carries credentials, or the credentials file is unusable.
    """

    def __init__(
        self,
        url: str,
        *,
        auth_file: str | Path | None = None,
        credentials: Credentials | None = None,
        timeout: tuple[float, float] = (5.0, 120.0),
        attempts: int = 3,
        backoff: float = 0.5,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{public_url(url)} is not a DICOMweb URL; give one like http://127.0.0.1:8042/dicom-web")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"the DICOMweb URL {public_url(url)} carries credentials, which every user of this machine can read "
                f"on a command line; remove them from the URL and {_ASK_FOR_CREDENTIALS}"
            )
        self.public_url = public_url(url)
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))
        self.credentials = credentials if credentials is not None else read_credentials(auth_file)
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._local = threading.local()
        _quiet_url_loggers()

    def __repr__(self) -> str:
        return f"DicomWeb({self.public_url!r}, credentials={self.credentials.kind})"

    @property
    def client(self) -> DICOMwebClient:
        """This thread's client (a requests session is not meant to be shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            session = requests.Session()
            # No gzip: pixel data hardly compresses, and compressing it costs the server (Orthanc does
            # by default) and this process far more CPU than the bytes saved on a hospital network.
            session.headers["Accept-Encoding"] = "identity"
            self.credentials.apply(session)
            client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
            client.set_http_retry_params(retry=False)  # retries are ours (call): bounded, with our messages
            self._local.client = client
        return client

    def call(self, what: str, request: Callable[[DICOMwebClient], T]) -> T:
        """Run ``request(client)`` with bounded retries; ``what`` names it in messages ("a series", "the search").

        Raises
        ------
        DicomWebAuthError
            HTTP 401 or 403.
        RequestFailed
            Another HTTP error (after the retries, for those worth retrying), or an answer that cannot be read.
        DicomWebError
            The server cannot be reached, or did not answer in time, after the retries.
        """
        wait = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return request(self.client)
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status in (401, 403):
                    raise self._auth_error(status) from None
                if status not in _RETRY_STATUS or attempt == self.attempts:
                    raise RequestFailed(
                        f"the DICOMweb server at {self.public_url} answered HTTP {status} to {what}", status
                    ) from None
                reason = f"HTTP {status}"
            except requests.Timeout:
                if attempt == self.attempts:
                    raise DicomWebError(
                        f"the DICOMweb server at {self.public_url} did not answer {what} within {self.timeout[1]:.0f} s "
                        f"({self.attempts} tries); check that it runs and is not overloaded, then run again"
                    ) from None
                reason = "timeout"
            except requests.ConnectionError as e:
                if attempt == self.attempts:
                    raise DicomWebError(
                        f"cannot reach the DICOMweb server at {self.public_url} ({_connection_reason(e)}); check that it "
                        "runs and that the URL is its DICOMweb root (e.g. http://127.0.0.1:8042/dicom-web), then run again"
                    ) from None
                reason = "connection failed"
            except (ValueError, KeyError) as e:  # a malformed answer (multipart, JSON, DICOM)
                raise RequestFailed(
                    f"the DICOMweb server at {self.public_url} sent an answer to {what} that cannot be read ({type(e).__name__})",
                    None,
                ) from None
            log.info("DICOMweb request to %s failed (%s); trying again in %.1f s", self.public_url, reason, wait)
            time.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _auth_error(self, status: int) -> DicomWebAuthError:
        said = "401 Unauthorized" if status == 401 else "403 Forbidden"
        if self.credentials.kind == "none":
            hint = f"it needs credentials: {_ASK_FOR_CREDENTIALS}"
        else:
            hint = f"check the credentials read from {self.credentials.source}"
        return DicomWebAuthError(f"the DICOMweb server at {self.public_url} refused the request ({said}); {hint}")


def _connection_reason(error: requests.ConnectionError) -> str:
    """A short reason without the request URL (which would quote UIDs)."""
    text = repr(error.args[0]) if error.args else ""
    for needle, reason in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                           ("Temporary failure in name resolution", "unknown host"), ("timed out", "timed out"),
                           ("RemoteDisconnected", "it closed the connection"), ("Connection reset", "connection reset"),
                           ("Network is unreachable", "network unreachable")):
        if needle in text:
            return reason
    return "connection failed"


def _quiet_url_loggers() -> None:
    """Keep the HTTP libraries' loggers at WARNING where nobody set them: at INFO and DEBUG they log request
    URLs, which hold Study and Series UIDs."""
    for name in ("dicomweb_client", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)

