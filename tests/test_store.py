from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pandas as pd
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws

from medsearch.errors import EncoderMismatchError, IndexCorruptError, IndexNotFoundError
from medsearch.store import MANIFEST, VERIFIED_CACHE, IndexStore

ENCODER = {"name": "test-encoder", "dim": 16, "weights_sha256": "ab" * 32}
PREPROCESS = {"size": 224, "slices": 5}


def _vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _rows(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"case_id": [f"c-{i:04d}" for i in range(start, start + n)], "modality": ["CT"] * n})


def _store(path, metric="cosine", n=50) -> IndexStore:
    store = IndexStore.create(path, dim=16, metric=metric, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(n), _rows(n))
    return store


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_matches_exact_faiss_and_survives_save_load(tmp_path, metric):
    data = _vectors(50)
    store = _store(tmp_path / "ix", metric, n=50)
    store.commit()
    loaded = IndexStore.open(tmp_path / "ix")
    queries = _vectors(7, seed=1)
    hits = loaded.search(queries, 10)

    # the exact reference, built independently
    if metric == "cosine":
        ref = faiss.IndexFlatIP(16)
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        ref.add(unit)
        sims, ref_ids = ref.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), 10)
        ref_dist = 1 - sims
    else:
        ref = faiss.IndexFlatL2(16)
        ref.add(data)
        sq, ref_ids = ref.search(queries, 10)
        ref_dist = np.sqrt(sq)
    check_ref_knn_with_draws(ref_dist, ref_ids, hits.distances, hits.ids)
    np.testing.assert_allclose(hits.distances, ref_dist, atol=1e-5)
    # before and after the round trip: identical
    np.testing.assert_array_equal(store.search(queries, 10).ids, hits.ids)
    pd.testing.assert_frame_equal(loaded.cases, store.cases)


def test_a_stored_vector_is_its_own_nearest_at_distance_zero(tmp_path):
    store = _store(tmp_path / "ix")
    hits = store.search(_vectors(50)[:5], 3)
    assert hits.ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(hits.distances[:, 0], 0.0, atol=1e-5)
    assert (np.diff(hits.distances, axis=1) >= 0).all()


def test_k_larger_than_the_index_returns_what_there_is(tmp_path):
    store = _store(tmp_path / "ix", n=3)
    assert store.search(_vectors(1), 10).ids.shape == (1, 3)


def test_adding_the_same_case_twice_keeps_one(tmp_path):
    store = _store(tmp_path / "ix", n=5)
    store.add(_vectors(5), _rows(5))
    store.add(_vectors(2, seed=3), _rows(2, start=5).assign(case_id=["c-0009", "c-0009"]))
    assert len(store) == 6 and len(store.cases) == 6


def test_commit_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ix"
    store = _store(path, n=5)
    store.commit()
    before = (path / MANIFEST).read_bytes()
    store.add(_vectors(3, seed=5), _rows(3, start=100))

    import medsearch.store as store_module

    real_write = store_module._write_file

    def crash_on_manifest(folder, name, data):
        if name == MANIFEST:
            raise KeyboardInterrupt("killed while writing")
        return real_write(folder, name, data)

    monkeypatch.setattr(store_module, "_write_file", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        store.commit()
    monkeypatch.undo()
    assert (path / MANIFEST).read_bytes() == before
    assert len(IndexStore.open(path)) == 5


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


def test_another_encoder_or_preprocessing_is_refused(tmp_path):
    store = _store(tmp_path / "ix")
    store.check_compatible(ENCODER, PREPROCESS)
    with pytest.raises(EncoderMismatchError, match="built with encoder test-encoder"):
        store.check_compatible({**ENCODER, "weights_sha256": "cd" * 32}, PREPROCESS)
    with pytest.raises(EncoderMismatchError, match="slices differ"):
        store.check_compatible(ENCODER, {**PREPROCESS, "slices": 9})


def test_bad_shapes_are_refused(tmp_path):
    store = _store(tmp_path / "ix", n=2)
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        store.add(np.zeros((2, 8), np.float32), _rows(2, start=9))
    with pytest.raises(ValueError, match="dimension 16"):
        store.search(np.zeros((1, 8), np.float32))
    with pytest.raises(FileExistsError):
        store.commit()
        IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)


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
    import medsearch.store as store_module

    names: list[str] = []
    real_check = store_module._check_digest

    def spy(path, entry, digest):
        names.append(path.name)
        return real_check(path, entry, digest)

    monkeypatch.setattr(store_module, "_check_digest", spy)
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
    import medsearch.store as store_module

    path = tmp_path / "ix"
    _store(path).commit()
    _age(path, seconds=3600)
    monkeypatch.setattr(store_module, "_RACY_NS", 7200 * 10**9)  # as if written a clock tick before the check
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
