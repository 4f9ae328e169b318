"""A small loopback HTTP proxy in front of a real Orthanc, to make one thing go wrong on purpose.

Every request is passed to the server behind it and its answer passed back, except where a rule
says otherwise: ``fail_series`` answers HTTP 500 to the retrieval of the series whose UID it
names (a series retrieval is the request for the whole series or for its metadata), ``hold_after`` makes every series retrieval after the first N wait until :attr:`release`
is set, and ``on_retrieve`` is called before each series retrieval (it may stop the server).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

_RETRIEVE = re.compile(r"/studies/[^/?]+/series/([^/?]+)(?:/metadata)?/?$")  # a series, or its metadata
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class Proxy:
    def __init__(self, upstream: str, *, fail_series: str | None = None, hold_after: int | None = None,
                 on_retrieve: Callable[[int], None] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_series = fail_series
        self.hold_after = hold_after
        self.on_retrieve = on_retrieve
        self.retrievals = 0
        self.held = threading.Event()  # set once a retrieval is waiting
        self.release = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                path = self.path
                match = _RETRIEVE.search(path.split("?", 1)[0])
                if match:
                    with proxy._lock:
                        proxy.retrievals += 1
                        number = proxy.retrievals
                    if proxy.on_retrieve is not None:
                        proxy.on_retrieve(number)
                    if proxy.fail_series is not None and match.group(1) == proxy.fail_series:
                        self._answer(500, b"failing on purpose", "text/plain")
                        return
                    if proxy.hold_after is not None and number > proxy.hold_after:
                        proxy.held.set()
                        proxy.release.wait(60)
                try:
                    answer = requests.get(proxy.upstream + path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                                          timeout=30)
                except requests.RequestException:  # the server is gone: so is the connection, as without a proxy
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._answer(answer.status_code, answer.content, answer.headers.get("Content-Type", "application/octet-stream"))

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:  # a client that hung up: quiet
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, suffix: str = "/dicom-web") -> str:
        return f"http://127.0.0.1:{self.port}{suffix}"

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
