"""The audit log: one JSON line per query, as hospitals require.

Each line says when, who, from where, what was asked and which cases came back::

    {"time": "2025-01-31T14:02:11Z", "user": "dr-lee", "client": "10.1.2.3", "via": "page",
     "k": 10, "filters": ["modality=CT", "age>=60"], "options": {"exclude_same_patient": true},
     "status": 200, "cases": ["c-7e998b94dbff693a", "c-7462cac2022c436d", ...]}

``cases`` are the pseudonymous case ids returned, in rank order. The log holds no file name, no
UID and nothing read from an upload: a filter value that looks like a name, a date, a UID or an
e-mail address (:func:`~medsearch.deid.vocabulary.looks_identifying`) is written as ``(withheld)``.
A query that fails is logged too, with its HTTP status and no cases. A region query adds its slab
and box under ``options`` (``"region": {"slices": [40, 60], "roi": [x0, y0, x1, y1]}``: slice and
pixel numbers; a malformed region, refused, is written as ``(malformed)``, not as sent).

The page's endpoints record their queries themselves; :class:`AuditedQueries` (an ASGI middleware)
records those of the JSON API (``POST /query``) from the request's parameters and the answer's case
ids, before the answer leaves.

Lines are appended with one ``write`` each to a file opened ``O_APPEND`` and created owner-only
(``0600``), and flushed to disk, so a crash loses no line already answered and concurrent writers
never interleave. ``medsearch serve`` writes ``INDEX/local/audit.jsonl`` unless ``--audit-log`` names
another file (``INDEX/local/`` is site-only and never exported).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from medsearch.deid.vocabulary import looks_identifying
from medsearch.embedding import Region
from medsearch.errors import ConfigError
from medsearch.filters import Filter

__all__ = ["AUDIT_FILE", "AuditLog", "AuditedQueries"]

log = logging.getLogger(__name__)

#: Where ``medsearch serve`` keeps the audit log of an index by default (relative to the index).
AUDIT_FILE = "local/audit.jsonl"
_WITHHELD = "(withheld)"
_MAX_ANSWER = 16 * 2**20  # bytes of an answer read for its case ids (k <= 1000 results take far less)
_FLAGS = ("exclude_same_patient", "one_per_patient", "collapse_copies")


class AuditLog:
    """An append-only JSON-lines file of queries.

    Raises
    ------
    ConfigError
        The file cannot be created or opened for appending (checked when the log is made, so that a
        service never starts without its audit log).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as e:
            raise ConfigError(
                f"the audit log {self.path} cannot be written ({e.strerror or type(e).__name__}); "
                "give --audit-log FILE in a folder this user may write"
            ) from e
        self._lock = threading.Lock()

    def record(
        self,
        *,
        user: str,
        client: str,
        via: str,
        k: int,
        filters: Sequence[Filter | str] = (),
        options: Mapping[str, Any] | None = None,
        cases: Iterable[str] = (),
        status: int = 200,
    ) -> dict[str, Any]:
        """Append one query's line; returns the record written.

        Raises
        ------
        OSError
            The line cannot be written (a full disk): the caller must not answer the query then.
        """
        entry = {
            "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "user": user,
            "client": client,
            "via": via,
            "k": int(k),
            "filters": [_safe_filter(f) for f in filters],
            "options": dict(options or {}),
            "status": int(status),
            "cases": [str(c) for c in cases],
        }
        line = (json.dumps(entry, separators=(", ", ": "), default=str) + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, line)
            if written != len(line):  # a regular file takes the whole line, or the disk is full
                raise OSError(f"the audit log {self.path} took {written} of {len(line)} bytes")
            os.fsync(self._fd)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_filter(item: Filter | str) -> str:
    """A filter as text, its value withheld when it looks like it could identify someone."""
    if isinstance(item, Filter):
        if looks_identifying(item.value, capitalized_names=True):
            return f"{item.field}{item.op.value}{_WITHHELD}"
        return str(item)
    text = str(item)
    return _WITHHELD if looks_identifying(text, capitalized_names=True) else text


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AuditedQueries:
    """ASGI middleware: records each ``POST`` to ``paths`` (the JSON API's ``/query``) in the audit log.

    The answer is held until its line is written: ``k``, ``where`` and the option flags come from
    the request's query string, the case ids from the answer's JSON, the user from
    ``scope["state"]["user"]`` (set by :class:`~medsearch.web.auth.AuthGate`). When the line cannot be
    written, the client gets a 503 instead of the answer.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, audit: AuditLog,
                 paths: Sequence[str] = ("/query",)) -> None:
        self.app = app
        self.audit = audit
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        held: list[Message] = []
        body = bytearray()

        async def hold(message: Message) -> None:
            held.append(message)
            if message["type"] == "http.response.body":
                if len(body) < _MAX_ANSWER:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._release(scope, held, bytes(body), send)

        await self.app(scope, receive, hold)

    async def _release(self, scope: Scope, held: list[Message], body: bytes, send: Send) -> None:
        start = next((m for m in held if m["type"] == "http.response.start"), {"status": 500})
        status = int(start.get("status", 500))
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        cases: list[str] = []
        if status == 200:
            try:
                cases = [str(r["case_id"]) for r in json.loads(body)["results"]]
            except (ValueError, KeyError, TypeError):
                cases = []
        try:
            k = int(params.get("k", ["10"])[0])
        except ValueError:
            k = 0
        state = scope.get("state", {})
        client = scope.get("client")
        options: dict[str, Any] = {f: v[0].lower() in ("1", "true", "yes", "on") for f in _FLAGS if (v := params.get(f))}
        if "slices" in params or "roi" in params:  # a region query: its slab and box, as pixel and slice numbers
            try:
                region = Region.parse(slices=params.get("slices", [None])[0], roi=params.get("roi", [None])[0])
                options["region"] = region.to_dict() if region is not None else None
            except ConfigError:
                options["region"] = "(malformed)"  # refused with a 422; its text is not written
        try:
            self.audit.record(
                user=str(state.get("user") or "anonymous"), client=str(client[0]) if client else "unknown", via="api",
                k=k, filters=params.get("where", []), options=options, status=status, cases=cases,
            )
        except OSError as e:
            log.error("the audit log %s cannot be written: %s", self.audit.path, e.strerror or type(e).__name__)
            refusal = json.dumps({"error": "this query cannot be recorded in the audit log, so it is not answered; "
                                           "tell the person who runs this service"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(refusal)).encode())]})
            await send({"type": "http.response.body", "body": refusal})
            return
        for message in held:
            await send(message)
