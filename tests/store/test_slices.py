"""Slice vectors in the index: float16 beside the case vectors, listed and checked in the manifest,
through a commit and an open unchanged; indexes without them open as before; damage is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from store.small_stores import ENCODER, PREPROCESS, _rows, _store, _vectors

from medsearch.embedding import SliceSet
from medsearch.errors import IndexCorruptError
from medsearch.sharing import export_index
from medsearch.store import MANIFEST, IndexStore, SliceTable


def _sets(n: int, seed: int = 0) -> list[SliceSet | None]:
    rng = np.random.default_rng(seed)
    out: list[SliceSet | None] = []
    for i in range(n):
        if i % 4 == 3:
            out.append(None)  # a case without slices (a 3D encoder, tri-planar images)
            continue
        count = 1 + i % 5
        vectors = rng.normal(size=(count, 16)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out.append(SliceSet(vectors, np.arange(0, 3 * count, 3, dtype=np.int32), None if i % 2 else 2.5))
    return out


def test_slice_vectors_survive_a_commit_and_an_open(tmp_path):
    sets = _sets(12)
    store = IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(12), _rows(12), slices=sets)
    store.commit()
    manifest = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    assert {"slices", "slice_table"} <= set(manifest["files"])
    assert manifest["files"]["slices"]["bytes"] == 128 + 2 * 16 * sum(len(s) for s in sets if s is not None)
    loaded = IndexStore.open(tmp_path / "ix", verify=True)
    assert loaded.slices is not None and len(loaded.slices) == 12
    for row, expected in enumerate(sets):
        vectors, indices, gap = loaded.slices.case(row)
        if expected is None:
            assert len(vectors) == 0 and gap is None
            continue
        np.testing.assert_array_equal(vectors, expected.vectors.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(indices, expected.indices)
        assert gap == expected.gap_mm
    gathered = loaded.slices.gather([5, 3, 0])
    assert gathered.owner.tolist() == [0, 2]  # row 5 has one slice, row 3 none, row 0 one
    np.testing.assert_array_equal(gathered.vectors[:1], loaded.slices.case(5)[0])


def test_additions_with_and_without_slices_keep_rows_aligned(tmp_path):
    store = _store(tmp_path / "ix", n=5)  # five cases without slices: an index of an older medsearch
    store.commit()
    assert IndexStore.open(tmp_path / "ix").slices is None
    store.add(_vectors(3, seed=1), _rows(3, start=5), slices=_sets(3))
    store.add(_vectors(2, seed=2), _rows(2, start=8))  # again without
    store.add(_vectors(2, seed=3), _rows(2, start=0), slices=_sets(2))  # already there: skipped
    store.commit()
    loaded = IndexStore.open(tmp_path / "ix")
    assert loaded.slices is not None and len(loaded.slices) == len(loaded) == 10
    counts = np.diff(loaded.slices.offsets).tolist()
    assert counts == [0] * 5 + [1, 2, 3] + [0, 0]


def test_a_damaged_slice_file_is_refused(tmp_path):
    store = IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(4), _rows(4), slices=_sets(4))
    store.commit()
    name = store.manifest.files["slices"].name
    data = bytearray((tmp_path / "ix" / name).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "ix" / name).write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="does not match its checksum"):
        IndexStore.open(tmp_path / "ix", verify=True)


def test_slice_vectors_that_do_not_fit_the_cases_are_refused(tmp_path):
    table = SliceTable(16)
    table.add(_sets(3))
    with pytest.raises(ValueError, match="slice vectors must be"):
        table.add([SliceSet(np.zeros((2, 8), np.float32), np.arange(2, dtype=np.int32))])
    store = IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)
    with pytest.raises(ValueError, match="2 slice sets for 4 vectors"):
        store.add(_vectors(4), _rows(4), slices=_sets(2))


def test_an_export_keeps_the_slice_vectors(tmp_path):
    store = IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(6), _rows(6), slices=_sets(6))
    store.commit()
    export_index(tmp_path / "ix", tmp_path / "copy", k=1)
    copy = IndexStore.open(tmp_path / "copy", verify=True)
    assert copy.slices is not None
    np.testing.assert_array_equal(copy.slices.case(2)[0], IndexStore.open(tmp_path / "ix").slices.case(2)[0])


def _crop_sets(n: int, seed: int = 0) -> list[SliceSet | None]:
    """Crop sets: each slice of a case cut into four tiles (boxes on a 64 x 64 image)."""
    boxes = np.array([[0, 0, 43, 43], [21, 0, 64, 43], [0, 21, 43, 64], [21, 21, 64, 64]], np.int32)
    out: list[SliceSet | None] = []
    for item in _sets(n, seed):
        if item is None:
            out.append(None)
            continue
        rng = np.random.default_rng(len(item))
        vectors = rng.normal(size=(4 * len(item), 16)).astype(np.float32)
        out.append(SliceSet(vectors, np.repeat(item.indices, 4), item.gap_mm, np.tile(boxes, (len(item), 1))))
    return out


def test_crop_vectors_survive_a_commit_and_an_open_beside_the_slices(tmp_path):
    slices, crops = _sets(8), _crop_sets(8)
    store = IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(8), _rows(8), slices=slices, crops=crops)
    store.commit()
    manifest = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    assert {"slices", "slice_table", "crops", "crop_table"} <= set(manifest["files"])
    assert manifest["files"]["crops"]["name"].startswith("crops-")
    loaded = IndexStore.open(tmp_path / "ix", verify=True)
    assert loaded.crops is not None and loaded.crops.crops and not loaded.slices.crops
    assert loaded.crops.n_slices == 4 * loaded.slices.n_slices
    for row, expected in enumerate(crops):
        vectors, indices, gap = loaded.crops.case(row)
        if expected is None:
            assert len(vectors) == 0
            continue
        np.testing.assert_array_equal(vectors, expected.vectors.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(indices, expected.indices)
    found = loaded.crops.gather([2, 0])
    assert found.boxes is not None and found.boxes.shape == (len(found.owner), 4)
    np.testing.assert_array_equal(found.boxes[:4], crops[2].boxes[:4])
    # the slices and the tiles of the same candidates, merged: each candidate's rows in stack order
    merged = loaded.slices.gather([2, 0]).merged(found)
    assert np.all(np.diff(merged.owner) >= 0)
    for j in (0, 1):
        assert np.all(np.diff(merged.indices[merged.owner == j]) >= 0)
    assert int((merged.boxes[:, 0] < 0).sum()) == len(loaded.slices.gather([2, 0]).owner)  # whole slices: -1


def test_crop_vectors_need_their_boxes_and_damage_is_refused(tmp_path):
    table = SliceTable(16, crops=True)
    with pytest.raises(ValueError, match="one box"):
        table.add(_sets(2))  # slice sets without boxes
    store = IndexStore.create(tmp_path / "ix", dim=16, encoder=ENCODER, preprocess=PREPROCESS)
    store.add(_vectors(4), _rows(4), slices=_sets(4), crops=_crop_sets(4))
    store.commit()
    name = store.manifest.files["crop_table"].name
    data = bytearray((tmp_path / "ix" / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ix" / name).write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="checksum|crop"):
        IndexStore.open(tmp_path / "ix", verify=True)
