"""An IVF-PQ index larger than memory: inverted lists in a file, exact vectors beside, both memory-mapped.

:func:`build_ondisk` trains an IVF-PQ index (the same OPQ + IVF + PQ recipe and parameters as the
in-memory ``ivfpq`` type, :func:`~medsearch.store.faiss_index.empty_index`) on a sample, encodes the
vectors shard by shard (each shard's inverted lists built apart, written, then the shards merged
into one faiss ``OnDiskInvertedLists`` file), and writes the exact vectors beside them as float16
(2 * dim bytes per vector) for re-ranking. :class:`OnDiskIVFPQ` opens such a folder with both files
memory-mapped: a query reads the coarse centroids and the PQ tables (held in memory: tens of MB),
the ``nprobe`` lists it scans and the exact vectors of its candidates only, so resident memory stays
far below the collection's size.

The folder is written under a temporary name and renamed into place (with its files fsynced), so
a reader never meets a half-written index; an existing folder is replaced in two renames, and a
build that dies leaves only the temporary folder, which the next build removes.

Layout of a folder: ``index.faiss`` (the trained index; its lists point to the file beside it),
``lists.ivfdata`` (the inverted lists), ``exact.npy`` (``(n, dim)`` float16, normalized for cosine)
and ``ondisk.json`` (size, dimension, metric, parameters).

Scores follow :mod:`medsearch.store.faiss_index`: inner products (cosine) or squared l2 distances.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from medsearch._files import fsync_dir, sha256_file
from medsearch.config import IndexType, Metric
from medsearch.errors import IndexCorruptError
from medsearch.store import faiss_index as fx
from medsearch.store.files import FileEntry, generation_file
from medsearch.store.half import to_float32

__all__ = ["ONDISK_META", "OnDiskIVFPQ", "build_ondisk", "ondisk_params"]

log = logging.getLogger(__name__)

ONDISK_META = "ondisk.json"
_INDEX, _LISTS, _EXACT = "index.faiss", "lists.ivfdata", "exact.npy"
_FORMAT = 1
#: vectors per shard: each shard's lists are built in memory (about 80 bytes per vector), then merged
SHARD_VECTORS = 1_000_000
_CHUNK = 65_536


def ondisk_params(n: int, dim: int, *, pq_bytes: int = 64) -> dict[str, Any]:
    """Build parameters for ``n`` vectors: those of ``ivfpq`` (about sqrt(n) lists, OPQ), with
    ``pq_bytes``-byte codes (the lists are on disk, so the memory budget does not bound them)."""
    return fx.build_params(IndexType.IVFPQ, n, dim, memory_budget_mb=max(1.0, n * (pq_bytes + 8) / 2**20), on_disk=True)


@dataclass
class OnDiskIVFPQ:
    """An on-disk IVF-PQ index, opened memory-mapped (see the module's docstring)."""

    path: Path
    index: faiss.Index
    exact: np.ndarray  # (n, dim) float16 memmap
    metric: Metric
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> OnDiskIVFPQ:
        """Open a folder :func:`build_ondisk` wrote; the lists and exact vectors stay on disk.

        Raises
        ------
        IndexCorruptError
            A file is missing, unreadable, or of another size than ``ondisk.json`` says.
        """
        path = Path(path)
        try:
            meta = json.loads((path / ONDISK_META).read_text())
            # the lists file is found beside the index file, wherever the folder has moved
            with _faiss_quiet():
                index = faiss.read_index(str(path / _INDEX), faiss.IO_FLAG_ONDISK_SAME_DIR)
            exact = np.load(path / _EXACT, mmap_mode="r")
            _random_access(exact)
        except (OSError, ValueError, RuntimeError) as e:
            raise IndexCorruptError(f"{path} is not a complete on-disk index ({e}); build it again") from e
        n, dim = int(meta["n"]), int(meta["dim"])
        if meta.get("format") != _FORMAT or index.ntotal != n or index.d != dim or exact.shape != (n, dim):
            raise IndexCorruptError(
                f"{path}: {index.ntotal} coded and {exact.shape[0]} exact vectors where {ONDISK_META} says {n}; build it again"
            )
        fx.single_query_on_all_cores(faiss.extract_index_ivf(index))
        return cls(path, index, exact, Metric(meta["metric"]), dict(meta["params"]))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int = 64, rerank: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` best rows for each query (normalized for cosine, as stored).

        The ``k * rerank`` best candidates by their codes are scored again with their exact vectors
        (read from ``exact.npy`` for those rows only); ``rerank=0`` keeps the codes' scores. Default:
        the index's own (``params["rerank"]``).
        """
        if rerank is None:
            rerank = int(self.params.get("rerank", fx.DISK_RERANK))
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.index.d)
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = min(nprobe, ivf.nlist)
        k = max(1, min(k, len(self)))
        if rerank <= 1:
            return self.index.search(queries, k)
        _, candidates = self.index.search(queries, min(k * rerank, len(self)))
        return fx.rerank(queries, candidates, k, metric=self.metric, exact_rows=self._exact_rows)

    def _exact_rows(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")  # in file order: fewer, longer reads
        out = np.empty((len(rows), self.exact.shape[1]), np.float32)
        out[order] = to_float32(self.exact[rows[order]])
        return out


def _random_access(array: np.ndarray) -> None:
    """Tell the kernel that rows of a memory-mapped array are read at random: no read-ahead, so a
    query reads (and keeps resident) the pages of its candidates, not megabytes around each."""
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)


def build_ondisk(
    path: str | Path,
    chunks: Iterable[np.ndarray],
    *,
    n: int,
    dim: int,
    metric: Metric | str = Metric.COSINE,
    train: np.ndarray | None = None,
    params: Mapping[str, Any] | None = None,
    trained: faiss.Index | None = None,
    shard_vectors: int = SHARD_VECTORS,
) -> OnDiskIVFPQ:
    """Build an on-disk IVF-PQ index of ``n`` vectors at ``path`` (a folder, replaced atomically).

    Parameters
    ----------
    chunks
        The ``n`` vectors, float32 or float16, in chunks of any size (read once, in order; row ``i``
        of the whole gets id ``i``). For cosine they are normalized here.
    train
        A sample of the vectors to train on (see ``params["train_size"]``; a random sample is best).
    params
        Build parameters (default :func:`ondisk_params`).
    trained
        Instead of ``train``: an empty IVF-PQ index already trained (of
        :func:`~medsearch.store.faiss_index.empty_index`), used as it is (an in-memory ``ivfpq``
        index's own quantizers, emptied, give the same codes on disk).
    shard_vectors
        Vectors whose lists are built in memory before they are written out as one shard.

    Raises
    ------
    ValueError
        The chunks hold another number of vectors than ``n``, or another dimension.
    """
    path, metric = Path(path), Metric(metric)
    params = dict(params or ondisk_params(n, dim))
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        if trained is None:
            if train is None:
                raise ValueError("give train (a sample of the vectors) or trained (a trained empty index)")
            trained = fx.empty_index(IndexType.IVFPQ, params, dim, metric)
            trained.train(fx.normalized(np.asarray(train, dtype=np.float32), metric))
        _build(work, trained, chunks, n=n, dim=dim, metric=metric, shard_vectors=shard_vectors, lists_at=path / _LISTS)
        meta = {"format": _FORMAT, "n": n, "dim": dim, "metric": metric.value, "params": params}
        (work / ONDISK_META).write_text(json.dumps(meta, indent=1))
        _fsync(work, ONDISK_META)
        fsync_dir(work)
        _swap_into_place(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("built an on-disk ivfpq index of %d vectors in %.1f s", n, time.perf_counter() - started)
    return OnDiskIVFPQ.open(path)


def _build(
    work: Path, trained: faiss.Index, chunks: Iterable[np.ndarray], *,
    n: int, dim: int, metric: Metric, shard_vectors: int, lists_at: Path,
) -> None:
    """Write ``index.faiss``, ``lists.ivfdata`` and ``exact.npy`` into ``work`` (fsynced); the
    index names its lists file ``lists_at``, where it will be once moved into place."""
    trained = faiss.clone_index(trained)
    exact = np.lib.format.open_memmap(work / _EXACT, mode="w+", dtype=np.float16, shape=(n, dim))
    shards = _encode_shards(work, trained, chunks, exact, n=n, dim=dim, metric=metric, shard_vectors=shard_vectors)
    exact.flush()
    del exact
    with _faiss_quiet():
        _merge(work, trained, shards, n, final=lists_at)
    for shard in shards:
        shard.unlink()
    _fsync(work, _INDEX, _LISTS, _EXACT)


def _fsync(folder: Path, *names: str) -> None:
    for name in names:
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())


def _encode_shards(
    work: Path, trained: faiss.Index, chunks: Iterable[np.ndarray], exact: np.ndarray, *,
    n: int, dim: int, metric: Metric, shard_vectors: int,
) -> list[Path]:
    """Encode the vectors into per-shard indexes (written to ``work``); copy them into ``exact``."""
    shards: list[Path] = []
    shard = faiss.clone_index(trained)
    start = in_shard = 0

    def flush() -> None:
        nonlocal shard, in_shard
        if in_shard:
            target = work / f"shard-{len(shards):05d}.faiss"
            faiss.write_index(shard, str(target))
            shards.append(target)
        shard, in_shard = faiss.clone_index(trained), 0

    for chunk in chunks:
        chunk = fx.normalized(np.asarray(chunk, dtype=np.float32).reshape(-1, dim), metric).astype(np.float32)
        if start + len(chunk) > n:
            raise ValueError(f"the chunks hold more than the n = {n} vectors announced")
        offset = 0
        while offset < len(chunk):
            part = chunk[offset:offset + max(1, shard_vectors - in_shard)]
            offset += len(part)
            ids = np.arange(start, start + len(part), dtype=np.int64)
            shard.add_with_ids(part, ids)
            exact[start:start + len(part)] = part
            start += len(part)
            in_shard += len(part)
            if in_shard >= shard_vectors:
                flush()
    flush()
    if start != n:
        raise ValueError(f"the chunks held {start} vectors where n = {n} was announced")
    return shards


def _merge(work: Path, trained: faiss.Index, shards: list[Path], n: int, *, final: Path) -> None:
    """Merge the shards' inverted lists into one on-disk lists file; write the index that points to it."""
    opened = [faiss.read_index(str(s), faiss.IO_FLAG_MMAP) for s in shards]
    lists = [faiss.extract_index_ivf(index).invlists for index in opened]
    ivf = faiss.extract_index_ivf(trained)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(work / _LISTS))
    if lists:
        pointers = faiss.InvertedListsPtrVector()
        for il in lists:
            pointers.push_back(il)
        ondisk.merge_from_multiple(pointers.data(), pointers.size(), False, False)
    ondisk.filename = str(final)  # where the lists will be once the folder is renamed
    ivf.replace_invlists(ondisk, False)  # (ondisk stays alive here until the index is written)
    ivf.ntotal = trained.ntotal = n
    faiss.write_index(trained, str(work / _INDEX))
    del opened, lists, ondisk


@contextlib.contextmanager
def _faiss_quiet() -> Iterator[None]:
    """Keep faiss's notes on the on-disk lists (printed to the process's stdout) off ``medsearch``'s output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _swap_into_place(work: Path, path: Path) -> None:
    """Rename the finished folder to ``path``; an existing one is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(work, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- the store's ivfpq-disk form --------------------------------------------------------------------


def wanted(requested: IndexType, n: int, dim: int, *, memory_budget_mb: float) -> bool:
    """Whether a store that asked for ``requested`` keeps its (ivfpq) index on disk at ``n`` vectors."""
    if requested is IndexType.AUTO:
        requested = fx.choose_index_type(n, dim, memory_budget_mb=memory_budget_mb)
    return requested is IndexType.IVFPQ_DISK


def write_generation(
    folder: Path, generation: int, index: faiss.Index, parts: list[np.ndarray], *, metric: Metric
) -> tuple[dict[str, FileEntry], np.ndarray]:
    """Write an ivfpq index's on-disk form as generation ``generation`` of the index directory.

    ``vectors-<gen>.faiss`` (the trained index, its lists in the next file), ``lists-<gen>.ivfdata``
    (every code, merged from shards) and ``raw-<gen>.npy`` (the exact vectors ``parts``, float16).
    The codes are those of ``index`` (the same quantizers); ``index`` itself is left as it is.
    Nothing reads these files before the manifest names them. Returns their manifest entries and
    the exact vectors, memory-mapped.
    """
    for stale in folder.glob(".ondisk-*"):
        shutil.rmtree(stale, ignore_errors=True)
    names = {role: generation_file(role, generation) for role in ("vectors", "lists", "raw")}
    work = Path(tempfile.mkdtemp(prefix=f".ondisk-{generation}-", dir=folder))
    try:
        n = sum(len(part) for part in parts)
        chunks = (part[start:start + _CHUNK] for part in parts for start in range(0, len(part), _CHUNK))
        _build(work, _empty_like(index), chunks, n=n, dim=index.d, metric=metric, shard_vectors=SHARD_VECTORS,
               lists_at=folder / names["lists"])
        entries = {}
        for role, built in (("vectors", _INDEX), ("lists", _LISTS), ("raw", _EXACT)):
            os.replace(work / built, folder / names[role])
            entries[role] = FileEntry(name=names[role], size=(folder / names[role]).stat().st_size,
                                      sha256=sha256_file(folder / names[role]))
        fsync_dir(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    exact = np.load(folder / names["raw"], mmap_mode="r")
    _random_access(exact)
    return entries, exact


def read_index(path: Path, *, on_disk: bool) -> faiss.Index:
    """Read a faiss index file; ``on_disk``: its lists file beside it is memory-mapped, not loaded."""
    if not on_disk:
        return faiss.read_index(str(path))
    with _faiss_quiet():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def writable(index: faiss.Index) -> faiss.Index:
    """``index`` with on-disk lists copied into memory (before adding to it: the files of a
    committed generation are never changed); any other index as it is."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
        return index
    lists = ivf.invlists
    memory = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size:
            memory.add_entries(i, size, lists.get_ids(i), lists.get_codes(i))
    ivf.replace_invlists(memory, True)
    memory.this.disown()  # the index owns it now
    return index


def _empty_like(index: faiss.Index) -> faiss.Index:
    """A copy of a trained ivfpq ``index`` without its vectors (its lists are never copied)."""
    ivf = faiss.extract_index_ivf(index)
    lists, owned, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # (kept alive here: the index does not own it)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    ivf.ntotal = index.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, owned)
        del empty
        ivf.ntotal = index.ntotal = ntotal
