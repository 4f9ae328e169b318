"""Fixtures of the deid tests: no user key or environment reaches them, and two fixed keys."""

from __future__ import annotations

import pytest
from deid.headers import KEY_HEX, OTHER_KEY_HEX

from medsearch.deid import SiteKey


@pytest.fixture(autouse=True)
def _no_key_environment(monkeypatch, tmp_path):
    """Keep the user's real key and environment out of every test."""
    monkeypatch.delenv("MEDSEARCH_SITE_KEY", raising=False)
    monkeypatch.delenv("MEDSEARCH_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def key(tmp_path) -> SiteKey:
    path = tmp_path / "fixed.key"
    path.write_text(KEY_HEX + "\n")
    path.chmod(0o600)
    return SiteKey.load(path)


@pytest.fixture
def other_key(tmp_path) -> SiteKey:
    path = tmp_path / "other.key"
    path.write_text(OTHER_KEY_HEX)
    path.chmod(0o600)
    return SiteKey.load(path)
