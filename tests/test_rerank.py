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


def test_slices_in_layout_tell_apart_cases_whose_whole_slices_agree(anatomy):
    """Layout: a query slice and a case slice score the mean of their cosine and the cosines of their
    tiles at the same place of the grid. Two cases with the query's very slice vectors tie without
    it; the one whose tiles lie where the query's do comes first with it, even against a case that
    holds the same tiles in another order (the same content, another layout)."""
    rng, levels, query = anatomy
    grid = 4
    place = _unit(rng, 3 * grid).reshape(3, grid, DIM)  # the query's tiles: 3 slices x 4 places
    tiled = SliceSet(query.vectors, query.indices, query.gap_mm, tiles=place)
    boxes = np.tile(np.array([[0, 0, 40, 40], [20, 0, 60, 40], [0, 20, 40, 60], [20, 20, 60, 60]], np.int32), (3, 1))
    slices, crops = SliceTable(DIM), SliceTable(DIM, crops=True)
    slices.add([SliceSet(levels[1:4], np.arange(3, dtype=np.int32), 5.0)] * 3 + [SliceSet(levels[1:4], np.arange(3, dtype=np.int32), 5.0)])
    crops.add([
        SliceSet(_unit(rng, 3 * grid), np.repeat(np.arange(3, dtype=np.int32), grid), 5.0, boxes),  # 0: other tiles
        SliceSet(place[:, ::-1].reshape(-1, DIM).copy(), np.repeat(np.arange(3, dtype=np.int32), grid), 5.0, boxes),  # 1: mirrored
        SliceSet(_near(place.reshape(-1, DIM), rng, 0.05), np.repeat(np.arange(3, dtype=np.int32), grid), 5.0, boxes),  # 2: in place
        None,  # 3: no tiles: its slices alone
    ])
    rows = np.arange(4)
    plain = rerank_rows(slices, query.vectors, query.indices, rows, np.full(4, 0.5))[2]
    assert [m.score for m in plain] == pytest.approx([1.0] * 4, abs=1e-3)  # whole slices cannot tell them apart
    order, distances, matches = rerank_rows(slices, tiled.vectors, tiled.indices, rows, np.full(4, 0.5), crops=crops,
                                            query_tiles=tiled.tiles)
    tiled_order = [r for r in order.tolist() if r != 3]
    assert tiled_order == [2, 1, 0] or tiled_order == [2, 0, 1]
    by_row = dict(zip(order.tolist(), matches))
    assert by_row[3].score == pytest.approx(1.0, abs=1e-3)  # no tiles: its own cosine, unchanged
    assert by_row[2].score > 0.95 and by_row[2].score > by_row[1].score + 0.5 and by_row[2].score > by_row[0].score + 0.5
    # the mean of 1 + grid cosines: for case 1 the slices agree, the mirrored tiles do not
    cos = np.einsum("sgd,sgd->sg", place[:, ::-1], place)
    assert by_row[1].score == pytest.approx(float(np.mean((1 + cos.sum(axis=1)) / (1 + grid))), abs=2e-3)
    assert all(m.best_box is None for m in matches)  # a slice matched in layout names no tile
