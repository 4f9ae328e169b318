"""Tests of medsearch.deid.keys: the site key, its file, and the keyed pseudonyms it makes."""

from __future__ import annotations

import re
import stat

import pytest
from deid.headers import KEY_HEX

from medsearch.deid import SiteKey, case_id
from medsearch.errors import KeyFileError

# --------------------------------------------------------------------------------------------
# The site key
# --------------------------------------------------------------------------------------------


def test_create_writes_private_key_and_reload_agrees(tmp_path):
    path = tmp_path / "keys" / "site.key"
    created = SiteKey.load(path, create=True)
    assert created.created and created.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["site.key"]  # no temporary file left

    again = SiteKey.load(path, create=True)
    assert not again.created
    assert case_id(again, "1.2.3", "1.2.3.4") == case_id(created, "1.2.3", "1.2.3.4")
    assert again.check_value() == created.check_value()


def test_default_path_follows_xdg_config_home(tmp_path, monkeypatch):
    created = SiteKey.load(create=True)
    assert created.path == tmp_path / "xdg" / "medsearch" / "site.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    home_key = SiteKey.load(create=True)
    assert home_key.path == tmp_path / "home" / ".config" / "medsearch" / "site.key"
    assert home_key.check_value() != created.check_value()


def test_key_file_environment_variable(tmp_path, monkeypatch, key):
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", str(tmp_path / "fixed.key"))
    loaded = SiteKey.load()
    assert loaded.path == tmp_path / "fixed.key"
    assert loaded.check_value() == key.check_value()


def test_site_key_environment_variable(monkeypatch, key):
    monkeypatch.setenv("MEDSEARCH_SITE_KEY", KEY_HEX)
    monkeypatch.setenv("MEDSEARCH_KEY_FILE", "/nonexistent/never-read.key")
    loaded = SiteKey.load()
    assert loaded.path is None and not loaded.created
    assert case_id(loaded, "1.2.3", "1.2.3.4") == case_id(key, "1.2.3", "1.2.3.4")
    assert "from environment" in repr(loaded)


def test_same_key_same_ids_other_key_other_ids(key, other_key, tmp_path):
    same = SiteKey.load(tmp_path / "fixed.key")
    assert case_id(key, "1.2.3", "1.2.3.4") == case_id(same, "1.2.3", "1.2.3.4")
    assert case_id(key, "1.2.3", "1.2.3.4") != case_id(other_key, "1.2.3", "1.2.3.4")
    assert key.check_value() != other_key.check_value()


@pytest.mark.parametrize(
    ("content", "setup"),
    [
        (None, "missing"),
        ("not a key\n", "file"),
        ("abcd" * 8, "file"),  # 16 bytes: too short
        ("5e" * 31 + "5", "file"),  # odd number of digits
        ("zz" * 32, "file"),
        ("", "file"),
        ("\xff\xfe", "binary"),
        (None, "directory"),
    ],
)
def test_bad_key_files_raise(tmp_path, content, setup):
    path = tmp_path / "site.key"
    if setup == "file":
        path.write_text(content)
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00")
    elif setup == "directory":
        path.mkdir()
    message = {
        "missing": r"site\.key does not exist; point MEDSEARCH_KEY_FILE .* create=True",
        "file": r"site\.key is not a hex key of at least 32 bytes; restore the original",
        "binary": r"site\.key is not a hex key",
        "directory": r"Cannot read site key file .*site\.key",
    }[setup]
    with pytest.raises(KeyFileError, match=message):
        SiteKey.load(path)
    if setup == "file":
        assert path.read_text() == content  # never replaced by a new key


def test_missing_default_key_names_the_path(tmp_path):
    with pytest.raises(
        KeyFileError, match=re.escape(str(tmp_path / "xdg" / "medsearch" / "site.key"))
    ):
        SiteKey.load()


@pytest.mark.parametrize("value", ["abcd", "not hex at all", "5e" * 31])
def test_bad_environment_key_raises(monkeypatch, value):
    monkeypatch.setenv("MEDSEARCH_SITE_KEY", value)
    with pytest.raises(
        KeyFileError, match="MEDSEARCH_SITE_KEY is not a hex key of at least 32 bytes"
    ) as info:
        SiteKey.load()
    assert value not in str(info.value)


def test_create_in_unwritable_place_raises(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match=r"Cannot create site key file .*a-file/site\.key"):
        SiteKey.load(blocker / "site.key", create=True)


def test_key_is_never_printed(tmp_path, key):
    created = SiteKey.load(tmp_path / "new.key", create=True)
    secret = (tmp_path / "new.key").read_text().strip()
    for k, hex_key in ((created, secret), (key, KEY_HEX)):
        for text in (repr(k), str(k), f"{k}", repr([k])):
            assert hex_key not in text and hex_key.upper() not in text
            assert hex_key[:16] not in text
        assert k.check_value() in repr(k)
    assert repr(key) == f"SiteKey(path={str(tmp_path / 'fixed.key')!r}, check={key.check_value()})"


def test_pseudonym_format_and_encoding(key):
    assert re.fullmatch(r"c-[0-9a-f]{16}", key.pseudonym("1.2", "3.4", kind="case"))
    assert re.fullmatch(r"p-[0-9a-f]{16}", key.pseudonym("x", kind="patient"))
    assert re.fullmatch(r"[0-9a-f]{16}", key.check_value())
    # The encoding is unambiguous: moving a boundary or the kind changes the result.
    assert key.pseudonym("ab", "c", kind="case") != key.pseudonym("a", "bc", kind="case")
    assert key.pseudonym("a", "", kind="case") != key.pseudonym("a", kind="case")
    assert key.pseudonym("a", kind="case")[2:] != key.pseudonym("a", kind="cases")[2:]


@pytest.mark.parametrize(
    ("parts", "kind", "error", "message"),
    [
        (("a",), "", ValueError, "lowercase identifier"),
        (("a",), "Case", ValueError, "lowercase identifier"),
        (("a",), "case id", ValueError, "lowercase identifier"),
        ((None,), "case", TypeError, "must be str, got NoneType"),
        ((b"1.2",), "case", TypeError, "must be str, got bytes"),
    ],
)
def test_pseudonym_rejects_bad_input(key, parts, kind, error, message):
    with pytest.raises(error, match=message):
        key.pseudonym(*parts, kind=kind)


def test_date_offsets_are_keyed_bounded_and_never_zero(key, other_key):
    offsets = [key.date_offset_days(f"p-{i:016x}") for i in range(2000)]
    assert all(-365 <= d <= 365 and d != 0 for d in offsets)
    assert min(offsets) < -300 and max(offsets) > 300  # spread over the range
    assert offsets == [key.date_offset_days(f"p-{i:016x}") for i in range(2000)]
    assert offsets != [other_key.date_offset_days(f"p-{i:016x}") for i in range(2000)]
