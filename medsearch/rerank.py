"""Late-interaction re-ranking: candidates found by case vector, ordered by how their slices match.

A search in two stages. The faiss index of case vectors (one pooled vector per case) finds
candidates, :data:`DEFAULT_CANDIDATES` or ``10 * k`` of them; then each candidate's slice vectors
(:mod:`medsearch.store.slices`) are compared with the query's, and the candidates are ordered by a
late-interaction score, as ColBERT's MaxSim does for tokens: for each query slice the cosine to the
best-matching slice of the candidate, averaged over the query slices.

Anatomical order. Both stacks are in slice order along their normal (the order
:func:`~medsearch.io.load_volume` gives), so the query's slices may only match candidate slices in
the same order: query slice ``i + 1`` matches a candidate slice at or after the one slice ``i``
matched (a monotone alignment, found exactly by dynamic programming over the similarity table,
:func:`late_interaction`). Several query slices may share one candidate slice, so a query denser
than the index, or a thin slab against a thick series, aligns without penalty; what the order
forbids is a head slice of the query matching a pelvis slice of the candidate while its pelvis
slice matches the head. An alignment is chosen over a penalty on distance in mm because it needs
no scale (slice gaps and coverage differ between series, and are unknown for some) and gives the
plain MaxSim score whenever the best matches are already in order. ``ordered=False`` gives plain
MaxSim.

Each re-ranked result says where it matched: of the aligned pairs, the one of highest cosine
(:class:`SliceMatch`), as stack indices and, where the slice gap is known, positions in mm from the
first slice. A candidate without slice vectors (an index built before they were kept, a 3D encoder)
keeps its case-vector similarity as its score, and no location.

Boxes. A query of a box (``--roi``) compares each query crop with the candidate's whole slices and,
where the index keeps them (``crop_grid``), with the tiles of those slices: a candidate slice scores
the best of its own cosine and its tiles', and the match names the tile (``best_box``).

Layout. A slice vector is pooled over the whole image, so it says what a slice shows but little of
where: two series of one head on one grid look alike to it. Where the index keeps tiles, a query
of whole slices may bring the tiles of its own slices (``query_tiles``, see
:func:`~medsearch.embedding.in_layout`); a query slice and a candidate slice then score the mean of
their cosine and the cosines of their tiles at the same place of the grid (top left with top left,
and so on), every vector weighing the same. Measured on slabs cut from the series of
``../shared/data/dicom`` (docs/benchmarks/volumes.md, "Slabs in layout"), this finds the slab's own
series first far more often than slice vectors alone.

This module takes numpy arrays; it imports neither torch nor an encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsearch.store import CandidateSlices, SliceTable
from medsearch.store.half import to_float32

__all__ = ["DEFAULT_CANDIDATES", "LATE_DISTANCE_TEXT", "LAYOUT_DISTANCE_TEXT", "ON_BY_DEFAULT", "SliceMatch", "candidate_count", "gathered", "late_interaction", "location", "rerank_rows",
           "reorder_by_slices", "slice_matches"]

#: Candidates the case-vector index gives the re-ranking, at least (``10 * k`` when more).
DEFAULT_CANDIDATES = 100
#: Whether a whole-study query re-ranks when not told (region queries always do); chosen from the
#: measurements of docs/benchmarks/volumes.md.
ON_BY_DEFAULT = True
LATE_DISTANCE_TEXT = (
    "1 - late-interaction similarity: the mean over the query's slices of the cosine to the case slice "
    "it is aligned with, in anatomical order (lower is closer)"
)
LAYOUT_DISTANCE_TEXT = (
    "1 - late-interaction similarity in layout: the mean over the query's slices of the similarity to the "
    "case slice it is aligned with, in anatomical order, that similarity being the mean of the two slices' "
    "cosine and of their tiles' at the same places (lower is closer)"
)


@dataclass(frozen=True)
class SliceMatch:
    """How one candidate matched: ``score`` (the late-interaction similarity, at most 1), and its
    best aligned pair: ``query_slice`` and ``best_slice`` (stack indices) with their cosine; with
    crop vectors, ``best_box``: the tile of ``best_slice`` that matched (None: the whole slice)."""

    score: float
    query_slice: int
    best_slice: int
    slice_score: float
    best_box: tuple[int, int, int, int] | None = None  # the tile of best_slice it matched (crop vectors)


def candidate_count(k: int, total: int, candidates: int | None = None) -> int:
    """How many candidates to re-rank for ``k`` results out of ``total`` cases."""
    wanted = candidates if candidates is not None else max(DEFAULT_CANDIDATES, 10 * k)
    return max(1, min(total, max(wanted, k)))


def late_interaction(
    query: np.ndarray, query_indices: np.ndarray, found: CandidateSlices, *, ordered: bool = True,
    query_tiles: np.ndarray | None = None, tiles: CandidateSlices | None = None,
) -> list[SliceMatch | None]:
    """The late-interaction score of each candidate of ``found``; None for one without slices.

    Parameters
    ----------
    query
        ``(Q, dim)`` unit-length slice vectors of the query, in stack order.
    query_indices
        ``(Q,)`` their stack indices.
    found
        The candidates' slices (:meth:`~medsearch.store.SliceTable.gather`), each candidate's rows
        in stack order. Several rows of one stack slice (a slice and its tiles, crop vectors) count
        as one candidate slice, of the best of their cosines; the match then names its box.
    ordered
        Align in anatomical order (see the module docstring); False: plain MaxSim.
    query_tiles, tiles
        Match in layout (see the module docstring): the ``(Q, grid * grid, dim)`` tiles of the
        query's slices, and the candidates' tiles (their crop vectors, gathered as ``found``).
    """
    n = len(found.gaps)
    q = len(query)
    owner, rows_index = found.owner, found.indices
    if n == 0 or q == 0 or not len(owner):
        return [None] * n
    # one column per (candidate, stack slice): the rows of a slice (its tiles) share it
    new = np.ones(len(owner), dtype=bool)
    new[1:] = (owner[1:] != owner[:-1]) | (rows_index[1:] != rows_index[:-1])
    group = np.cumsum(new) - 1
    counts = np.bincount(owner[new], minlength=n)
    starts = np.cumsum(counts) - counts  # each candidate's first column, as a group number
    column = group - starts[owner]
    slice_of = rows_index[new]  # the stack index of each group
    width = int(counts.max())
    # both sides as the index stores slices (float16), each made unit length again: a slice compared
    # with its own stored copy then scores 1 to float32 rounding, as its case vector does
    # (the candidates' lengths divide the (T, Q) products, not the (T, dim) vectors: one pass less over them)
    vectors = np.asarray(found.vectors, dtype=np.float32)
    cosines = np.minimum((vectors @ _unit(_stored(query)).T) / _lengths(vectors)[:, None], 1.0)  # (T, Q)
    if query_tiles is not None and tiles is not None:
        cosines = _in_layout(found, cosines, query_tiles, tiles)
    # (n, width, Q) similarities, -inf where a candidate has fewer slices
    table = np.full((n, width, q), -np.inf, dtype=np.float32)
    if new.all():
        table[owner, column] = cosines
    else:
        np.maximum.at(table, (owner, column), cosines)
    if ordered and q > 1:
        total, pairs = _aligned(table)
    else:
        best = table.argmax(axis=1)  # (n, Q): each query slice's best candidate slice
        total = np.take_along_axis(table, best[:, None, :], axis=1)[:, 0, :].sum(axis=1)
        pairs = best
    # every candidate at once: the similarity of each aligned pair, and the best pair; ties (a study
    # against its own copy) go to the pair nearest the middle of the query
    every = np.arange(n)
    aligned = table[every[:, None], pairs, np.arange(q)[None, :]]  # (n, Q)
    tops = np.argmax(aligned - 1e-6 * np.abs(np.arange(q) - (q - 1) / 2), axis=1)
    groups = np.minimum(starts + pairs[every, tops], len(slice_of) - 1)  # the best pair's (candidate, slice) group
    scores, query_slices = (total.astype(np.float64) / q).tolist(), np.asarray(query_indices)[tops].tolist()
    best_slices, slice_scores = slice_of[groups].tolist(), aligned[every, tops].tolist()
    boxes = _boxes(found, cosines, group == groups[owner], tops) if found.boxes is not None else {}
    out: list[SliceMatch | None] = []
    for c in range(n):
        if counts[c] == 0:
            out.append(None)
            continue
        out.append(SliceMatch(scores[c], int(query_slices[c]), int(best_slices[c]), slice_scores[c], boxes.get(c)))
    return out


def _boxes(found: CandidateSlices, cosines: np.ndarray, best: np.ndarray, tops: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """candidate -> the box its best pair matched: among the rows of its best slice (``best``: the
    slice row and its tiles), the one closest to the pair's query slice (``tops``); the first on a
    tie. A candidate whose best row is the whole slice has no entry."""
    assert found.boxes is not None
    rows = np.flatnonzero(best)
    owners = found.owner[rows]
    order = np.lexsort((-cosines[rows, tops[owners]], owners))  # by candidate, then closest first (stable)
    rows, owners = rows[order], owners[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = owners[1:] != owners[:-1]
    return {int(c): (int(b[0]), int(b[1]), int(b[2]), int(b[3]))
            for c, b in zip(owners[first].tolist(), found.boxes[rows[first]]) if int(b[0]) >= 0}


def _in_layout(found: CandidateSlices, cosines: np.ndarray, query_tiles: np.ndarray, tiles: CandidateSlices) -> np.ndarray:
    """``cosines`` (candidate slice rows of ``found`` by query slices) averaged with the cosines of
    the tiles at the same place of the grid: the ``g``-th tile of a candidate slice (its ``g``-th
    row among ``tiles``, stored in grid order) with the ``g``-th of the query slice. A slice without
    tiles keeps its own cosine."""
    grid = int(query_tiles.shape[1])
    # the slice row of each tile row: both sorted by (candidate, stack index), a slice's tiles together
    span = int(max(found.indices.max(initial=0), tiles.indices.max(initial=0))) + 1
    keys = found.owner * span + found.indices
    tile_keys = tiles.owner * span + tiles.indices
    slot = np.minimum(np.searchsorted(keys, tile_keys), len(keys) - 1)
    steps = np.arange(len(tile_keys))
    new = np.ones(len(tile_keys), dtype=bool)
    new[1:] = tile_keys[1:] != tile_keys[:-1]
    place = steps - np.maximum.accumulate(np.where(new, steps, 0))  # the tile's place in its slice's grid
    keep = (keys[slot] == tile_keys) & (place < grid)
    total, count = cosines.copy(), np.ones(len(keys), dtype=np.float32)
    for g in range(grid):
        rows = np.flatnonzero(keep & (place == g))
        if not len(rows):
            continue
        vectors = to_float32(tiles.vectors[rows])
        total[slot[rows]] += np.minimum((vectors @ _unit(_stored(query_tiles[:, g])).T) / _lengths(vectors)[:, None], 1.0)
        count[slot[rows]] += 1
    out: np.ndarray = total / count[:, None]
    return out


def _stored(vectors: np.ndarray) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float32).astype(np.float16).astype(np.float32)


def _lengths(vectors: np.ndarray) -> np.ndarray:
    """Each row's length (at least 1e-12), float32 rows."""
    return np.maximum(np.sqrt(np.einsum("ij,ij->i", vectors, vectors)), 1e-12)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / _lengths(vectors)[:, None]


def _aligned(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best monotone alignment of each candidate: query slice ``i`` to candidate slice ``a[i]``
    with ``a`` non-decreasing, maximizing the summed similarity. Returns the sums ``(n,)`` and the
    alignments ``(n, Q)``.

    ``best[j]`` after query slice ``i``: the best sum of an alignment of slices ``0..i`` that puts
    ``i`` on candidate slice ``j``; it is the similarity of ``(i, j)`` plus the best of ``best``
    over ``j' <= j`` for ``i - 1`` (a running maximum), so every step is one vectorized pass.
    """
    n, width, q = table.shape
    ramp = np.arange(width, dtype=np.int32)
    steps = np.ascontiguousarray(np.moveaxis(table, 2, 0))  # (Q, n, width): each step's rows together
    back = np.empty((q, n, width), dtype=np.int32)  # where query slice i - 1 sat, for i on j
    best = steps[0]
    running = np.empty_like(best)
    marks = np.empty((n, width), dtype=np.int32)
    for i in range(1, q):
        # the running maximum of best over j' <= j, and the last j' that reaches it; the maximum is
        # best at that j', so it is also what query slice i adds to
        np.maximum.accumulate(best, axis=1, out=running)
        np.multiply(best == running, ramp, out=marks)
        np.maximum.accumulate(marks, axis=1, out=back[i])
        best = steps[i] + running
    end = best.argmax(axis=1)
    total = best[np.arange(n), end]
    pairs = np.empty((n, q), dtype=np.int64)
    pairs[:, q - 1] = end
    for i in range(q - 1, 0, -1):
        pairs[:, i - 1] = back[i][np.arange(n), pairs[:, i]]
    return total, pairs


def rerank_rows(
    table: SliceTable | None,
    query: np.ndarray,
    query_indices: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    distances: Sequence[float] | np.ndarray,
    *,
    ordered: bool = True,
    crops: SliceTable | None = None,
    query_tiles: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[SliceMatch | None]]:
    """Candidates (case-table ``rows`` with their case-vector ``distances``) re-ordered by late
    interaction, closest first: the rows, their distances (``1 - score``) and their matches.

    A candidate without slice vectors scores its case-vector similarity (``1 - distance`` for the
    cosine metric). Ties keep the case-vector order. ``crops`` and ``query_tiles``: as
    :func:`slice_matches`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float64)
    if table is None or not len(rows):
        return rows, distances, [None] * len(rows)
    matches = slice_matches(table, query, query_indices, rows, ordered=ordered, crops=crops, query_tiles=query_tiles)
    scores = np.array([m.score if m is not None else 1.0 - d for m, d in zip(matches, distances)])
    order = np.argsort(-scores, kind="stable")
    return rows[order], np.maximum(1.0 - scores[order], 0.0), [matches[i] for i in order]


def slice_matches(
    table: SliceTable, query: np.ndarray, query_indices: np.ndarray, rows: Sequence[int] | np.ndarray, *,
    ordered: bool = True, crops: SliceTable | None = None, query_tiles: np.ndarray | None = None,
) -> list[SliceMatch | None]:
    """:func:`late_interaction` of a query against the cases at ``rows``. ``crops``: the index's
    crop vectors, compared beside the slices: with ``query_tiles``, in layout (the query's slices
    are whole images, see the module docstring); without, as boxes (a query of boxes, ``--roi``)."""
    if crops is not None and query_tiles is not None:
        return late_interaction(query, query_indices, table.gather(rows), ordered=ordered, query_tiles=query_tiles,
                                tiles=crops.gather(rows, half=True))
    return late_interaction(query, query_indices, gathered(table, rows, crops), ordered=ordered)


def gathered(table: SliceTable, rows: Sequence[int] | np.ndarray, crops: SliceTable | None = None) -> CandidateSlices:
    """The slices of the cases at ``rows``, with their crop vectors when ``crops`` is given."""
    if crops is None:
        return table.gather(rows)
    found = table.gather(rows, half=True).merged(crops.gather(rows, half=True))  # merged as stored: half the bytes
    return dataclasses.replace(found, vectors=to_float32(found.vectors))


def reorder_by_slices(
    table: SliceTable, queries: Sequence[Any | None], *, candidates: int = DEFAULT_CANDIDATES, ordered: bool = True
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A second ranking stage for :func:`~medsearch.evaluate.scoring.evaluate_embeddings`: the first
    ``candidates`` rows found for query ``i`` re-ordered by late interaction with ``queries[i]``
    (a :class:`~medsearch.embedding.SliceSet`; None: left as found), the rest left as found."""

    def reorder(numbers: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = ids.copy()
        for r, number in enumerate(numbers.tolist()):
            query = queries[number]
            head = ids[r, :candidates]
            head = head[head >= 0]
            if query is None or not len(query.indices) or not len(head):
                continue
            found = late_interaction(query.vectors, query.indices, table.gather(head), ordered=ordered)
            scores = np.array([-np.inf if m is None else m.score for m in found])
            out[r, : len(head)] = head[np.argsort(-scores, kind="stable")]
        return out

    return reorder


def location(match: SliceMatch | None, *, query_gap: float | None, case_gap: float | None) -> dict[str, Any] | None:
    """A match's location as a result reports it (``best_slice``, ``best_slice_mm``, ``query_slice``,
    ``query_slice_mm``, ``slice_score``, and ``best_box`` where a tile matched: x0, y0, x1, y1 in
    pixels of the case's slice); positions in mm from the first slice, None when unknown."""
    if match is None:
        return None
    out: dict[str, Any] = {
        "best_slice": match.best_slice,
        "best_slice_mm": None if case_gap is None else round(match.best_slice * case_gap, 2),
        "query_slice": match.query_slice,
        "query_slice_mm": None if query_gap is None else round(match.query_slice * query_gap, 2),
        "slice_score": round(match.slice_score, 4),
    }
    if match.best_box is not None:
        out["best_box"] = list(match.best_box)
    return out
