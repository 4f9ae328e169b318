"""The on-disk format: the manifest, generations of data files, checksums and the verified-files cache."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from store.small_stores import _rows, _store, _vectors

from medsearch.config import IndexType, Metric
from medsearch.errors import IndexCorruptError, IndexNotFoundError
from medsearch.store import MANIFEST, VERIFIED_CACHE, FileEntry, IndexSection, IndexStore, Manifest, read_manifest
from medsearch.store.files import generation_file


def test_old_generations_are_cleaned_up(tmp_path):
    store = _store(tmp_path / "ix", n=2)
    for i in range(4):
        store.add(_vectors(1, seed=10 + i), _rows(1, start=10 + i))
        store.commit()
    assert len(list((tmp_path / "ix").glob("vectors-*.faiss"))) == 2
    assert len(IndexStore.open(tmp_path / "ix")) == 6


def test_truncated_or_altered_files_are_detected(tmp_path):
    path = tmp_path / "ix"
    _store(path).commit()
    manifest = json.loads((path / MANIFEST).read_text())
    vectors = path / manifest["files"]["vectors"]["name"]
    data = vectors.read_bytes()
    vectors.write_bytes(data[:-100])
    with pytest.raises(IndexCorruptError, match=r"vectors-000001\.faiss has .* bytes.*truncated"):
        IndexStore.open(path)
    vectors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndexCorruptError, match="checksum"):
        IndexStore.open(path)
    vectors.unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        IndexStore.open(path)


BAD_DIRS = [
    ("missing", None, IndexNotFoundError, "does not exist"),
    ("empty", "", IndexNotFoundError, "is not a medsearch index"),
    ("garbage", "{not json", IndexCorruptError, "not readable JSON"),
    ("other", '{"format": "something-else"}', IndexCorruptError, "not a medsearch manifest"),
    ("future", '{"format": "medsearch-index", "format_version": 99}', IndexCorruptError, "format version 99"),
]


@pytest.mark.parametrize(("name", "manifest", "error", "message"), BAD_DIRS)
def test_a_directory_that_is_not_an_index(tmp_path, name, manifest, error, message):
    path = tmp_path / name
    if manifest is not None:
        path.mkdir()
        if manifest:
            (path / MANIFEST).write_text(manifest)
    with pytest.raises(error, match=message):
        IndexStore.open(path)


# -- checksums at open: sizes always, SHA-256 unless this machine verified the file as it is ------------------

def _age(path, seconds=3600):
    """Date the data files back, as files written long ago (a fresh write is not trusted at once)."""
    manifest = json.loads((path / MANIFEST).read_text())
    for entry in manifest["files"].values():
        old = (path / entry["name"]).stat().st_mtime_ns - seconds * 10**9
        os.utime(path / entry["name"], ns=(old, old))
    return manifest


@pytest.fixture
def hashed(monkeypatch):
    """The names of the data files hashed from disk or memory during a test."""
    from medsearch.store import files as files_module

    names: list[str] = []
    real_check = files_module._check_digest

    def spy(path, entry, digest):
        names.append(path.name)
        return real_check(path, entry, digest)

    monkeypatch.setattr(files_module, "_check_digest", spy)
    return names


def test_an_unchanged_index_is_hashed_once(tmp_path, hashed):
    path = tmp_path / "ix"
    _store(path).commit()
    manifest = _age(path)
    IndexStore.open(path)
    assert sorted(hashed) == sorted(e["name"] for e in manifest["files"].values())
    hashed.clear()
    IndexStore.open(path)
    assert hashed == []
    IndexStore.open(path, verify=True)  # verify: hashed regardless
    assert sorted(hashed) == sorted(e["name"] for e in manifest["files"].values())


def test_a_file_checked_soon_after_its_last_write_is_hashed_again(tmp_path, hashed, monkeypatch):
    from medsearch.store import files as files_module

    path = tmp_path / "ix"
    _store(path).commit()
    _age(path, seconds=3600)
    monkeypatch.setattr(files_module, "_RACY_NS", 7200 * 10**9)  # as if written a clock tick before the check
    IndexStore.open(path)
    IndexStore.open(path)
    assert len(hashed) == 4  # vectors and cases, twice: a write in the same tick could keep the time


def test_a_same_size_change_is_caught_when_the_file_time_changes(tmp_path):
    path = tmp_path / "ix"
    _store(path).commit()
    manifest = _age(path)
    IndexStore.open(path)  # verified and remembered
    vectors = path / manifest["files"]["vectors"]["name"]
    data = vectors.read_bytes()
    vectors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    stamp = vectors.stat().st_mtime_ns - 1800 * 10**9  # an old time, but not the remembered one
    os.utime(vectors, ns=(stamp, stamp))
    with pytest.raises(IndexCorruptError, match=r"vectors-000001\.faiss does not match its checksum"):
        IndexStore.open(path)


def test_a_truncated_file_is_caught_even_when_verified_before(tmp_path, hashed):
    path = tmp_path / "ix"
    _store(path).commit()
    manifest = _age(path)
    IndexStore.open(path)
    cases = path / manifest["files"]["cases"]["name"]
    stat = cases.stat()
    with open(cases, "r+b") as f:
        f.truncate(stat.st_size - 10)
    os.utime(cases, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old time back
    with pytest.raises(IndexCorruptError, match=r"cases-000001\.csv has .* bytes.*truncated"):
        IndexStore.open(path)


def test_the_verified_cache_is_owner_only_and_holds_no_identifying_data(tmp_path):
    path = tmp_path / "ix"
    _store(path).commit()
    manifest = _age(path)
    IndexStore.open(path)
    cache = path / VERIFIED_CACHE
    assert cache.stat().st_mode & 0o077 == 0
    text = cache.read_text()
    data = json.loads(text)
    names = {e["name"] for e in manifest["files"].values()}
    assert set(data["files"]) == names
    for entry in data["files"].values():
        assert set(entry) == {"size", "mtime_ns", "ctime_ns", "inode", "sha256", "checked_ns"}
    assert str(tmp_path) not in text and "c-0000" not in text and "CT" not in text


def test_a_copied_folder_is_hashed_again(tmp_path, hashed):
    import shutil

    path = tmp_path / "ix"
    _store(path).commit()
    _age(path)
    IndexStore.open(path)
    shutil.copytree(path, tmp_path / "copy")  # keeps the times and the cache, not the inodes
    hashed.clear()
    IndexStore.open(tmp_path / "copy")
    assert len(hashed) == 2


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other"}', b'{"format": "medsearch-verified-files", "version": 1, "files": 3}'])
def test_a_damaged_cache_is_ignored(tmp_path, hashed, content):
    path = tmp_path / "ix"
    _store(path).commit()
    _age(path)
    (path / VERIFIED_CACHE).write_bytes(content)
    assert len(IndexStore.open(path)) == 50
    assert len(hashed) == 2
    assert json.loads((path / VERIFIED_CACHE).read_text())["format"] == "medsearch-verified-files"


# -- the manifest as a typed object: the same JSON in and out ------------------------------------------------


def test_a_committed_manifest_reads_and_writes_back_byte_for_byte(tmp_path):
    path = tmp_path / "ix"
    store = _store(path)
    store.manifest.config = {"encoder": {"name": "test-encoder", "checkpoint": ""}}
    store.commit(info={"last_run": {"index_dir": str(path), "n_files": 50}, "site_note": [1, "two"]})
    text = (path / MANIFEST).read_text()
    manifest = read_manifest(path)
    assert manifest.to_json() == text
    assert Manifest.from_dict(json.loads(text)).to_dict() == json.loads(text)
    assert manifest.generation == 1 and manifest.dim == 16 and manifest.metric is Metric.COSINE
    data = (path / "vectors-000001.faiss").read_bytes()
    assert manifest.files["vectors"] == FileEntry(name="vectors-000001.faiss", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert manifest.last_run == {"index_dir": str(path), "n_files": 50} and manifest.extra == {"site_note": [1, "two"]}
    assert manifest.index == IndexSection(requested=IndexType.FLAT, kind=IndexType.FLAT)  # flat from the start: never rebuilt


def test_the_sample_index_manifest_round_trips(sample_index):
    text = (sample_index / MANIFEST).read_text()
    manifest = read_manifest(sample_index)
    assert manifest.to_json() == text
    assert manifest.config and manifest.last_run and manifest.label_columns


REQUIRED = ["dim", "metric", "distance", "encoder", "preprocess", "key_check", "generation", "counts", "label_columns", "files"]


@pytest.mark.parametrize("field", REQUIRED)
def test_a_manifest_missing_a_field_says_to_rebuild(tmp_path, field):
    path = tmp_path / "ix"
    _store(path).commit()
    data = json.loads((path / MANIFEST).read_text())
    del data[field]
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexCorruptError, match=rf"manifest\.json lacks the field\(s\) {field}; .*rebuild the index"):
        read_manifest(path)
    with pytest.raises(IndexCorruptError, match="rebuild the index"):
        IndexStore.open(path)


MALFORMED = [
    ({"format": "medsearch-annotations"}, "is not a medsearch manifest; rebuild the index"),
    ({"format_version": 2}, "has format version 2, this medsearch reads 1; rebuild the index with this version"),
    ({"dim": "16"}, r"malformed 'dim' field \(str, not int\); rebuild the index"),
    ({"generation": True}, r"malformed 'generation' field \(bool, not int\); rebuild the index"),
    ({"metric": "manhattan"}, "names an unknown metric 'manhattan'; rebuild the index"),
    ({"files": {"vectors": {"name": "vectors-000001.faiss", "bytes": 10}}}, "malformed 'files' field; rebuild the index"),
    ({"files": {"vectors": {"name": "v", "bytes": "10", "sha256": "ab"}}}, "malformed 'files' field; rebuild the index"),
    ({"index": {"type": "annoy"}}, "names an unknown index type; rebuild the index"),
    ({"index": {"type": "flat", "built_for": "many"}}, "malformed 'index' field; rebuild the index"),
    ({"last_run": "yesterday"}, r"malformed 'last_run' field \(str, not dict\); rebuild the index"),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_a_malformed_manifest_says_what_is_wrong(tmp_path, change, message):
    path = tmp_path / "ix"
    _store(path).commit()
    data = {**json.loads((path / MANIFEST).read_text()), **change}
    with pytest.raises(IndexCorruptError, match=message):
        Manifest.from_dict(data, source=path / MANIFEST)
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(IndexCorruptError, match=message):
        IndexStore.open(path)


def test_a_manifest_without_an_index_section_is_a_flat_index(tmp_path):
    # manifests written before index types had no "index" section: such an index is flat
    path = tmp_path / "ix"
    _store(path).commit()
    data = json.loads((path / MANIFEST).read_text())
    del data["index"]
    (path / MANIFEST).write_text(json.dumps(data))
    store = IndexStore.open(path)
    assert store.index_type is IndexType.FLAT and len(store) == 50


def test_info_may_not_replace_what_the_store_records(tmp_path):
    store = _store(tmp_path / "ix")
    with pytest.raises(ValueError, match="info may not replace the manifest's own field"):
        store.commit(info={"files": {}})
    assert not (tmp_path / "ix").exists()  # refused before anything is written


def test_generation_file_names():
    assert [generation_file(role, 3) for role in ("vectors", "cases", "thumbnails", "raw")] == [
        "vectors-000003.faiss", "cases-000003.csv", "thumbs-000003.npy", "raw-000003.npy"
    ]
