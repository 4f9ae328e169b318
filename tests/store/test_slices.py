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
