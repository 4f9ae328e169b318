"""Fixtures of the PACS tests: a real Orthanc (tests/pacs/orthanc.py) holding the shipped sample, and a site key."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pacs.orthanc import Orthanc
from pacs.studies import sample_files

from medsearch.deid import SiteKey


@pytest.fixture
def orthanc(tmp_path) -> Iterator[Orthanc]:
    """A fresh Orthanc holding the shipped sample, for a test that stores more in it."""
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(sample_files())
        yield server
    finally:
        server.stop(fast=True)


@pytest.fixture(scope="session")
def sample_orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """One Orthanc holding the shipped sample, for the tests that only read from it."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        server.upload(sample_files())
        yield server
    finally:
        server.stop(fast=True)


@pytest.fixture
def key(tmp_path) -> SiteKey:
    return SiteKey.load(tmp_path / "keys" / "site.key", create=True)
