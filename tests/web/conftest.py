"""Fixtures of the page's tests: the sample index's searcher (with its site key), and Chromium driven
by Playwright.

Browser tests need Debian's ``chromium`` and the ``playwright`` package (``scripts/setup.sh test``
installs both) and a private network namespace (``scripts/test.sh`` runs pytest in one, so that the
browser reaches nothing but the loopback server). Outside CI a test skips when one is missing; with
``CI`` set it fails, so that CI never passes without running them.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from medsearch.search import Searcher

CHROMIUM = os.environ.get("MEDSEARCH_CHROMIUM", "/usr/bin/chromium")
# Chromium flags: no sandbox (tests run as root in CI), and no reaching out for updates, metrics or names.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="session")
def page_searcher(sample_index, sample_key) -> Searcher:
    return Searcher(sample_index, key=sample_key)


# -- the browser ---------------------------------------------------------------------------------------


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests: run scripts/setup.sh test, then scripts/test.sh")
    pytest.skip(reason)


def _isolated() -> bool:
    """Whether this process is in a network namespace with the loopback interface only."""
    try:
        return {name for _, name in socket.if_nameindex()} == {"lo"}
    except OSError:
        return False


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """A headless Chromium (Debian's), launched by Playwright, in a loopback-only network namespace."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (scripts/setup.sh test installs it)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _missing(f"chromium is not installed at {CHROMIUM} (scripts/setup.sh test installs it with apt-get)")
    if not _isolated():
        _missing("the browser tests run in a loopback-only network namespace: run them with scripts/test.sh")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def open_page(chromium) -> Iterator[Callable[..., object]]:
    """Open a page of a live server (1280 x 800 unless told); every request it makes is recorded in ``page.requests``."""
    contexts = []

    def opener(url: str, *, width: int = 1280, height: int = 800) -> object:
        context = chromium.new_context(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
        contexts.append(context)
        page = context.new_page()
        page.requests = []
        page.problems = []
        page.on("request", lambda request: page.requests.append(request.url))
        page.on("pageerror", lambda error: page.problems.append(str(error)))
        page.goto(url)
        return page

    yield opener
    for context in contexts:
        context.close()
