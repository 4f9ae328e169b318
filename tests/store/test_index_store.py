"""IndexStore: search against an exact reference, save and load, additions, commits, refusals."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws
from store.small_stores import ENCODER, PREPROCESS, _rows, _store, _vectors

from medsearch.errors import EncoderMismatchError
from medsearch.store import MANIFEST, IndexStore


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

    from medsearch.store import files as files_module

    real_write = files_module.write_bytes

    def crash_on_manifest(path, data, **kwargs):
        if path.name == MANIFEST:
            raise KeyboardInterrupt("killed while writing")
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(files_module, "write_bytes", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        store.commit()
    monkeypatch.undo()
    assert (path / MANIFEST).read_bytes() == before
    assert len(IndexStore.open(path)) == 5


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


def test_config_and_label_columns_are_recorded_through_the_store_and_kept_at_commit(tmp_path):
    store = _store(tmp_path / "ix", "cosine", n=5)
    assert store.add_label_columns(["modality"]) is True
    assert store.add_label_columns(["modality"]) is False  # nothing new: nothing to commit
    assert store.add_label_columns(["Age", "modality"]) is True
    store.record_config({"index": {"index_type": "flat"}})
    store.commit()
    reopened = IndexStore.open(tmp_path / "ix")
    assert reopened.manifest.label_columns == ["modality"]  # a column the case table lacks is not kept
    assert reopened.manifest.config == {"index": {"index_type": "flat"}}
