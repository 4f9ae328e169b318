"""Late-interaction re-ranking: the order on constructed cases, the monotone alignment against a brute
force over every alignment, the best-matching pair, candidates without slices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medsearch.embedding import SliceSet
from medsearch.rerank import _aligned as aligned
from medsearch.rerank import late_interaction, location, rerank_rows
from medsearch.store import SliceTable

DIM = 32


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _near(v: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    w = v + noise * rng.normal(size=v.shape).astype(np.float32)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.fixture()
def anatomy():
    """Five 'anatomical levels' (head to feet) as unit vectors, and a query of levels 1 to 3."""
    rng = np.random.default_rng(0)
    levels = _unit(rng, 5)
    return rng, levels, SliceSet(levels[1:4], np.array([10, 11, 12], np.int32), 5.0)


def test_candidates_are_ordered_by_how_their_slices_match(anatomy):
    rng, levels, query = anatomy
    table = SliceTable(DIM)
    table.add([
        SliceSet(_near(levels, rng, 0.08), np.arange(5, dtype=np.int32) * 2, 5.0),  # 0: the same anatomy, noisy
        SliceSet(levels[::-1].copy(), np.arange(5, dtype=np.int32), 5.0),  # 1: exact slices, upside down
        SliceSet(_unit(rng, 6), np.arange(6, dtype=np.int32), 5.0),  # 2: unrelated
        SliceSet(levels[[1, 2, 3]], np.array([0, 1, 2], np.int32), None),  # 3: exactly the query's levels
    ])
    rows = np.arange(4)
    plain = late_interaction(query.vectors, query.indices, table.gather(rows), ordered=False)
    ordered = late_interaction(query.vectors, query.indices, table.gather(rows))
    # MaxSim alone cannot tell the upside-down case from the right one; the anatomical order can
    assert plain[1].score == pytest.approx(1.0, abs=1e-3) and plain[3].score == pytest.approx(1.0, abs=1e-3)
    assert ordered[3].score == pytest.approx(1.0, abs=1e-3) and ordered[1].score < 0.75
    assert ordered[0].score > ordered[1].score > ordered[2].score
    # where case 0 matched: query slice 10..12 on its levels 1..3, stored at stack slices 2..6
    assert ordered[0].best_slice - 2 * (ordered[0].query_slice - 9) == 0
    order, distances, matches = rerank_rows(table, query.vectors, query.indices, rows, np.full(4, 0.5))
    assert order.tolist() == [3, 0, 1, 2]
    assert distances[0] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(distances) >= 0)
    assert location(matches[1], query_gap=5.0, case_gap=5.0)["best_slice_mm"] == matches[1].best_slice * 5.0


def test_a_candidate_without_slices_keeps_its_case_vector_score(anatomy):
    _, levels, query = anatomy
    table = SliceTable(DIM)
    table.add([None, SliceSet(levels, np.arange(5, dtype=np.int32), 2.0)])
    order, distances, matches = rerank_rows(table, query.vectors, query.indices, np.array([0, 1]), np.array([0.1, 0.3]))
    assert order.tolist() == [1, 0] and matches[1] is None and distances[1] == pytest.approx(0.1)
    assert location(None, query_gap=None, case_gap=None) is None


def test_no_slice_table_leaves_the_case_vector_order(anatomy):
    _, _, query = anatomy
    rows, distances, matches = rerank_rows(None, query.vectors, query.indices, [4, 2], [0.1, 0.2])
    assert rows.tolist() == [4, 2] and matches == [None, None]


@pytest.mark.parametrize("seed", range(6))
def test_the_alignment_is_the_best_monotone_one(seed):
    rng = np.random.default_rng(seed)
    q, n_slices = 4, [5, 3, 1]
    width = max(n_slices)
    table = np.full((len(n_slices), width, q), -np.inf, np.float32)
    for c, s in enumerate(n_slices):
        table[c, :s] = rng.uniform(-1, 1, size=(s, q))
    totals, pairs = aligned(table)
    for c, s in enumerate(n_slices):
        # brute force: every non-decreasing assignment of the q query slices to s candidate slices
        best = max(sum(table[c, j, i] for i, j in enumerate(a)) for a in itertools.combinations_with_replacement(range(s), q))
        assert totals[c] == pytest.approx(best, abs=1e-5)
        assert np.all(np.diff(pairs[c]) >= 0) and pairs[c].max() < s
        assert sum(table[c, j, i] for i, j in enumerate(pairs[c])) == pytest.approx(best, abs=1e-5)


def test_a_box_query_matches_the_tile_that_holds_it(anatomy):
    """Crop vectors: a candidate slice scores the best of its own cosine and its tiles', and the
    match names the tile; a candidate without tiles is compared by its whole slices."""
    rng, levels, _ = anatomy
    tiles = _unit(rng, 4)  # what the four tiles of a slice show
    query = SliceSet(_near(tiles[2:3], rng, 0.05), np.array([7], np.int32), 5.0, cropped=True)
    boxes = np.array([[0, 0, 40, 40], [20, 0, 60, 40], [0, 20, 40, 60], [20, 20, 60, 60]], np.int32)
    slices, crops = SliceTable(DIM), SliceTable(DIM, crops=True)
    slices.add([SliceSet(levels[:3], np.arange(3, dtype=np.int32), 5.0)] * 2)
    # case 0: tile 2 of its slice 1 shows the box; case 1: unrelated tiles; both share the same whole slices
    crops.add([
        SliceSet(np.concatenate([_unit(rng, 4), tiles, _unit(rng, 4)]), np.repeat(np.arange(3, dtype=np.int32), 4), 5.0,
                 np.tile(boxes, (3, 1))),
        SliceSet(_unit(rng, 12), np.repeat(np.arange(3, dtype=np.int32), 4), 5.0, np.tile(boxes, (3, 1))),
    ])
    rows, _, matches = rerank_rows(slices, query.vectors, query.indices, [1, 0], [0.2, 0.3], crops=crops)
    assert rows.tolist() == [0, 1]
    assert matches[0].best_slice == 1 and matches[0].best_box == (0, 20, 40, 60) and matches[0].score > 0.95
    assert location(matches[0], query_gap=5.0, case_gap=5.0)["best_box"] == [0, 20, 40, 60]
    # without the tiles the same query compares whole slices only: no box, and no such match
    _, _, plain = rerank_rows(slices, query.vectors, query.indices, [1, 0], [0.2, 0.3])
    assert plain[0].best_box is None and plain[0].score < 0.6
    assert "best_box" not in location(plain[0], query_gap=5.0, case_gap=5.0)
