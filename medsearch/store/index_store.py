"""IndexStore: a faiss index of case embeddings and its case table, opened, searched and committed.

An :class:`IndexStore` is loaded in memory; :meth:`IndexStore.add` appends cases,
:meth:`IndexStore.search` answers queries, and :meth:`IndexStore.commit` writes a new generation of
the index directory and then switches its manifest to it atomically (the format:
:mod:`medsearch.store.files`). A reader therefore always sees a complete old or new state, and a
run killed mid-write leaves the previous index intact. The faiss index streams to its file
(``faiss.write_index``), and loads from it (``faiss.read_index``), so neither holds a second copy
of the index in memory.

Opening an index checks every data file's size against the manifest, always, and its SHA-256 when
the file is not known to be verified: :class:`~medsearch.store.files.VerifiedFiles` remembers files
whose checksum matched, by size, modification and change time and inode, so that a query on an
unchanged index of millions of cases does not read gigabytes to hash them. A file written or
replaced since (even with the same size) is hashed again. ``IndexStore.open(path, verify=True)``
(``medsearch info --verify``) hashes every file regardless, which also catches damage that left
the file's times alone (a failing disk).

Distances: for the ``cosine`` metric the store keeps L2-normalized vectors in an inner-product index
and reports ``distance = 1 - cosine similarity``; for ``l2`` it reports the Euclidean distance. In
both, lower is closer and an identical vector has distance 0.

Index types (``index.index_type``, see :mod:`medsearch.store.faiss_index`): the store converts the
index when the collection crosses a threshold (at :meth:`IndexStore.add` or :meth:`IndexStore.commit`),
rebuilding it from the exact vectors, which it always keeps: a flat or HNSW index holds them itself;
an ivfpq index keeps them beside its codes in ``raw-<gen>.npy``, memory-mapped (4 * dim bytes per
case on disk, read only for re-ranking, filtered searches over few cases, :meth:`IndexStore.vectors`
and rebuilds). Every type keeps the metric's meaning. An ivfpq index re-ranks its candidates with the
exact vectors, so its distances are exact too; with ``rerank = 0`` they come from the compressed
codes (off by a few hundredths). An ``ivfpq-disk`` index is an ivfpq index whose commits write its
lists and float16 exact vectors to files that :meth:`open` memory-maps (:mod:`medsearch.store.ondisk`).

Metadata filters (``where=["modality=CT", "age>=60"]``, see :mod:`medsearch.filters`) become a
faiss ID selector, so the ``k`` nearest *matching* cases come back whenever ``k`` cases match.

This module takes float32 arrays; it never imports torch or an encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from medsearch.config import Config, IndexConfig, IndexType, Metric, parse_enum
from medsearch.errors import EncoderMismatchError, IndexCorruptError
from medsearch.filters import Filter, filter_mask, parse_filters
from medsearch.store import faiss_index as fx
from medsearch.store import ondisk
from medsearch.store.files import (
    MANIFEST,
    FileEntry,
    Manifest,
    VerifiedFiles,
    check_file,
    drop_old_generations,
    generation_file,
    open_raw,
    read_checked,
    read_manifest,
    write_file,
    write_file_by,
    write_manifest,
    write_raw,
)
from medsearch.store.slices import SlicesLike, SliceTable

__all__ = ["IndexStore", "SearchHits"]

log = logging.getLogger(__name__)

_ADD_CHUNK = 65_536
_MASKS_CACHED = 16
_DEFAULTS = IndexConfig()
_PREPROCESS_DEFAULTS = Config().to_dict()["preprocess"]
_renorm_l2 = faiss.fvec_renorm_L2
_swig_ptr = faiss.swig_ptr


@dataclass(frozen=True)
class SearchHits:
    """Nearest cases for each query row: ``ids`` are row numbers of the case table (-1 = none)."""

    distances: np.ndarray  # (Q, k) float32, lower is closer
    ids: np.ndarray  # (Q, k) int64


class IndexStore:
    """A faiss index and its case table, loaded in memory; :meth:`commit` writes them back atomically."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        index: faiss.Index,
        cases: pd.DataFrame,
        thumbnails: np.ndarray | None = None,
        raw: np.ndarray | None = None,
        slices: SliceTable | None = None,
        crops: SliceTable | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.cases = cases
        # (n, T, T) uint8 aligned with the case table, or None when the index keeps no thumbnails
        self.thumbnails = thumbnails
        # the slice vectors of each case (medsearch.store.slices), or None: an index without them
        self.slices = slices
        # the crop vectors of each case (tiles of its slices, ``crop_grid``), or None
        self.crops = crops
        self._ids = set(cases["case_id"]) if len(cases) else set()
        # ivfpq only: the exact (normalized) vectors in row order, a memory-mapped file then additions
        self._raw: list[np.ndarray] = [raw] if raw is not None else []
        self._raw_checked = raw is None
        self._masks: dict[tuple[tuple[Filter, ...], int], np.ndarray] = {}
        self._apply_search_params()

    # -- creating and opening -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        metric: Metric | str = Metric.COSINE,
        encoder: Mapping[str, Any],
        preprocess: Mapping[str, Any],
        key_check: str = "",
        index_type: IndexType | str = IndexType.FLAT,
        memory_budget_mb: int = _DEFAULTS.memory_budget_mb,
        ef_search: int = _DEFAULTS.ef_search,
        nprobe: int = _DEFAULTS.nprobe,
    ) -> IndexStore:
        """A new, empty index (in memory until :meth:`commit`).

        Parameters
        ----------
        index_type
            ``flat`` (exact; the default here), ``hnsw``, ``ivfpq``, or ``auto`` (from the collection
            size and ``memory_budget_mb``, see :func:`~medsearch.store.faiss_index.choose_index_type`).
            An ivfpq index starts flat and is trained once it holds
            :data:`~medsearch.store.faiss_index.IVFPQ_MIN_VECTORS` vectors.
        memory_budget_mb
            The most memory the faiss index should take (``auto`` only).
        ef_search, nprobe
            Search-time knobs of hnsw and ivfpq (see :meth:`configure`).

        Raises
        ------
        FileExistsError
            ``path`` already holds an index; open it with :meth:`open` instead.
        ConfigError
            A bad index type or knob.
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path} already holds a medsearch index; open it instead of creating it")
        metric = Metric(metric)
        manifest = Manifest.new(dim=dim, metric=metric, encoder=encoder, preprocess=preprocess, key_check=key_check)
        store = cls(path, manifest, fx.new_flat(dim, metric), pd.DataFrame({"case_id": pd.Series(dtype=str)}))
        store.configure(index_type=index_type, memory_budget_mb=memory_budget_mb, ef_search=ef_search, nprobe=nprobe)
        store.rebuild()
        return store

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> IndexStore:
        """Load an index directory, checking every file against the manifest (see :meth:`_open_once`).

        Sizes are always checked; a file's SHA-256 is computed when this machine has not verified
        the file as it is now (:class:`~medsearch.store.files.VerifiedFiles`), or for every file
        with ``verify``.

        A writer that commits twice while this reads removes the files of the manifest it read; then
        the new manifest is read, so that a reader sees the old or the new state, and no error.

        Raises
        ------
        IndexNotFoundError, IndexCorruptError
        """
        retries = 2
        while True:
            generation = read_manifest(path).generation
            try:
                return cls._open_once(path, verify=verify)
            except IndexCorruptError:
                if retries == 0 or read_manifest(path).generation == generation:
                    raise
                retries -= 1

    @classmethod
    def _open_once(cls, path: str | Path, *, verify: bool = False) -> IndexStore:
        """Load an index directory, checking every file against the manifest.

        Raises
        ------
        IndexNotFoundError
            ``path`` does not exist or holds no manifest.
        IndexCorruptError
            The manifest is unreadable or of another format, or a data file is missing, truncated or
            has another checksum than the manifest records.
        """
        path = Path(path)
        manifest = read_manifest(path)
        files = manifest.files
        if "vectors" not in files or "cases" not in files:
            raise IndexCorruptError(f"{path / MANIFEST} lists no vectors or cases file; rebuild the index")
        verified = VerifiedFiles(path)
        vectors_path = check_file(path, files["vectors"], verified, full=verify)
        cases_bytes = read_checked(path, files["cases"], verified, full=verify)
        try:
            if "lists" in files:  # ivfpq-disk: the lists stay in their file, memory-mapped
                check_file(path, files["lists"], verified, full=verify)
            index = ondisk.read_index(vectors_path, on_disk="lists" in files)
        except RuntimeError as e:
            raise IndexCorruptError(f"{vectors_path} is not a readable faiss index; rebuild the index") from e
        cases = pd.read_csv(StringIO(cases_bytes.decode("utf-8")), dtype={"case_id": str}, keep_default_na=True)
        del cases_bytes
        thumbnails = None
        if "thumbnails" in files:
            thumbnails = np.load(BytesIO(read_checked(path, files["thumbnails"], verified, full=verify)), allow_pickle=False)
            if len(thumbnails) != len(cases):
                raise IndexCorruptError(
                    f"{path}: {len(thumbnails)} thumbnails for {len(cases)} cases; rebuild the index"
                )
        if index.ntotal != len(cases) or index.d != manifest.dim:
            raise IndexCorruptError(
                f"{path}: the faiss index holds {index.ntotal} vectors of dimension {index.d} but the case table "
                f"has {len(cases)} rows and the manifest says dimension {manifest.dim}; rebuild the index"
            )
        kind = manifest.index.kind
        if fx.kind_of(index) is not kind or index.metric_type != fx.FAISS_METRIC[manifest.metric]:
            raise IndexCorruptError(
                f"{path}: the manifest describes a {kind.value} {manifest.metric.value} index but "
                f"{files['vectors'].name} holds a {fx.kind_of(index).value} one; rebuild the index"
            )
        raw = None
        raw_checked = False
        if kind is IndexType.IVFPQ:
            raw = open_raw(path, files.get("raw"), rows=len(cases), dim=manifest.dim)
            # the exact vectors are read in part for re-ranking; their checksum waits for a whole read
            # (IndexStore.vectors, a rebuild), unless this machine verified them already or verify is asked
            if verify:
                check_file(path, files["raw"], verified, full=True)
            raw_checked = verify or verified.known(path / files["raw"].name, files["raw"])
        slices = SliceTable.open(path, files, cases=len(cases), dim=manifest.dim, verified=verified, full=verify)
        crops = SliceTable.open(path, files, cases=len(cases), dim=manifest.dim, verified=verified, full=verify, crops=True)
        verified.save(keep={entry.name for entry in files.values()})
        store = cls(path, manifest, index, cases, thumbnails, raw, slices, crops)
        store._raw_checked = store._raw_checked or raw_checked
        return store

    @classmethod
    def open_or_create(cls, path: str | Path, **create_args: Any) -> IndexStore:
        """Open ``path`` if it holds an index, else create one with ``create_args``."""
        if (Path(path) / MANIFEST).exists():
            return cls.open(path)
        return cls.create(path, **create_args)

    # -- contents ---------------------------------------------------------------------------------

    @property
    def metric(self) -> Metric:
        return self.manifest.metric

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def index_type(self) -> IndexType:
        """The type of the faiss index now (``auto`` resolved; ``flat`` while an ivfpq waits for data)."""
        return self.manifest.index.kind

    def configure(
        self,
        *,
        index_type: IndexType | str | None = None,
        memory_budget_mb: int | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> None:
        """Change the index type asked for, the memory budget, or the search knobs.

        A new type or budget takes effect at the next :meth:`add`, :meth:`commit` or :meth:`rebuild`
        (a conversion from the exact vectors); ``ef_search`` (hnsw: candidates kept while walking
        the graph) and ``nprobe`` (ivfpq: inverted lists scanned) at once. Both are recorded in the
        manifest at the next commit.

        Raises
        ------
        ConfigError
            An unknown index type, or a number below 1.
        """
        section = self.manifest.index
        checked = IndexConfig(
            index_type=section.requested if index_type is None else parse_enum(IndexType, index_type, "index.index_type"),
            memory_budget_mb=section.memory_budget_mb if memory_budget_mb is None else memory_budget_mb,
            ef_search=section.ef_search if ef_search is None else ef_search,
            nprobe=section.nprobe if nprobe is None else nprobe,
        )
        self.manifest.index = dataclasses.replace(
            section,
            requested=checked.index_type,
            memory_budget_mb=checked.memory_budget_mb,
            ef_search=checked.ef_search,
            nprobe=checked.nprobe,
        )
        self._apply_search_params()

    def record_config(self, config: Mapping[str, Any]) -> None:
        """Record the full config the index is built with (written at the next :meth:`commit`)."""
        self.manifest.config = dict(config)

    def add_label_columns(self, columns: Iterable[str]) -> bool:
        """Add label columns to the case table's list (written at the next :meth:`commit`); True if any is new."""
        before = self.manifest.label_columns
        self.manifest.label_columns = sorted(set(before) | set(columns))
        return self.manifest.label_columns != before

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._ids

    def check_compatible(self, encoder: Mapping[str, Any], preprocess: Mapping[str, Any]) -> None:
        """Refuse vectors from another embedding space than the one this index was built with.

        Raises
        ------
        EncoderMismatchError
            The encoder (name, weights hash, dimension) or the preprocessing differs.
        """
        mine = self.manifest.encoder
        for field in ("name", "weights_sha256", "dim"):
            if mine.get(field) != encoder.get(field):
                raise EncoderMismatchError(
                    f"index {self.path} was built with encoder {mine.get('name')} "
                    f"(weights {str(mine.get('weights_sha256'))[:12]}), not {encoder.get('name')} "
                    f"(weights {str(encoder.get('weights_sha256'))[:12]}); use the same encoder or build a new index"
                )
        # a setting added after the index was built: the index was built as its default value behaves
        recorded = {**_PREPROCESS_DEFAULTS, **self.manifest.preprocess}
        if recorded != {**_PREPROCESS_DEFAULTS, **preprocess}:
            changed = sorted(
                k for k in set(preprocess) | set(recorded)
                if preprocess.get(k, _PREPROCESS_DEFAULTS.get(k)) != recorded.get(k)
            )
            raise EncoderMismatchError(
                f"index {self.path} was built with other preprocessing ({', '.join(changed)} differ); "
                "query with the index's own settings (omit --config) or build a new index"
            )

    def add(
        self,
        vectors: np.ndarray,
        rows: pd.DataFrame,
        thumbnails: np.ndarray | None = None,
        slices: Sequence[SlicesLike | None] | None = None,
        crops: Sequence[SlicesLike | None] | None = None,
    ) -> None:
        """Append cases (in memory). ``rows`` needs a ``case_id`` column; ids already present are skipped.

        ``thumbnails``, if given, is ``(n, T, T)`` uint8, one per row; once an index keeps
        thumbnails every later addition must bring them too (missing ones are stored black).
        ``slices``, if given, holds each row's slice vectors (a
        :class:`~medsearch.embedding.SliceSet`, or None for a case without); cases added without
        them own no slice vectors (re-ranking then compares their case vector). ``crops`` likewise
        holds each row's crop vectors (a slice set with ``boxes``), or None.

        Raises
        ------
        ValueError
            Shapes or dtypes do not match the index.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be (n, {self.dim}), got {vectors.shape}")
        if len(rows) != len(vectors):
            raise ValueError(f"{len(rows)} metadata rows for {len(vectors)} vectors")
        if "case_id" not in rows:
            raise ValueError("rows need a case_id column")
        fresh = ~rows["case_id"].isin(self._ids).to_numpy() & ~rows["case_id"].duplicated().to_numpy()
        if not fresh.any():
            return
        for sets in (slices, crops):
            if sets is not None and len(sets) != len(fresh):
                raise ValueError(f"{len(sets)} slice sets for {len(fresh)} vectors")
        if not fresh.all():  # (a copy of a large batch only when needed)
            vectors, rows = vectors[fresh], rows.loc[fresh]
        if thumbnails is not None:
            thumbnails = np.asarray(thumbnails, dtype=np.uint8)
            if thumbnails.ndim != 3 or len(thumbnails) != len(fresh):
                raise ValueError(f"thumbnails must be (n, T, T) uint8 with n = {len(fresh)}, got {thumbnails.shape}")
            self._add_thumbnails(thumbnails[fresh])
        elif self.thumbnails is not None:
            size = self.thumbnails.shape[1:]
            self._add_thumbnails(np.zeros((int(fresh.sum()), *size), np.uint8))
        self.slices = self._add_sets(self.slices, slices, fresh, crops=False)
        self.crops = self._add_sets(self.crops, crops, fresh, crops=True)
        kind, params, note = self._plan(len(self) + len(vectors))
        if len(self) == 0 and self._due(kind, len(vectors)):
            # a first batch large enough for an approximate index: build it straight from the batch
            self._install(kind, params, note, vectors)
        else:
            self._append(vectors)
        rows = rows.reset_index(drop=True)
        # concat with an empty table would turn every new column into float (all-NA upcast)
        self.cases = rows if self.cases.empty else pd.concat([self.cases, rows], ignore_index=True)
        self._ids.update(rows["case_id"])
        self._masks.clear()
        self.rebuild()
        self._apply_search_params()  # the new size, for search()

    # -- index types: planning, building ---------------------------------------------------------

    def _plan(self, n: int) -> tuple[IndexType, dict[str, Any], str]:
        """The index type and build parameters for ``n`` vectors, and a note when it falls back."""
        section = self.manifest.index
        return fx.plan(section.requested, n, self.dim, memory_budget_mb=section.memory_budget_mb)

    def _due(self, kind: IndexType, n: int) -> bool:
        return fx.rebuild_due(kind, self.index_type, n, built_for=self.manifest.index.built_for)

    def _install(self, kind: IndexType, params: dict[str, Any], note: str, source: np.ndarray) -> None:
        """Replace the faiss index by a new one of ``kind`` holding ``source`` (row order kept)."""
        started = time.perf_counter()
        n = len(source)
        metric = self.metric
        index = fx.empty_index(kind, params, self.dim, metric)
        if kind is IndexType.IVFPQ:
            train_n = min(n, int(params["train_size"]))
            rows = np.sort(np.random.default_rng(0).choice(n, size=train_n, replace=False))
            index.train(fx.normalized(np.asarray(source[rows], dtype=np.float32), metric))
        keep_raw = kind is IndexType.IVFPQ and self.index_type is IndexType.IVFPQ and n == len(self)
        raw: list[np.ndarray] = []
        for start in range(0, n, _ADD_CHUNK):
            chunk = fx.normalized(np.asarray(source[start:start + _ADD_CHUNK], dtype=np.float32), metric)
            index.add(chunk)
            if kind is IndexType.IVFPQ and not keep_raw:
                raw.append(chunk if metric is Metric.COSINE else chunk.copy())  # (l2: a view of source)
        self.index = index
        if not keep_raw:
            self._raw, self._raw_checked = raw, True
        self.manifest.index.record_build(kind, params, n, note)
        self._apply_search_params()
        log.info("built a %s index of %d vectors in %.1f s", kind.value, n, time.perf_counter() - started)

    def _append(self, vectors: np.ndarray) -> None:
        self.index = ondisk.writable(self.index)  # (the files of a committed generation never change)
        for start in range(0, len(vectors), _ADD_CHUNK):
            chunk = fx.normalized(vectors[start:start + _ADD_CHUNK], self.metric)
            self.index.add(chunk)
            if self.index_type is IndexType.IVFPQ:
                self._raw.append(chunk if self.metric is Metric.COSINE else chunk.copy())

    def _apply_search_params(self) -> None:
        section = self.manifest.index
        # what search() reads on every query, as plain attributes (each lookup costs after a faiss call)
        self._hot = (self.manifest.dim, self.manifest.metric is Metric.COSINE, self._rerank_factor(), int(self.index.ntotal))
        fx.apply_search_params(self.index, self.index_type, ef_search=section.ef_search, nprobe=section.nprobe)

    def _rerank_factor(self) -> int:
        section = self.manifest.index
        return int(section.params.get("rerank", 0)) if section.kind is IndexType.IVFPQ else 0

    # -- the exact vectors ------------------------------------------------------------------------

    def _exact_all(self) -> np.ndarray:
        """All exact vectors without a copy where possible (a view of the index or of the raw file)."""
        if not len(self):
            return np.zeros((0, self.dim), np.float32)
        if self.index_type is not IndexType.IVFPQ:
            return fx.flat_storage(self.index)
        self._check_raw()
        if len(self._raw) > 1:
            self._raw = [np.concatenate(self._raw)]
        return self._raw[0]

    def _exact_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.index_type is not IndexType.IVFPQ:
            return fx.flat_storage(self.index)[rows]
        if len(self._raw) > 1:
            self._raw = [np.concatenate(self._raw)]
        return np.asarray(self._raw[0][rows], dtype=np.float32)

    def _check_raw(self) -> None:
        if self._raw_checked:
            return
        files = self.manifest.files
        if "raw" not in files:
            raise IndexCorruptError(f"{self.path / MANIFEST} lists no exact vectors (raw) for an ivfpq index; rebuild the index")
        verified = VerifiedFiles(self.path)
        check_file(self.path, files["raw"], verified, full=True)
        verified.save(keep={entry.name for entry in files.values()})
        self._raw_checked = True

    def _write_raw(self, name: str) -> FileEntry:
        entry = write_raw(self.path, name, self._raw, rows=sum(len(part) for part in self._raw), dim=self.dim)
        self._raw = [np.load(self.path / name, mmap_mode="r")]
        self._raw_checked = True
        return entry

    def _add_sets(self, table: SliceTable | None, sets: Sequence[SlicesLike | None] | None, fresh: np.ndarray, *,
                  crops: bool) -> SliceTable | None:
        """``table`` with the sets of the ``fresh`` rows appended (created, empty for the cases
        before, on the first sets); the cases of a batch without sets own no rows."""
        if sets is not None and table is None:
            table = SliceTable(self.dim, crops=crops)
            table.add_empty(len(self))
        if table is not None:
            table.add([s for s, keep in zip(sets, fresh.tolist()) if keep] if sets is not None else [None] * int(fresh.sum()))
        return table

    def _add_thumbnails(self, new: np.ndarray) -> None:
        if self.thumbnails is None:
            if len(self):
                # an index without thumbnails so far: earlier cases get black ones
                self.thumbnails = np.zeros((len(self), *new.shape[1:]), np.uint8)
            else:
                self.thumbnails = new
                return
        if self.thumbnails.shape[1:] != new.shape[1:]:
            raise ValueError(
                f"thumbnails of this index are {self.thumbnails.shape[1:]}, got {new.shape[1:]}; "
                "keep index.thumbnail_size as the index was built"
            )
        self.thumbnails = np.concatenate([self.thumbnails, new])

    # -- searching --------------------------------------------------------------------------------

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        where: str | Filter | Iterable[str | Filter] | None = None,
    ) -> SearchHits:
        """The ``k`` nearest cases of each query vector, closest first.

        Parameters
        ----------
        vectors
            ``(Q, dim)`` or ``(dim,)`` float32 queries.
        k
            Results per query; fewer when the index (or the filtered subset) holds fewer cases.
        where
            Metadata filters that must all hold, e.g. ``["modality=CT", "age>=60"]`` (see
            :mod:`medsearch.filters`). The search runs over the matching cases only (a faiss ID
            selector), so ``min(k, matching cases)`` results come back.

        Raises
        ------
        ValueError
            Wrong query dimension or ``k`` below 1.
        FilterError
            A filter is malformed or names a field the case table lacks.
        """
        # This is the hot path of every query: a few C-level steps around the faiss call. Right
        # after a search has swept the caches, each Python or numpy step costs 10 to 60 us (not the
        # 1 to 5 us of a warm loop), so there are as few as possible: no SWIG attribute reads
        # (the size is kept in _hot), one check for faiss's -1 padding.
        dim, cosine, rerank, n = self._hot
        vectors = np.array(vectors, dtype=np.float32, order="C", ndmin=2)  # a copy: normalized in place
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(f"query vectors must have dimension {dim}, got shape {vectors.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if cosine:
            _renorm_l2(dim, len(vectors), _swig_ptr(vectors))
        if where is not None and not (isinstance(where, (list, tuple)) and not where):
            section = self.manifest.index
            scores, ids = fx.search_filtered(
                self.index, self.index_type, vectors, k, self.matching(where), metric=self.metric,
                ef_search=section.ef_search, nprobe=section.nprobe, rerank_factor=rerank, exact_rows=self._exact_rows,
            )
        else:
            if k > n:
                k = max(n, 1)
            if rerank > 1:
                scores, ids = self.index.search(vectors, min(k * rerank, n))
                scores, ids = fx.rerank(vectors, ids, k, metric=self.metric, exact_rows=self._exact_rows)
            else:
                scores, ids = self.index.search(vectors, k)
        # Each row is sorted closest first, and a row faiss could not fill ends in -1s (so are the
        # filtered and re-ranked results): looking at the first and last columns is enough.
        single = len(ids) == 1
        if cosine:
            np.subtract(1.0, scores, out=scores)  # 1 - cosine
        if scores.size and (scores.item(0) < 0 if single else scores[:, 0].min() < 0):
            # rounding: -1e-7 for the vector itself (cosine), or a squared distance just below 0 (l2)
            np.maximum(scores, 0.0, out=scores)
        if not cosine:
            np.sqrt(scores, out=scores)
        if ids.size and (ids.item(-1) < 0 if single else ids[:, -1].min() < 0):
            scores[ids < 0] = np.inf
        return SearchHits(distances=scores, ids=ids)

    def matching(self, where: str | Filter | Iterable[str | Filter] | None) -> np.ndarray:
        """The case-table rows that satisfy every filter, as a boolean array (cached per filter set).

        Raises
        ------
        FilterError
            A filter is malformed or names a field the case table lacks.
        """
        filters = parse_filters(where)
        key = (filters, len(self.cases))
        mask = self._masks.get(key)
        if mask is None:
            mask = filter_mask(self.cases, filters)
            if len(self._masks) >= _MASKS_CACHED:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = mask
        return mask

    def vectors(self) -> np.ndarray:
        """All stored vectors (normalized for cosine), exact, in case-table order (for evaluation, export
        and rebuilds). For ivfpq they come from ``raw-<gen>.npy``; the first call checks its checksum.

        Raises
        ------
        IndexCorruptError
            The exact vectors of an ivfpq index do not match their checksum.
        """
        return np.array(self._exact_all(), dtype=np.float32)

    def rebuild(self, *, force: bool = False) -> bool:
        """Convert the faiss index to the type planned for the collection's size, if it is due.

        Due: the type planned differs from the present one (``auto`` crossed a size or memory
        threshold; an ivfpq that waited on flat now has enough vectors; :meth:`configure` asked for
        another type), or an ivfpq index has grown
        :data:`~medsearch.store.faiss_index.RETRAIN_GROWTH` times since it was trained. ``force``
        rebuilds anyway (a fresh training). Returns whether it rebuilt.

        Raises
        ------
        IndexCorruptError
            The exact vectors of an ivfpq index do not match their checksum.
        """
        kind, params, note = self._plan(len(self))
        if not force and not self._due(kind, len(self)):
            self.manifest.index.note = note
            return False
        self._install(kind, params, note, self._exact_all())
        return True

    # -- writing ----------------------------------------------------------------------------------

    def commit(self, *, extra: Mapping[str, bytes] | None = None, info: Mapping[str, Any] | None = None) -> None:
        """Write the index to disk as a new generation, then switch the manifest to it atomically.

        ``extra`` files (reports) are written atomically beside the data files; ``info`` is recorded
        in the manifest (e.g. ``{"last_run": ...}``, see :meth:`Manifest.with_info
        <medsearch.store.files.Manifest.with_info>`). An index type due for conversion converts
        first (see :meth:`rebuild`).
        """
        self.rebuild()
        recorded = self.manifest.with_info(info or {})
        self.path.mkdir(parents=True, exist_ok=True)
        generation = self.manifest.generation + 1
        cases = self.cases.to_csv(index=False).encode("utf-8")
        index, section = self.index, self.manifest.index
        on_disk = self.index_type is IndexType.IVFPQ and ondisk.wanted(
            section.requested, len(self), self.dim, memory_budget_mb=section.memory_budget_mb)
        files = {} if on_disk else {
            "vectors": write_file_by(self.path, generation_file("vectors", generation), lambda p: faiss.write_index(index, p)),
        }
        files["cases"] = write_file(self.path, generation_file("cases", generation), cases)
        del cases
        if self.thumbnails is not None:
            buffer = BytesIO()
            np.save(buffer, self.thumbnails, allow_pickle=False)
            files["thumbnails"] = write_file(self.path, generation_file("thumbnails", generation), buffer.getvalue())
        if on_disk:  # ivfpq-disk: lists and float16 exact vectors in files that a query memory-maps
            entries, exact = ondisk.write_generation(self.path, generation, index, self._raw, metric=self.metric)
            files.update(entries)
            self._raw, self._raw_checked = [exact], True
        elif self.index_type is IndexType.IVFPQ:
            files["raw"] = self._write_raw(generation_file("raw", generation))
        for table in (self.slices, self.crops):
            if table is not None:
                files.update(table.write(self.path, generation))
        for name, data in (extra or {}).items():
            write_file(self.path, name, data)
        manifest = recorded.committed(
            generation=generation, files=files, cases=len(self), columns=self.cases.columns
        )
        write_manifest(self.path, manifest)
        self.manifest = manifest
        drop_old_generations(self.path, generation)
