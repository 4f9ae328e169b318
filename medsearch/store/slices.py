"""The slice vectors of an index: every case's per-slice embeddings, kept beside its case vector.

A 2D encoder embeds several axial slices of a case and pools them into the one case vector the faiss
index holds; the slice vectors themselves are what late-interaction re-ranking compares
(:mod:`medsearch.rerank`) and what says *where* two cases match. They are stored compactly, in
case-table order, as two data files of each generation (:mod:`medsearch.store.files`):

    slices-<gen>.npy       (T, dim) float16: the slice vectors of all cases, one after the other,
                           memory-mapped (2 * dim bytes per slice: 2.5 KiB at dim 1280)
    slicetab-<gen>.npz     offsets (n + 1,) int64: case i owns rows offsets[i]:offsets[i + 1];
                           indices (T,) int32: which slice of its stack each row embeds;
                           gaps (n,) float32: the case's slice gap in mm (NaN: unknown)

Both are listed in the manifest with their size and SHA-256 and written atomically as part of a
commit, like every data file; an index built before slice vectors existed has neither, and a case
added without them (a 3D encoder, tri-planar images) owns no rows.

An index built with ``crop_grid`` (``[index]``) keeps a second table of the same kind, the *crop
vectors*: each kept slice cut into overlapping tiles, each tile embedded as an image of its own,
which region queries with a box (``--roi``) compare. Its files are ``crops-<gen>.npy`` and
``croptab-<gen>.npz``, whose table holds one more array, ``boxes`` (T, 4) int32: each row's tile as
x0, y0, x1, y1 in pixels of the stored image (x1, y1 excluded). Its rows are in slice order, the
tiles of one slice together. float16 keeps a cosine to about
1e-3 of its float32 value: well below the gaps between neighbouring candidates that re-ranking
orders.

This module takes numpy arrays; it never imports torch or an encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medsearch.errors import IndexCorruptError
from medsearch.store.files import (
    FileEntry,
    VerifiedFiles,
    check_file,
    generation_file,
    read_checked,
    write_file,
    write_raw,
)
from medsearch.store.half import to_float32

__all__ = ["CandidateSlices", "SliceTable", "SlicesLike"]

_DTYPE = np.float16


class SlicesLike(Protocol):
    """What :meth:`SliceTable.add` takes per case (e.g. :class:`medsearch.embedding.SliceSet`)."""

    @property
    def vectors(self) -> np.ndarray: ...

    @property
    def indices(self) -> np.ndarray: ...

    @property
    def gap_mm(self) -> float | None: ...

    @property
    def boxes(self) -> np.ndarray | None: ...


@dataclass(frozen=True)
class CandidateSlices:
    """The slice vectors of some cases, gathered for re-ranking: ``vectors[owner == j]`` are the
    slices of the ``j``-th case asked for, at stack ``indices``; ``gaps[j]`` its slice gap (NaN: unknown).
    ``boxes``, for crop vectors: each row's tile (x0, y0, x1, y1); a row of ``-1`` is a whole slice."""

    vectors: np.ndarray  # (T, dim) float32 (float16, as stored, when gathered with ``half``)
    owner: np.ndarray  # (T,) int64, non-decreasing
    indices: np.ndarray  # (T,) int32
    gaps: np.ndarray  # (n,) float32
    boxes: np.ndarray | None = None  # (T, 4) int32

    def merged(self, other: CandidateSlices) -> CandidateSlices:
        """The rows of both (of the same candidates, e.g. slices and crops), each candidate's rows
        together in stack order; rows without a box get ``-1``."""
        def boxes(found: CandidateSlices) -> np.ndarray:
            return found.boxes if found.boxes is not None else np.full((len(found.owner), 4), -1, np.int32)

        owner = np.concatenate([self.owner, other.owner])
        indices = np.concatenate([self.indices, other.indices])
        order = np.lexsort((indices, owner))
        place = np.empty_like(order)  # where each row of self, then of other, goes: one copy of the vectors
        place[order] = np.arange(len(order))
        vectors = np.empty((len(order), self.vectors.shape[1]), np.result_type(self.vectors, other.vectors))
        vectors[place[: len(self.owner)]] = self.vectors
        vectors[place[len(self.owner):]] = other.vectors
        return CandidateSlices(vectors, owner[order], indices[order], self.gaps, np.concatenate([boxes(self), boxes(other)])[order])


class SliceTable:
    """The slice vectors of every case of an index, in case-table order (see the module docstring);
    with ``crops``, the crop vectors, each row with its box."""

    def __init__(self, dim: int, vectors: np.ndarray | None = None, offsets: np.ndarray | None = None,
                 indices: np.ndarray | None = None, gaps: np.ndarray | None = None, *, crops: bool = False,
                 boxes: np.ndarray | None = None) -> None:
        self.dim = int(dim)
        self.crops = crops
        self._parts: list[np.ndarray] = [vectors] if vectors is not None and len(vectors) else []
        self._offsets = [np.asarray(offsets if offsets is not None else [0], dtype=np.int64)]
        self._indices = [np.asarray(indices if indices is not None else [], dtype=np.int32)]
        self._gaps = [np.asarray(gaps if gaps is not None else [], dtype=np.float32)]
        self._boxes = [np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.int32).reshape(-1, 4)]

    # -- contents ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of cases (with or without slices)."""
        return sum(len(g) for g in self._gaps)

    @property
    def n_slices(self) -> int:
        return int(self.offsets[-1])

    @property
    def offsets(self) -> np.ndarray:
        if len(self._offsets) > 1:
            self._offsets = [np.concatenate(self._offsets)]
        return self._offsets[0]

    @property
    def indices(self) -> np.ndarray:
        if len(self._indices) > 1:
            self._indices = [np.concatenate(self._indices)]
        return self._indices[0]

    @property
    def gaps(self) -> np.ndarray:
        if len(self._gaps) > 1:
            self._gaps = [np.concatenate(self._gaps)]
        return self._gaps[0]

    @property
    def boxes(self) -> np.ndarray:
        """(T, 4) int32: each row's box (crop vectors; empty for slice vectors)."""
        if len(self._boxes) > 1:
            self._boxes = [np.concatenate(self._boxes)]
        return self._boxes[0]

    def _vectors(self) -> np.ndarray:
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        return self._parts[0] if self._parts else np.zeros((0, self.dim), _DTYPE)

    def case(self, row: int) -> tuple[np.ndarray, np.ndarray, float | None]:
        """The slice vectors (float32), stack indices and slice gap (None: unknown) of case-table ``row``."""
        offsets = self.offsets
        start, stop = int(offsets[row]), int(offsets[row + 1])
        gap = float(self.gaps[row])
        return (to_float32(self._vectors()[start:stop]), self.indices[start:stop].copy(),
                gap if np.isfinite(gap) else None)

    def gather(self, rows: Sequence[int] | np.ndarray, *, half: bool = False) -> CandidateSlices:
        """The slices of the cases at ``rows`` (case-table rows), as one float32 array for re-ranking
        (``half``: float16, as stored, to widen later with :func:`~medsearch.store.half.to_float32`)."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = self.offsets
        starts, stops = offsets[rows], offsets[rows + 1]
        counts = stops - starts
        total = int(counts.sum())
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        # every row's position in the stored array, without a Python loop over slices
        take = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        vectors = self._vectors()[take] if total else np.zeros((0, self.dim), _DTYPE)
        vectors = np.asarray(vectors) if half else to_float32(vectors)
        return CandidateSlices(vectors, owner, self.indices[take], self.gaps[rows], self.boxes[take] if self.crops else None)

    # -- adding -------------------------------------------------------------------------------------

    def add(self, sets: Sequence[SlicesLike | None]) -> None:
        """Append one entry per new case: its slice set (crop set, for crop vectors), or None for a
        case without.

        Raises
        ------
        ValueError
            A set of another dimension, whose indices and vectors differ in number, or (crop
            vectors) without one box per row.
        """
        counts, gaps, vectors, indices, boxes = [], [], [], [], []
        for item in sets:
            if item is None or not len(item.indices):
                counts.append(0)
                gaps.append(np.nan)
                continue
            v = np.asarray(item.vectors)
            if v.ndim != 2 or v.shape[1] != self.dim or len(v) != len(item.indices):
                raise ValueError(f"slice vectors must be (S, {self.dim}) with one index each, got {v.shape} for {len(item.indices)} indices")
            if self.crops:
                box = np.asarray(item.boxes if item.boxes is not None else (), dtype=np.int32)
                if box.shape != (len(v), 4):
                    raise ValueError(f"crop vectors need one box (x0, y0, x1, y1) per row, got {box.shape} for {len(v)} rows")
                boxes.append(box)
            vectors.append(v.astype(_DTYPE))
            indices.append(np.asarray(item.indices, dtype=np.int32))
            counts.append(len(v))
            gaps.append(np.nan if item.gap_mm is None else float(item.gap_mm))
        if not sets:
            return
        last = int(self.offsets[-1])
        self._offsets.append(last + np.cumsum(np.asarray(counts, dtype=np.int64)))
        self._gaps.append(np.asarray(gaps, dtype=np.float32))
        if vectors:
            self._parts.append(np.concatenate(vectors))
            self._indices.append(np.concatenate(indices))
        if boxes:
            self._boxes.append(np.concatenate(boxes))

    def add_empty(self, n: int) -> None:
        """Append ``n`` cases without slices."""
        self.add([None] * n)

    # -- files --------------------------------------------------------------------------------------

    @staticmethod
    def roles(crops: bool) -> tuple[str, str]:
        """The manifest roles of the two files: slice vectors, or crop vectors."""
        return ("crops", "crop_table") if crops else ("slices", "slice_table")

    def write(self, folder: Path, generation: int) -> dict[str, FileEntry]:
        """Write both files of ``generation`` atomically; their manifest entries by role."""
        role, table_role = self.roles(self.crops)
        name = generation_file(role, generation)
        vectors = self._vectors()
        entry = write_raw(folder, name, [vectors], rows=len(vectors), dim=self.dim, dtype=_DTYPE)
        self._parts = [np.load(folder / name, mmap_mode="r")] if len(vectors) else []
        buffer = BytesIO()
        arrays: dict[str, np.ndarray] = {"offsets": self.offsets, "indices": self.indices, "gaps": self.gaps}
        if self.crops:
            arrays["boxes"] = self.boxes
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        table = write_file(folder, generation_file(table_role, generation), buffer.getvalue())
        return {role: entry, table_role: table}

    @classmethod
    def open(cls, folder: Path, files: dict[str, FileEntry], *, cases: int, dim: int, verified: VerifiedFiles,
             full: bool, crops: bool = False) -> SliceTable | None:
        """The slice vectors (``crops``: crop vectors) an index folder lists, checked against the
        manifest; None where it lists none.

        Raises
        ------
        IndexCorruptError
            A file is missing, of another size or checksum, or does not fit the case table.
        """
        role, table_role = cls.roles(crops)
        what = "crop-vector" if crops else "slice-vector"
        if role not in files and table_role not in files:
            return None
        if role not in files or table_role not in files:
            raise IndexCorruptError(f"{folder}: the manifest lists only one of the two {what} files; rebuild the index")
        table = read_checked(folder, files[table_role], verified, full=full)
        path = check_file(folder, files[role], verified, full=full)
        try:
            with np.load(BytesIO(table), allow_pickle=False) as data:
                offsets, indices, gaps = data["offsets"], data["indices"], data["gaps"]
                boxes = data["boxes"] if crops else None
            empty = not len(offsets) or int(offsets[-1]) == 0  # (an empty array cannot be memory-mapped)
            vectors: Any = np.load(path, mmap_mode=None if empty else "r", allow_pickle=False)
        except (OSError, ValueError, KeyError) as e:
            raise IndexCorruptError(f"{folder}: the {what} files are unreadable; rebuild the index") from e
        total = int(offsets[-1]) if len(offsets) else -1
        if (len(offsets) != cases + 1 or len(gaps) != cases or len(indices) != total or vectors.dtype != _DTYPE
                or vectors.shape != (total, dim) or np.any(np.diff(offsets) < 0)
                or (boxes is not None and boxes.shape != (total, 4))):
            raise IndexCorruptError(
                f"{folder}: the {what}s do not fit the index ({cases} cases of dimension {dim}); rebuild the index"
            )
        return cls(dim, vectors, offsets, indices, gaps, crops=crops, boxes=boxes)

    def nbytes(self) -> int:
        """Bytes the slice vectors take on disk (their table included, roughly)."""
        return int(self.n_slices * self.dim * 2 + self.n_slices * (20 if self.crops else 4) + len(self) * 12)
