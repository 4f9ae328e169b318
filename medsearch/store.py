"""The index directory: a faiss index of case embeddings beside a table of non-identifying metadata.

Layout of an index directory::

    manifest.json          what the index holds: format, dimension, metric, encoder, preprocessing,
                           counts, and the name, size and SHA-256 of every data file
    vectors-<gen>.faiss    the faiss index (row i = row i of the case table)
    raw-<gen>.npy          ivfpq indexes only: the exact vectors, memory-mapped (see below)
    cases-<gen>.csv        one row per case: pseudonymous case id and allow-listed metadata
    thumbs-<gen>.npy       optional: one small uint8 gray thumbnail per case, for result sheets
    <extra files>          reports written with a commit (skip report, run summary)
    local-verified.json    which data files were checked against their SHA-256 on this machine
                           (see :class:`_VerifiedFiles`); local, left behind by an export

Every commit writes a new generation of data files, fsyncs them, and then replaces ``manifest.json``
atomically; the generation before is kept until the next commit. A reader therefore always sees a
complete old or new state, and a run killed mid-write leaves the previous index intact. The faiss
index streams to its file (``faiss.write_index``), and loads from it (``faiss.read_index``), so
neither holds a second copy of the index in memory.

Opening an index checks every data file's size against the manifest, always, and its SHA-256 when
the file is not known to be verified: :class:`_VerifiedFiles` remembers files whose checksum
matched, by size, modification and change time and inode, so that a query on an unchanged index
of millions of cases does not read gigabytes to hash them. A file written or replaced since (even
with the same size) is hashed again. ``IndexStore.open(path, verify=True)`` (``medsearch info
--verify``) hashes every file regardless, which also catches damage that left the file's times
alone (a failing disk).

Distances: for the ``cosine`` metric the store keeps L2-normalized vectors in an inner-product index
and reports ``distance = 1 - cosine similarity``; for ``l2`` it reports the Euclidean distance. In
both, lower is closer and an identical vector has distance 0.

Index types (``index.index_type``): ``flat`` searches exactly; ``hnsw`` (HNSW32 over the exact
vectors) and ``ivfpq`` (an OPQ rotation, inverted lists and product-quantized codes, trained on a
sample) search approximately. ``auto`` picks one from the collection size and a memory budget, see
:func:`choose_index_type`. The store converts the index when the collection crosses a threshold
(at :meth:`IndexStore.add` or :meth:`IndexStore.commit`), rebuilding it from the exact vectors, which
it always keeps: a flat or HNSW index holds them itself; an ivfpq index keeps them beside its codes
in ``raw-<gen>.npy``, memory-mapped (4 * dim bytes per case on disk, read only for re-ranking,
filtered searches over few cases, :meth:`IndexStore.vectors` and rebuilds). Every type keeps the
metric's meaning: cosine is an inner product of normalized vectors, and ``distance`` is
``1 - cosine`` (or Euclidean). An ivfpq index re-ranks its candidates with the exact vectors, so
its distances are exact too; with ``rerank = 0`` they come from the compressed codes (off by a
few hundredths).

Metadata filters (``where=["modality=CT", "age>=60"]``, see :mod:`medsearch.filters`) become a
faiss ID selector, so the ``k`` nearest *matching* cases come back whenever ``k`` cases match.

This module takes float32 arrays; it never imports torch or an encoder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from medsearch.config import IndexConfig, IndexType, Metric
from medsearch.errors import EncoderMismatchError, IndexCorruptError, IndexNotFoundError
from medsearch.filters import Filter, filter_mask, parse_filters

__all__ = ["FORMAT_VERSION", "IndexStore", "SearchHits", "choose_index_type", "index_bytes_per_vector"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: owner-only, local to this machine: data files whose SHA-256 was checked here (see _VerifiedFiles)
VERIFIED_CACHE = "local-verified.json"
_GENERATIONS_KEPT = 2

#: ``auto`` searches exactly while the vectors take at most this much memory: a flat query reads
#: every vector once, tens of milliseconds for this many MB (README, "Choosing an index type").
FLAT_MAX_MB = 64
#: HNSW links per node, and the candidates kept while inserting.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: ivfpq trains 256 centroids per sub-quantizer (faiss asks for 39 points per centroid) and
#: its coarse lists; below this many vectors it stays flat.
IVFPQ_MIN_VECTORS = 10_000
#: an ivfpq index trained for n vectors is trained again when it holds this many times n.
RETRAIN_GROWTH = 4
#: exact scores of the top k * IVFPQ_RERANK candidates of an ivfpq search (0: codes' scores).
IVFPQ_RERANK = 8
_IVFPQ_MAX_TRAIN = 65_536  # faiss samples at most 256 points per centroid anyway
_OPQ_ROUNDS = 10
_OPQ_MAX_TRAIN = 16_384
_ADD_CHUNK = 65_536
_EXACT_FILTER_MAX = 4096  # a filter matching at most this many cases is searched exactly
_MAX_WIDEN = 64  # a filtered approximate search widens ef_search / nprobe up to this factor
_MASKS_CACHED = 16
_DEFAULTS = IndexConfig()
_renorm_l2 = faiss.fvec_renorm_L2
_swig_ptr = faiss.swig_ptr
_HASH_BLOCK = 1 << 24
# A file modified within this long after it was hashed could keep its modification time (file
# systems stamp times at a coarse tick: ~10 ms on Linux, 1 s on ext3, 2 s on FAT); a verification
# made that soon after the last write is not trusted (git calls such entries "racily clean").
_RACY_NS = 2_000_000_000


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
        manifest: dict[str, Any],
        index: faiss.Index,
        cases: pd.DataFrame,
        thumbnails: np.ndarray | None = None,
        raw: np.ndarray | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.cases = cases
        # (n, T, T) uint8 aligned with the case table, or None when the index keeps no thumbnails
        self.thumbnails = thumbnails
        self._ids = set(cases["case_id"]) if len(cases) else set()
        self.manifest.setdefault("index", _index_section(IndexType.FLAT, {}, 0))
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
            size and ``memory_budget_mb``, see :func:`choose_index_type`). An ivfpq index starts flat
            and is trained once it holds :data:`IVFPQ_MIN_VECTORS` vectors.
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
        manifest: dict[str, Any] = {
            "format": "medsearch-index",
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "metric": metric.value,
            "distance": _DISTANCE_TEXT[metric],
            "encoder": dict(encoder),
            "preprocess": dict(preprocess),
            "key_check": key_check,
            "generation": 0,
            "counts": {"cases": 0},
            "label_columns": [],
            "files": {},
        }
        store = cls(path, manifest, _new_flat(dim, metric), pd.DataFrame({"case_id": pd.Series(dtype=str)}))
        store.configure(index_type=index_type, memory_budget_mb=memory_budget_mb, ef_search=ef_search, nprobe=nprobe)
        store.rebuild()
        return store

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> IndexStore:
        """Load an index directory, checking every file against the manifest (see :meth:`_open_once`).

        Sizes are always checked; a file's SHA-256 is computed when this machine has not verified
        the file as it is now (:class:`_VerifiedFiles`), or for every file with ``verify``.

        A writer that commits twice while this reads removes the files of the manifest it read; then
        the new manifest is read, so that a reader sees the old or the new state, and no error.

        Raises
        ------
        IndexNotFoundError, IndexCorruptError
        """
        retries = 2
        while True:
            generation = read_manifest(path).get("generation")
            try:
                return cls._open_once(path, verify=verify)
            except IndexCorruptError:
                if retries == 0 or read_manifest(path).get("generation") == generation:
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
        files = manifest.get("files", {})
        if "vectors" not in files or "cases" not in files:
            raise IndexCorruptError(f"{path / MANIFEST} lists no vectors or cases file; rebuild the index")
        verified = _VerifiedFiles(path)
        vectors_path = _check_file(path, files["vectors"], verified, full=verify)
        cases_bytes = _read_checked(path, files["cases"], verified, full=verify)
        try:
            index = faiss.read_index(str(vectors_path))
        except RuntimeError as e:
            raise IndexCorruptError(f"{vectors_path} is not a readable faiss index; rebuild the index") from e
        cases = pd.read_csv(StringIO(cases_bytes.decode("utf-8")), dtype={"case_id": str}, keep_default_na=True)
        del cases_bytes
        thumbnails = None
        if "thumbnails" in files:
            thumbnails = np.load(BytesIO(_read_checked(path, files["thumbnails"], verified, full=verify)), allow_pickle=False)
            if len(thumbnails) != len(cases):
                raise IndexCorruptError(
                    f"{path}: {len(thumbnails)} thumbnails for {len(cases)} cases; rebuild the index"
                )
        if index.ntotal != len(cases) or index.d != manifest["dim"]:
            raise IndexCorruptError(
                f"{path}: the faiss index holds {index.ntotal} vectors of dimension {index.d} but the case table "
                f"has {len(cases)} rows and the manifest says dimension {manifest['dim']}; rebuild the index"
            )
        try:
            kind = IndexType(manifest.get("index", {}).get("type", IndexType.FLAT.value))
            IndexType(manifest.get("index", {}).get("requested", kind.value))
        except ValueError:
            raise IndexCorruptError(f"{path / MANIFEST} names an unknown index type; rebuild the index") from None
        if _kind_of(index) is not kind or index.metric_type != _FAISS_METRIC[Metric(manifest["metric"])]:
            raise IndexCorruptError(
                f"{path}: the manifest describes a {kind.value} {manifest['metric']} index but "
                f"{files['vectors']['name']} holds a {_kind_of(index).value} one; rebuild the index"
            )
        raw = None
        raw_checked = False
        if kind is IndexType.IVFPQ:
            raw = _open_raw(path, files.get("raw"), rows=len(cases), dim=int(manifest["dim"]))
            # the exact vectors are read in part for re-ranking; their checksum waits for a whole read
            # (IndexStore.vectors, a rebuild), unless this machine verified them already or verify is asked
            if verify:
                _check_file(path, files["raw"], verified, full=True)
            raw_checked = verify or verified.known(path / files["raw"]["name"], files["raw"])
        verified.save(keep={entry["name"] for entry in files.values()})
        store = cls(path, manifest, index, cases, thumbnails, raw)
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
        return Metric(self.manifest["metric"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index_type(self) -> IndexType:
        """The type of the faiss index now (``auto`` resolved; ``flat`` while an ivfpq waits for data)."""
        return self._kind

    @property
    def _kind(self) -> IndexType:
        return _KINDS[self.manifest["index"]["type"]]

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
        section = self.manifest["index"]
        checked = IndexConfig(
            index_type=section.get("requested", "flat") if index_type is None else index_type,
            memory_budget_mb=int(section.get("memory_budget_mb", _DEFAULTS.memory_budget_mb)) if memory_budget_mb is None else memory_budget_mb,
            ef_search=int(section.get("ef_search", _DEFAULTS.ef_search)) if ef_search is None else ef_search,
            nprobe=int(section.get("nprobe", _DEFAULTS.nprobe)) if nprobe is None else nprobe,
        )
        section.update(
            requested=checked.index_type.value,
            memory_budget_mb=checked.memory_budget_mb,
            ef_search=checked.ef_search,
            nprobe=checked.nprobe,
        )
        self._apply_search_params()

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
        mine = self.manifest["encoder"]
        for field in ("name", "weights_sha256", "dim"):
            if mine.get(field) != encoder.get(field):
                raise EncoderMismatchError(
                    f"index {self.path} was built with encoder {mine.get('name')} "
                    f"(weights {str(mine.get('weights_sha256'))[:12]}), not {encoder.get('name')} "
                    f"(weights {str(encoder.get('weights_sha256'))[:12]}); use the same encoder or build a new index"
                )
        if dict(self.manifest["preprocess"]) != dict(preprocess):
            changed = sorted(
                k for k in set(preprocess) | set(self.manifest["preprocess"])
                if preprocess.get(k) != self.manifest["preprocess"].get(k)
            )
            raise EncoderMismatchError(
                f"index {self.path} was built with other preprocessing ({', '.join(changed)} differ); "
                "query with the index's own settings (omit --config) or build a new index"
            )

    def add(self, vectors: np.ndarray, rows: pd.DataFrame, thumbnails: np.ndarray | None = None) -> None:
        """Append cases (in memory). ``rows`` needs a ``case_id`` column; ids already present are skipped.

        ``thumbnails``, if given, is ``(n, T, T)`` uint8, one per row; once an index keeps
        thumbnails every later addition must bring them too (missing ones are stored black).

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

    # -- index types: planning, building, searching -----------------------------------------------

    def _plan(self, n: int) -> tuple[IndexType, dict[str, Any], str]:
        """The index type and build parameters for ``n`` vectors, and a note when it falls back."""
        section = self.manifest["index"]
        budget_mb = int(section.get("memory_budget_mb", _DEFAULTS.memory_budget_mb))
        requested = IndexType(section.get("requested", IndexType.FLAT.value))
        kind = choose_index_type(n, self.dim, memory_budget_mb=budget_mb) if requested is IndexType.AUTO else requested
        note = ""
        if kind is IndexType.IVFPQ and n < IVFPQ_MIN_VECTORS:
            note = (
                f"ivfpq needs at least {IVFPQ_MIN_VECTORS} vectors to train and the index holds {n}; "
                "it searches exactly (flat) until then and converts when it grows"
            )
            kind = IndexType.FLAT
        return kind, _build_params(kind, n, self.dim, budget_mb), note

    def _due(self, kind: IndexType, n: int) -> bool:
        if kind is not self.index_type:
            return True
        if kind is IndexType.IVFPQ:
            # coarse centroids trained for far fewer vectors make lists long and slow: train again
            return n >= RETRAIN_GROWTH * max(int(self.manifest["index"].get("built_for", 0)), 1)
        return False

    def _install(self, kind: IndexType, params: dict[str, Any], note: str, source: np.ndarray) -> None:
        """Replace the faiss index by a new one of ``kind`` holding ``source`` (row order kept)."""
        started = time.perf_counter()
        n = len(source)
        index = _empty_index(kind, params, self.dim, self.metric)
        if kind is IndexType.IVFPQ:
            train_n = min(n, int(params["train_size"]))
            rows = np.sort(np.random.default_rng(0).choice(n, size=train_n, replace=False))
            index.train(self._normalized(np.asarray(source[rows], dtype=np.float32)))
        keep_raw = kind is IndexType.IVFPQ and self.index_type is IndexType.IVFPQ and n == len(self)
        raw: list[np.ndarray] = []
        for start in range(0, n, _ADD_CHUNK):
            chunk = self._normalized(np.asarray(source[start:start + _ADD_CHUNK], dtype=np.float32))
            index.add(chunk)
            if kind is IndexType.IVFPQ and not keep_raw:
                raw.append(chunk if self.metric is Metric.COSINE else chunk.copy())  # (l2: a view of source)
        self.index = index
        if not keep_raw:
            self._raw, self._raw_checked = raw, True
        self.manifest["index"].update(type=kind.value, params=params, built_for=n, note=note)
        self._apply_search_params()
        log.info("built a %s index of %d vectors in %.1f s", kind.value, n, time.perf_counter() - started)

    def _append(self, vectors: np.ndarray) -> None:
        for start in range(0, len(vectors), _ADD_CHUNK):
            chunk = self._normalized(vectors[start:start + _ADD_CHUNK])
            self.index.add(chunk)
            if self.index_type is IndexType.IVFPQ:
                self._raw.append(chunk if self.metric is Metric.COSINE else chunk.copy())

    def _normalized(self, vectors: np.ndarray) -> np.ndarray:
        if self.metric is Metric.COSINE:
            return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _apply_search_params(self) -> None:
        section = self.manifest["index"]
        kind = self.index_type
        # what search() reads on every query, as plain attributes (each lookup costs after a faiss call)
        self._hot = (
            int(self.manifest["dim"]), self.manifest["metric"] == Metric.COSINE.value, self._rerank_factor(),
            int(self.index.ntotal),
        )
        if kind is IndexType.HNSW:
            self.index.hnsw.efSearch = int(section.get("ef_search", _DEFAULTS.ef_search))
        elif kind is IndexType.IVFPQ:
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(int(section.get("nprobe", _DEFAULTS.nprobe)), ivf.nlist)

    def _search_params(self, selector: Any, widen: int = 1) -> Any:
        section = self.manifest["index"]
        kind = self.index_type
        if kind is IndexType.HNSW:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(section.get("ef_search", _DEFAULTS.ef_search)) * widen)
        if kind is IndexType.IVFPQ:
            nlist = faiss.extract_index_ivf(self.index).nlist
            ivf = faiss.SearchParametersIVF(sel=selector, nprobe=min(int(section.get("nprobe", _DEFAULTS.nprobe)) * widen, nlist))
            return faiss.SearchParametersPreTransform(index_params=ivf) if isinstance(self.index, faiss.IndexPreTransform) else ivf
        return faiss.SearchParameters(sel=selector)

    def _rerank_factor(self) -> int:
        return int(self.manifest["index"].get("params", {}).get("rerank", 0)) if self._kind is IndexType.IVFPQ else 0

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's candidates (from the exact vectors); the best ``k`` of them."""
        found = candidates >= 0
        vectors = self._exact_rows(np.where(found, candidates, 0).ravel()).reshape(*candidates.shape, self.dim)
        if self.metric is Metric.COSINE:
            scores = np.einsum("qd,qcd->qc", queries, vectors)
            scores[~found] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        else:
            scores = ((vectors - queries[:, None, :]) ** 2).sum(axis=2)
            scores[~found] = np.inf
            order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        ids = np.take_along_axis(candidates, order, axis=1)
        ids[~np.isfinite(scores)] = -1
        return scores, ids

    def _search_filtered(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        allowed = np.flatnonzero(mask)
        k = min(k, len(allowed))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        kind = self.index_type
        if kind is not IndexType.FLAT and len(allowed) <= _EXACT_FILTER_MAX:
            # few matching cases: comparing with each is cheaper and exact
            return self._exact_search(queries, allowed, k)
        bits = np.packbits(mask, bitorder="little")  # the selector reads this buffer: keep it alive
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        rerank = max(self._rerank_factor(), 1)
        fetch = min(k * rerank, len(allowed))
        widen = 1
        while True:
            scores, ids = self.index.search(queries, fetch, params=self._search_params(selector, widen))
            short = (ids >= 0).sum(axis=1) < k
            if not short.any() or kind is IndexType.FLAT or widen >= _MAX_WIDEN:
                break
            # a graph walk or the lists probed met too few matching cases: look further
            widen *= 4
        if rerank > 1:
            scores, ids = self._rerank(queries, ids, k)
        if short.any() and kind is not IndexType.FLAT:
            exact_scores, exact_ids = self._exact_search(queries[short], allowed, k)
            scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
            scores[short], ids[short] = exact_scores, exact_ids
        return scores[:, :k], ids[:, :k]

    def _exact_search(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` among ``rows`` (in chunks, so a large subset is never copied at once)."""
        best_scores = np.zeros((len(queries), 0), np.float32)
        best_ids = np.zeros((len(queries), 0), np.int64)
        for start in range(0, len(rows), _EXACT_FILTER_MAX):
            chunk = rows[start:start + _EXACT_FILTER_MAX]
            scores = self._exact_scores(queries, self._exact_rows(chunk))
            ids = np.broadcast_to(chunk, scores.shape)
            best_scores, best_ids = _top_k(
                np.concatenate([best_scores, scores], axis=1), np.concatenate([best_ids, ids], axis=1), k, self.metric
            )
        return best_scores, best_ids

    def _exact_scores(self, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """faiss's convention: inner products (cosine), or squared Euclidean distances (l2)."""
        if self.metric is Metric.COSINE:
            return queries @ vectors.T
        return (queries**2).sum(1)[:, None] - 2 * queries @ vectors.T + (vectors**2).sum(1)[None, :]

    def _exact_all(self) -> np.ndarray:
        """All exact vectors without a copy where possible (a view of the index or of the raw file)."""
        if not len(self):
            return np.zeros((0, self.dim), np.float32)
        if self.index_type is not IndexType.IVFPQ:
            return _flat_storage(self.index)
        self._check_raw()
        if len(self._raw) > 1:
            self._raw = [np.concatenate(self._raw)]
        return self._raw[0]

    def _exact_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.index_type is not IndexType.IVFPQ:
            return _flat_storage(self.index)[rows]
        if len(self._raw) > 1:
            self._raw = [np.concatenate(self._raw)]
        return np.asarray(self._raw[0][rows], dtype=np.float32)

    def _check_raw(self) -> None:
        if self._raw_checked:
            return
        verified = _VerifiedFiles(self.path)
        _check_file(self.path, self.manifest["files"].get("raw", {}), verified, full=True)
        verified.save(keep={entry["name"] for entry in self.manifest["files"].values()})
        self._raw_checked = True

    def _write_raw(self, name: str) -> dict[str, Any]:
        rows = sum(len(part) for part in self._raw)
        header = BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (rows, self.dim)}
        )
        chunks = (memoryview(np.ascontiguousarray(part[i:i + _ADD_CHUNK])).cast("B")
                  for part in self._raw for i in range(0, len(part), _ADD_CHUNK))
        entry = _write_file(self.path, name, itertools.chain([header.getvalue()], chunks))
        self._raw = [np.load(self.path / name, mmap_mode="r")]
        self._raw_checked = True
        return entry

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
            scores, ids = self._search_filtered(vectors, k, self.matching(where))
        else:
            if k > n:
                k = max(n, 1)
            if rerank > 1:
                scores, ids = self.index.search(vectors, min(k * rerank, n))
                scores, ids = self._rerank(vectors, ids, k)
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
        return np.array(self._exact_all())

    def rebuild(self, *, force: bool = False) -> bool:
        """Convert the faiss index to the type planned for the collection's size, if it is due.

        Due: the type planned differs from the present one (``auto`` crossed a size or memory
        threshold; an ivfpq that waited on flat now has enough vectors; :meth:`configure` asked for
        another type), or an ivfpq index has grown :data:`RETRAIN_GROWTH` times since it was trained.
        ``force`` rebuilds anyway (a fresh training). Returns whether it rebuilt.

        Raises
        ------
        IndexCorruptError
            The exact vectors of an ivfpq index do not match their checksum.
        """
        kind, params, note = self._plan(len(self))
        if not force and not self._due(kind, len(self)):
            if note != self.manifest["index"].get("note", ""):
                self.manifest["index"]["note"] = note
            return False
        self._install(kind, params, note, self._exact_all())
        return True

    # -- writing ----------------------------------------------------------------------------------

    def commit(self, *, extra: Mapping[str, bytes] | None = None, info: Mapping[str, Any] | None = None) -> None:
        """Write the index to disk as a new generation, then switch the manifest to it atomically.

        ``extra`` files (reports) are written atomically beside the data files; ``info`` is merged
        into the manifest (e.g. run counts). An index type due for conversion converts first
        (see :meth:`rebuild`).
        """
        self.rebuild()
        self.path.mkdir(parents=True, exist_ok=True)
        generation = int(self.manifest.get("generation", 0)) + 1
        cases = self.cases.to_csv(index=False).encode("utf-8")
        files = {
            "vectors": _write_index(self.path, f"vectors-{generation:06d}.faiss", self.index),
            "cases": _write_file(self.path, f"cases-{generation:06d}.csv", cases),
        }
        del cases
        if self.thumbnails is not None:
            buffer = BytesIO()
            np.save(buffer, self.thumbnails, allow_pickle=False)
            files["thumbnails"] = _write_file(self.path, f"thumbs-{generation:06d}.npy", buffer.getvalue())
        if self.index_type is IndexType.IVFPQ:
            files["raw"] = self._write_raw(f"raw-{generation:06d}.npy")
        for name, data in (extra or {}).items():
            _write_file(self.path, name, data)
        manifest = dict(self.manifest)
        manifest.update(info or {})
        manifest["generation"] = generation
        manifest["files"] = files
        manifest["counts"] = {**manifest.get("counts", {}), "cases": len(self)}
        manifest["label_columns"] = [c for c in self.manifest.get("label_columns", []) if c in self.cases]
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _write_file(self.path, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        self.manifest = manifest
        _drop_old_generations(self.path, generation)


_DISTANCE_TEXT = {
    Metric.COSINE: "1 - cosine similarity (0 = same direction; lower is closer)",
    Metric.L2: "Euclidean distance between embeddings (lower is closer)",
}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index directory.

    Raises
    ------
    IndexNotFoundError, IndexCorruptError
    """
    path = Path(path)
    if not path.is_dir():
        raise IndexNotFoundError(f"index directory {path} does not exist; build one with: medsearch index ARCHIVE --index {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise IndexNotFoundError(
            f"{path} is not a medsearch index (no {MANIFEST}); build one with: medsearch index ARCHIVE --index {path}"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexCorruptError(f"{manifest_path} is not readable JSON; rebuild the index") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "medsearch-index":
        raise IndexCorruptError(f"{manifest_path} is not a medsearch manifest; rebuild the index")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexCorruptError(
            f"{manifest_path} has format version {manifest.get('format_version')}, this medsearch reads "
            f"{FORMAT_VERSION}; rebuild the index with this version"
        )
    return manifest


def choose_index_type(n: int, dim: int, *, memory_budget_mb: float = _DEFAULTS.memory_budget_mb) -> IndexType:
    """The index type ``auto`` picks for ``n`` vectors of dimension ``dim``.

    1. ``flat`` (exact) while the vectors take at most :data:`FLAT_MAX_MB` (13,100 1280-d vectors):
       a query then reads at most that much, tens of milliseconds.
    2. ``hnsw`` while the HNSW index fits the memory budget (4 * dim + ~270 bytes per vector).
    3. ``ivfpq`` beyond: product-quantized codes as large as the budget allows (8 to 128 bytes
       per vector), with the exact vectors on disk for re-ranking.

    The rule follows autofaiss (exact for few vectors, a graph while memory allows, compressed
    codes beyond); the thresholds were measured with ``benchmarks/search.py``.
    """
    budget = memory_budget_mb * 2**20
    if n * index_bytes_per_vector(IndexType.FLAT, dim) <= min(FLAT_MAX_MB * 2**20, budget):
        return IndexType.FLAT
    if n * index_bytes_per_vector(IndexType.HNSW, dim) <= budget:
        return IndexType.HNSW
    # too few vectors to train codes on: flat is the smallest index that works
    return IndexType.IVFPQ if n >= IVFPQ_MIN_VECTORS else IndexType.FLAT


def index_bytes_per_vector(kind: IndexType | str, dim: int, *, pq_bytes: int = 64) -> float:
    """Memory a vector takes in a faiss index of ``kind`` (an estimate; lists and graphs vary).

    flat: the float32 vector. hnsw: the vector and its links (2 * M ids on level 0, a few more
    above). ivfpq: the code and its 8-byte id in an inverted list (the exact vector is on disk).
    """
    kind = IndexType(kind)
    if kind is IndexType.FLAT:
        return 4.0 * dim
    if kind is IndexType.HNSW:
        return 4.0 * dim + 4 * 2 * HNSW_M * 1.05 + 12
    return float(pq_bytes + 8)


def _build_params(kind: IndexType, n: int, dim: int, memory_budget_mb: float) -> dict[str, Any]:
    if kind is IndexType.HNSW:
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
    if kind is not IndexType.IVFPQ:
        return {}
    # about sqrt(n) coarse lists (a power of two), each trained with 40 points
    nlist = int(2 ** round(math.log2(max(math.sqrt(n), 16))))
    nlist = max(16, min(nlist, 65_536, n // 40))
    # the largest code that fits the budget, at most 128 bytes and at most one byte per 2 dims
    per_vector = memory_budget_mb * 2**20 / max(n, 1) - 8
    sizes = [m for m in (8, 16, 32, 48, 64, 96, 128) if m <= dim // 2] or [1]
    m = max([s for s in sizes if s <= per_vector] or [sizes[0]])
    # OPQ rotates (and shortens) the vectors so that each sub-quantizer gets a balanced share
    opq_dim = min(4 * m, dim - dim % m)
    train = min(max(IVFPQ_MIN_VECTORS, 40 * nlist), _IVFPQ_MAX_TRAIN)
    return {"nlist": nlist, "m": m, "nbits": 8, "opq_dim": opq_dim, "train_size": train, "rerank": IVFPQ_RERANK}


def _empty_index(kind: IndexType, params: Mapping[str, Any], dim: int, metric: Metric) -> faiss.Index:
    if kind is IndexType.FLAT:
        return _new_flat(dim, metric)
    if kind is IndexType.HNSW:
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), _FAISS_METRIC[metric])
        index.hnsw.efConstruction = int(params["ef_construction"])
        return index
    m, opq_dim = int(params["m"]), int(params["opq_dim"])
    # "np": no polysemous training (a slow code reordering for a search mode medsearch does not use)
    description = f"OPQ{m}_{opq_dim},IVF{int(params['nlist'])},PQ{m}x{int(params['nbits'])}np"
    index = faiss.index_factory(dim, description, _FAISS_METRIC[metric])
    # faiss's default OPQ training (50 rounds, 40 k-means iterations in the first, 65,536 points)
    # takes many minutes on a few cores at 1280-d; fewer rounds on fewer points give most of the gain
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter, opq.niter_pq_0, opq.max_train_points = _OPQ_ROUNDS, _OPQ_ROUNDS, _OPQ_MAX_TRAIN
    return index


def _new_flat(dim: int, metric: Metric) -> faiss.Index:
    return faiss.IndexFlatIP(dim) if metric is Metric.COSINE else faiss.IndexFlatL2(dim)


_FAISS_METRIC = {Metric.COSINE: faiss.METRIC_INNER_PRODUCT, Metric.L2: faiss.METRIC_L2}
_KINDS = {kind.value: kind for kind in IndexType}


def _kind_of(index: faiss.Index) -> IndexType:
    if isinstance(index, faiss.IndexHNSW):
        return IndexType.HNSW
    if isinstance(index, faiss.IndexFlat):
        return IndexType.FLAT
    return IndexType.IVFPQ


def _index_section(kind: IndexType, params: dict[str, Any], n: int) -> dict[str, Any]:
    return {"requested": kind.value, "type": kind.value, "params": params, "built_for": n, "note": "",
            "memory_budget_mb": _DEFAULTS.memory_budget_mb, "ef_search": _DEFAULTS.ef_search, "nprobe": _DEFAULTS.nprobe}


def _flat_storage(index: faiss.Index) -> np.ndarray:
    """The ``(n, d)`` vectors of a flat index or of an HNSW index's storage, as a view (no copy)."""
    flat = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if flat.ntotal == 0:
        return np.zeros((0, flat.d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` columns of each row, best first (largest inner product, smallest l2)."""
    key = -scores if metric is Metric.COSINE else scores
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(key, k - 1, axis=1)[:, :k]
        key, scores, ids = (np.take_along_axis(a, part, axis=1) for a in (key, scores, ids))
    order = np.argsort(key, axis=1, kind="stable")
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    return scores.astype(np.float32), np.where(np.isfinite(scores), ids, -1).astype(np.int64)


def _open_raw(folder: Path, entry: Mapping[str, Any] | None, *, rows: int, dim: int) -> np.ndarray:
    """The exact vectors of an ivfpq index, memory-mapped; size and shape checked (the checksum when read whole)."""
    if not entry:
        raise IndexCorruptError(f"{folder / MANIFEST} lists no exact vectors (raw) for an ivfpq index; rebuild the index")
    path = folder / str(entry.get("name", ""))
    try:
        size = path.stat().st_size
        raw = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if size != entry.get("bytes") or raw.shape != (rows, dim) or raw.dtype != np.float32:
        raise IndexCorruptError(
            f"index file {path} holds {raw.shape} {raw.dtype} in {size} bytes, the manifest expects ({rows}, {dim}) "
            f"float32 in {entry.get('bytes')} bytes; rebuild the index"
        )
    return raw


def _write_file(folder: Path, name: str, data: bytes | Iterable[bytes | memoryview]) -> dict[str, Any]:
    """Write ``data`` (bytes, or chunks of them) to ``folder/name`` atomically (temporary file, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return {"name": name, "bytes": size, "sha256": digest.hexdigest()}


def _write_index(folder: Path, name: str, index: faiss.Index) -> dict[str, Any]:
    """Write a faiss index to ``folder/name`` as :func:`_write_file` does, streaming: faiss writes
    the file itself, and it is hashed from the disk in blocks (never a serialized copy in memory)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            digest, size = _sha256_of(f)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return {"name": name, "bytes": size, "sha256": digest}


def _sha256_of(f: Any) -> tuple[str, int]:
    """SHA-256 and length of what an open binary file holds from its position on, read in blocks."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(_HASH_BLOCK), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def _check_size(folder: Path, entry: Mapping[str, Any]) -> tuple[Path, os.stat_result]:
    path = folder / str(entry.get("name", ""))
    try:
        st = path.stat()
    except OSError as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if st.st_size != entry.get("bytes"):
        raise IndexCorruptError(
            f"index file {path} has {st.st_size} bytes, the manifest says {entry.get('bytes')} (truncated?); rebuild the index"
        )
    return path, st


def _check_file(folder: Path, entry: Mapping[str, Any], verified: _VerifiedFiles, *, full: bool) -> Path:
    """The path of a data file whose size matches the manifest, and whose SHA-256 does too: hashed
    here from the disk in blocks, unless ``verified`` knows the file unchanged since it was (and not
    ``full``)."""
    started = time.time_ns()
    path, st = _check_size(folder, entry)
    if full or not verified.known(path, entry, st):
        try:
            with open(path, "rb") as f:
                digest, _ = _sha256_of(f)
        except OSError as e:
            raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
        _check_digest(path, entry, digest)
        verified.remember(path, entry, st, started)
    return path


def _read_checked(folder: Path, entry: Mapping[str, Any], verified: _VerifiedFiles, *, full: bool) -> bytes:
    """The bytes of a (small) data file, checked as :func:`_check_file` does."""
    started = time.time_ns()
    path, st = _check_size(folder, entry)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if len(data) != entry.get("bytes"):
        raise IndexCorruptError(
            f"index file {path} has {len(data)} bytes, the manifest says {entry.get('bytes')} (truncated?); rebuild the index"
        )
    if full or not verified.known(path, entry, st):
        _check_digest(path, entry, hashlib.sha256(data).hexdigest())
        verified.remember(path, entry, st, started)
    return data


def _check_digest(path: Path, entry: Mapping[str, Any], digest: str) -> None:
    if digest != entry.get("sha256"):
        raise IndexCorruptError(f"index file {path} does not match its checksum in the manifest; rebuild the index")


class _VerifiedFiles:
    """The data files of an index folder whose SHA-256 matched the manifest on this machine.

    A small JSON file in the folder (:data:`VERIFIED_CACHE`), created owner-only. Each entry is a
    data file's name (``vectors-000003.faiss``: nothing about a case) with its size, modification
    and change times, inode, the SHA-256 it was found to have, and when that was checked. A file
    counts as verified while all of these still match, its checksum is still the manifest's, and
    the check came at least :data:`_RACY_NS` after the file's last modification (a write within the
    same clock tick could leave the time unchanged). Inodes and change times do not survive a copy,
    so a copied folder is hashed again; :func:`medsearch.sharing.export_index` leaves the file behind.
    A cache that is missing, damaged, or another user's is ignored (every file is then hashed);
    deleting it only makes the next open hash every file.
    """

    _FORMAT = "medsearch-verified-files"
    _VERSION = 1

    def __init__(self, folder: Path) -> None:
        self.path = folder / VERIFIED_CACHE
        self.entries = self._read()
        self._changed = False

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                if hasattr(os, "getuid") and os.fstat(f.fileno()).st_uid != os.getuid():
                    return {}  # someone else's claims are not evidence
                data = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != self._FORMAT or data.get("version") != self._VERSION:
            return {}
        files = data.get("files")
        return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}

    @staticmethod
    def _key(st: os.stat_result) -> dict[str, int]:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}

    def known(self, path: Path, entry: Mapping[str, Any], st: os.stat_result | None = None) -> bool:
        """Whether ``path`` is verified as it is now, with the checksum ``entry`` (from the manifest) records."""
        seen = self.entries.get(path.name)
        if seen is None:
            return False
        try:
            st = st or path.stat()
        except OSError:
            return False
        return (
            seen.get("sha256") == entry.get("sha256")
            and all(seen.get(k) == v for k, v in self._key(st).items())
            and isinstance(seen.get("checked_ns"), int)
            and seen["checked_ns"] - st.st_mtime_ns >= _RACY_NS
        )

    def remember(self, path: Path, entry: Mapping[str, Any], st: os.stat_result, checked_ns: int) -> None:
        """Record that ``path``, as ``st`` describes it, matched ``entry``'s checksum (hashing began at ``checked_ns``)."""
        self.entries[path.name] = {**self._key(st), "sha256": entry.get("sha256"), "checked_ns": checked_ns}
        self._changed = True

    def save(self, *, keep: set[str]) -> None:
        """Write the cache back with the entries of the files in ``keep`` (best effort: a read-only
        folder only means hashing again next time)."""
        kept = {name: v for name, v in self.entries.items() if name in keep}
        if not self._changed and len(kept) == len(self.entries):
            return
        self.entries = kept
        data = json.dumps({"format": self._FORMAT, "version": self._VERSION, "files": kept}, indent=1, sort_keys=True)
        try:
            # mkstemp creates the file owner-only (0o600)
            fd, tmp = tempfile.mkstemp(prefix=f".{VERIFIED_CACHE}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            log.debug("could not update %s (%s); files will be hashed again at the next open", self.path, e)
            return
        self._changed = False


def _drop_old_generations(folder: Path, current: int) -> None:
    # Keep the generation before the current one: a reader that loaded the old manifest a moment
    # ago may still be reading its files.
    for pattern in ("vectors-*.faiss", "cases-*.csv", "thumbs-*.npy", "raw-*.npy"):
        for old in folder.glob(pattern):
            try:
                generation = int(old.stem.split("-")[-1])
            except ValueError:
                continue
            if generation <= current - _GENERATIONS_KEPT:
                old.unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
