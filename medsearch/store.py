"""The index directory: a faiss index of case embeddings beside a table of non-identifying metadata.

Layout of an index directory::

    manifest.json          what the index holds: format, dimension, metric, encoder, preprocessing,
                           counts, and the name, size and SHA-256 of every data file
    vectors-<gen>.faiss    the faiss index (row i = row i of the case table)
    cases-<gen>.csv        one row per case: pseudonymous case id and allow-listed metadata
    thumbs-<gen>.npy       optional: one small uint8 gray thumbnail per case, for result sheets
    <extra files>          reports written with a commit (skip report, run summary)

Every commit writes a new generation of data files, fsyncs them, and then replaces ``manifest.json``
atomically; the generation before is kept until the next commit. A reader therefore always sees a
complete old or new state, and a run killed mid-write leaves the previous index intact.

Distances: for the ``cosine`` metric the store keeps L2-normalized vectors in an inner-product index
and reports ``distance = 1 - cosine similarity``; for ``l2`` it reports the Euclidean distance. In
both, lower is closer and an identical vector has distance 0.

This module takes float32 arrays; it never imports torch or an encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from medsearch.config import Metric
from medsearch.errors import EncoderMismatchError, IndexCorruptError, IndexNotFoundError

__all__ = ["FORMAT_VERSION", "IndexStore", "SearchHits"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_GENERATIONS_KEPT = 2


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
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.index = index
        self.cases = cases
        # (n, T, T) uint8 aligned with the case table, or None when the index keeps no thumbnails
        self.thumbnails = thumbnails
        self._ids = set(cases["case_id"]) if len(cases) else set()

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
    ) -> IndexStore:
        """A new, empty index (in memory until :meth:`commit`).

        Raises
        ------
        FileExistsError
            ``path`` already holds an index; open it with :meth:`open` instead.
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
        return cls(path, manifest, _new_faiss(dim, metric), pd.DataFrame({"case_id": pd.Series(dtype=str)}))

    @classmethod
    def open(cls, path: str | Path) -> IndexStore:
        """Load an index directory, checking every file against the manifest (see :meth:`_open_once`).

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
                return cls._open_once(path)
            except IndexCorruptError:
                if retries == 0 or read_manifest(path).get("generation") == generation:
                    raise
                retries -= 1

    @classmethod
    def _open_once(cls, path: str | Path) -> IndexStore:
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
        vectors = _read_checked(path, files["vectors"])
        cases_bytes = _read_checked(path, files["cases"])
        try:
            index = faiss.deserialize_index(np.frombuffer(vectors, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexCorruptError(f"{path / files['vectors']['name']} is not a readable faiss index; rebuild the index") from e
        cases = pd.read_csv(StringIO(cases_bytes.decode("utf-8")), dtype={"case_id": str}, keep_default_na=True)
        thumbnails = None
        if "thumbnails" in files:
            thumbnails = np.load(BytesIO(_read_checked(path, files["thumbnails"])), allow_pickle=False)
            if len(thumbnails) != len(cases):
                raise IndexCorruptError(
                    f"{path}: {len(thumbnails)} thumbnails for {len(cases)} cases; rebuild the index"
                )
        if index.ntotal != len(cases) or index.d != manifest["dim"]:
            raise IndexCorruptError(
                f"{path}: the faiss index holds {index.ntotal} vectors of dimension {index.d} but the case table "
                f"has {len(cases)} rows and the manifest says dimension {manifest['dim']}; rebuild the index"
            )
        return cls(path, manifest, index, cases, thumbnails)

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
        vectors, rows = vectors[fresh], rows.loc[fresh]
        if thumbnails is not None:
            thumbnails = np.asarray(thumbnails, dtype=np.uint8)
            if thumbnails.ndim != 3 or len(thumbnails) != len(fresh):
                raise ValueError(f"thumbnails must be (n, T, T) uint8 with n = {len(fresh)}, got {thumbnails.shape}")
            self._add_thumbnails(thumbnails[fresh])
        elif self.thumbnails is not None:
            size = self.thumbnails.shape[1:]
            self._add_thumbnails(np.zeros((int(fresh.sum()), *size), np.uint8))
        if self.metric is Metric.COSINE:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.index.add(vectors)
        rows = rows.reset_index(drop=True)
        # concat with an empty table would turn every new column into float (all-NA upcast)
        self.cases = rows if self.cases.empty else pd.concat([self.cases, rows], ignore_index=True)
        self._ids.update(rows["case_id"])

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

    def search(self, vectors: np.ndarray, k: int = 10) -> SearchHits:
        """The ``k`` nearest cases of each query vector, closest first."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors must have dimension {self.dim}, got {vectors.shape[1]}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self.metric is Metric.COSINE:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores, ids = self.index.search(vectors, min(k, max(len(self), 1)))
        if self.metric is Metric.COSINE:
            distances = 1.0 - scores
        else:
            distances = np.sqrt(np.maximum(scores, 0.0))
        distances = np.where(ids < 0, np.inf, np.maximum(distances, 0.0)).astype(np.float32)
        return SearchHits(distances=distances, ids=ids.astype(np.int64))

    def vectors(self) -> np.ndarray:
        """All stored vectors, in case-table order (for evaluation and export)."""
        return self.index.reconstruct_n(0, self.index.ntotal) if len(self) else np.zeros((0, self.dim), np.float32)

    # -- writing ----------------------------------------------------------------------------------

    def commit(self, *, extra: Mapping[str, bytes] | None = None, info: Mapping[str, Any] | None = None) -> None:
        """Write the index to disk as a new generation, then switch the manifest to it atomically.

        ``extra`` files (reports) are written atomically beside the data files; ``info`` is merged
        into the manifest (e.g. run counts).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        generation = int(self.manifest.get("generation", 0)) + 1
        vectors = faiss.serialize_index(self.index).tobytes()
        cases = self.cases.to_csv(index=False).encode("utf-8")
        files = {
            "vectors": _write_file(self.path, f"vectors-{generation:06d}.faiss", vectors),
            "cases": _write_file(self.path, f"cases-{generation:06d}.csv", cases),
        }
        if self.thumbnails is not None:
            buffer = BytesIO()
            np.save(buffer, self.thumbnails, allow_pickle=False)
            files["thumbnails"] = _write_file(self.path, f"thumbs-{generation:06d}.npy", buffer.getvalue())
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


def _new_faiss(dim: int, metric: Metric) -> faiss.Index:
    return faiss.IndexFlatIP(dim) if metric is Metric.COSINE else faiss.IndexFlatL2(dim)


def _write_file(folder: Path, name: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``folder/name`` atomically (temporary file, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_checked(folder: Path, entry: Mapping[str, Any]) -> bytes:
    path = folder / str(entry.get("name", ""))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if len(data) != entry.get("bytes"):
        raise IndexCorruptError(
            f"index file {path} has {len(data)} bytes, the manifest says {entry.get('bytes')} (truncated?); rebuild the index"
        )
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise IndexCorruptError(f"index file {path} does not match its checksum in the manifest; rebuild the index")
    return data


def _drop_old_generations(folder: Path, current: int) -> None:
    # Keep the generation before the current one: a reader that loaded the old manifest a moment
    # ago may still be reading its files.
    for pattern in ("vectors-*.faiss", "cases-*.csv", "thumbs-*.npy"):
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
