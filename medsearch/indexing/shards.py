"""Shards: the cases a distributed run has encoded, on disk until they are committed to the index.

The Ray engine (:mod:`medsearch.indexing.ray_engine`) encodes cases on many workers; the driver
writes each completed group of cases as one shard, ``INDEX/local/shards/<name>.npz`` (site-only,
like all of ``local/``), and commits the shards into the index at the end, through the same
committer as the local engine (:class:`~medsearch.indexing.engine.Chunk`, the file-state cache, the
skip report). A shard is written atomically, so that its presence records it as done: a driver
killed mid-run finds its shards on the next run and encodes only the cases they lack.

A shard holds what the index will hold and no more: pseudonymous case ids, vectors, thumbnails and
the de-identified case rows, plus, for the skip report, the reasons files of a case were left out,
naming each file by its position in the case (never by its path). No path, UID, header value or
key is written. A fingerprint of the encoder and the preprocessing is kept too, so that shards of
another embedding space (an interrupted run with other settings) are never committed.

:class:`ShardCase` is one case's result (encoded or failed); :func:`write_shard` and
:func:`read_shard` are the file format; :class:`ShardFolder` lists the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from medsearch._files import write_bytes
from medsearch._json import json_default
from medsearch.embedding import SliceSet
from medsearch.io import SkippedFile, SkipReason
from medsearch.store import LOCAL_DIR

__all__ = ["SHARD_DIR", "ShardCase", "ShardFolder", "fingerprint", "read_shard", "write_shard"]

log = logging.getLogger(__name__)

#: where a distributed run keeps its shards until they are committed (site-only)
SHARD_DIR = f"{LOCAL_DIR}/shards"
_FORMAT = 1


@dataclass
class ShardCase:
    """One case's result from the workers: its vector, thumbnail and row, or a failure.

    ``skipped`` names the case's left-out files by their position in the case's file list, with
    the reason and detail of :class:`~medsearch.io.SkippedFile`; ``transient`` marks a failure that
    is not recorded in the file-state cache (a lost worker), as in the local engine.
    """

    case_id: str
    vector: np.ndarray | None
    thumbnail: np.ndarray | None = None
    row: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    n_files: int = 0
    n_images: int = 0
    transient: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    slices: SliceSet | None = None  # the case's slice vectors (float16), as the local engine keeps them

    @property
    def failed(self) -> bool:
        return self.vector is None

    def skipped_files(self, files: Sequence[Path]) -> list[SkippedFile]:
        """The skipped files as :class:`SkippedFile`, with the paths of this run's ``files`` of the case."""
        return [SkippedFile(files[i], SkipReason(reason), detail) for i, reason, detail in self.skipped if 0 <= i < len(files)]


def positions(files: Sequence[Path], skipped: Iterable[SkippedFile]) -> list[tuple[int, str, str]]:
    """``skipped`` as (position in ``files``, reason, detail): what a shard keeps instead of paths."""
    where = {path: i for i, path in enumerate(files)}
    return [(where[s.path], s.reason.value, s.detail) for s in skipped if s.path in where]


def fingerprint(encoder: Mapping[str, Any], preprocess: Mapping[str, Any]) -> str:
    """What makes two runs' vectors comparable: the encoder's identity and the preprocessing."""
    text = json.dumps({"encoder": dict(encoder), "preprocess": dict(preprocess)}, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_name(case_ids: Sequence[str]) -> str:
    """A shard's file name: a digest of its case ids, so that the same cases make the same name."""
    return hashlib.sha256("\n".join(case_ids).encode()).hexdigest()[:24] + ".npz"


def write_shard(folder: Path, cases: Sequence[ShardCase], *, print_: str) -> Path:
    """Write ``cases`` as one shard in ``folder`` (atomically, owner-only); return its path."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = [c.vector for c in cases if c.vector is not None]
    vectors = np.stack(found).astype(np.float32) if found else np.zeros((0, 0), np.float32)
    thumbs = [c.thumbnail for c in cases if c.vector is not None and c.thumbnail is not None]
    slice_sets = [c.slices for c in cases if c.vector is not None and c.slices is not None]
    meta = {
        "format": _FORMAT,
        "fingerprint": print_,
        "cases": [
            {"case_id": c.case_id, "ok": c.vector is not None, "thumbnail": c.thumbnail is not None, "row": c.row,
             "skipped": c.skipped, "n_files": c.n_files, "n_images": c.n_images, "transient": c.transient,
             "seconds": c.seconds,
             "slices": None if c.slices is None else {"indices": c.slices.indices.tolist(), "gap_mm": c.slices.gap_mm}}
            for c in cases
        ],
    }
    arrays = {
        "vectors": vectors,
        "thumbnails": np.stack(thumbs) if thumbs else np.zeros((0, 0, 0), np.uint8),
        "slice_vectors": (np.concatenate([s.vectors for s in slice_sets]).astype(np.float16) if slice_sets
                          else np.zeros((0, 0), np.float16)),
        "meta": np.frombuffer(json.dumps(meta, default=json_default).encode("utf-8"), np.uint8),
    }
    buffer = BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    path = folder / shard_name([c.case_id for c in cases])
    write_bytes(path, buffer.getbuffer(), mode=0o600)
    return path


def read_shard(path: Path) -> tuple[str, list[ShardCase]]:
    """The fingerprint and the cases of a shard file.

    Raises
    ------
    ValueError, OSError
        The file is not a readable shard (the caller drops it and encodes its cases again).
    """
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode("utf-8"))
        vectors, thumbs, slice_vectors = data["vectors"], data["thumbnails"], data["slice_vectors"]
    if meta.get("format") != _FORMAT:
        raise ValueError(f"shard format {meta.get('format')}")
    cases: list[ShardCase] = []
    v = t = s = 0
    for item in meta["cases"]:
        vector = thumb = slices = None
        if item["ok"]:
            vector, v = vectors[v], v + 1
            if item["thumbnail"]:
                thumb, t = thumbs[t], t + 1
            if item["slices"] is not None:
                indices = np.asarray(item["slices"]["indices"], np.int32)
                slices = SliceSet(slice_vectors[s:s + len(indices)], indices, item["slices"]["gap_mm"])
                s += len(indices)
        cases.append(ShardCase(
            case_id=item["case_id"], vector=vector, thumbnail=thumb, row=item["row"],
            skipped=[(int(i), str(r), str(d)) for i, r, d in item["skipped"]], n_files=int(item["n_files"]),
            n_images=int(item["n_images"]), transient=bool(item["transient"]), seconds=dict(item["seconds"]),
            slices=slices,
        ))
    return str(meta.get("fingerprint", "")), cases


class ShardFolder:
    """The shards already written under ``INDEX/local/shards/``: which case is in which file.

    Shards of another fingerprint, or that cannot be read, are left out (and removed with the rest
    once a run has committed everything).
    """

    def __init__(self, index_dir: Path, print_: str) -> None:
        self.folder = index_dir / SHARD_DIR
        self.fingerprint = print_
        self.where: dict[str, Path] = {}
        for path in sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []:
            try:
                found, cases = read_shard(path)
            except (ValueError, OSError, KeyError) as e:
                log.warning("shard %s cannot be read (%s); its cases are encoded again", path.name, e)
                continue
            if found != print_:
                log.warning("shard %s was made with other encoder settings; its cases are encoded again", path.name)
                continue
            for case in cases:
                self.where.setdefault(case.case_id, path)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.where

    def add(self, cases: Sequence[ShardCase]) -> Path:
        path = write_shard(self.folder, cases, print_=self.fingerprint)
        for case in cases:
            self.where.setdefault(case.case_id, path)
        return path

    def load(self, case_ids: Iterable[str]) -> Iterable[ShardCase]:
        """The cases named (those the folder holds), in the order of the shards they first appear in."""
        wanted = [c for c in case_ids if c in self.where]
        order: dict[Path, None] = dict.fromkeys(self.where[c] for c in wanted)
        keep = set(wanted)
        for path in order:
            _, cases = read_shard(path)
            for case in cases:
                if case.case_id in keep:
                    keep.discard(case.case_id)
                    yield case

    def clear(self) -> None:
        """Remove every shard (after a run committed them all)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
        self.where.clear()
