"""The on-disk format of an index directory: the manifest, generations of data files, checksums.

Layout of an index directory::

    manifest.json          what the index holds: format, dimension, metric, encoder, preprocessing,
                           counts, and the name, size and SHA-256 of every data file (:class:`Manifest`)
    vectors-<gen>.faiss    the faiss index (row i = row i of the case table)
    raw-<gen>.npy          ivfpq indexes only: the exact vectors, memory-mapped
    slices-<gen>.npy       optional: the slice vectors of every case, float16, memory-mapped
    slicetab-<gen>.npz     with them: which rows belong to which case, their stack indices and slice gaps
                           (:mod:`medsearch.store.slices`)
    crops-<gen>.npy        optional (``crop_grid``): the vectors of tiles of every kept slice, float16
    croptab-<gen>.npz      with them: as slicetab, plus each tile's box in pixels
    cases-<gen>.csv        one row per case: pseudonymous case id and allow-listed metadata
    thumbs-<gen>.npy       optional: one small uint8 gray thumbnail per case, for result sheets
    <extra files>          reports written with a commit
    local-verified.json    which data files were checked against their SHA-256 on this machine
                           (see :class:`VerifiedFiles`); names no source file, left behind by an export
    local/                 site-only state of the indexing runs (:data:`LOCAL_DIR`): the skip report
                           and the file-state cache, which name source files; owner-only, never
                           exported. Everything else in the folder names no patient and no source file.

Every commit writes a new generation of data files (:func:`generation_file`), then replaces
``manifest.json`` atomically (:func:`write_manifest`); :func:`drop_old_generations` keeps the
generation before, for readers that loaded the old manifest a moment ago.

Opening an index checks every data file's size against the manifest, always, and its SHA-256 when
the file is not known to be verified (:func:`check_file`, :func:`read_checked`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from medsearch._files import sha256_stream, write_bytes, write_file_with, write_text
from medsearch.config import IndexConfig, IndexType, Metric
from medsearch.errors import IndexCorruptError, IndexNotFoundError

__all__ = [
    "DISTANCE_TEXT",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCAL_DIR",
    "MANIFEST",
    "VERIFIED_CACHE",
    "FileEntry",
    "IndexSection",
    "Manifest",
    "VerifiedFiles",
    "check_file",
    "drop_old_generations",
    "generation_file",
    "open_raw",
    "read_checked",
    "read_manifest",
    "write_file",
    "write_file_by",
    "write_manifest",
    "write_raw",
]

log = logging.getLogger(__name__)

FORMAT = "medsearch-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the sub-folder of site-only state (skip report, file-state cache): it names source files, so it
#: is created owner-only and never leaves the site; the rest of an index folder may
LOCAL_DIR = "local"
#: owner-only, local to this machine: data files whose SHA-256 was checked here (see VerifiedFiles)
VERIFIED_CACHE = "local-verified.json"
DISTANCE_TEXT = {
    Metric.COSINE: "1 - cosine similarity (0 = same direction; lower is closer)",
    Metric.L2: "Euclidean distance between embeddings (lower is closer)",
}
_GENERATIONS_KEPT = 2
#: the data file of each role in generation <gen>: (stem, suffix) -> ``vectors-000003.faiss``
_GENERATION_FILES = {"vectors": ("vectors", ".faiss"), "cases": ("cases", ".csv"), "thumbnails": ("thumbs", ".npy"), "raw": ("raw", ".npy"),
                     "slices": ("slices", ".npy"), "slice_table": ("slicetab", ".npz"), "crops": ("crops", ".npy"), "crop_table": ("croptab", ".npz"),
                     "lists": ("lists", ".ivfdata")}
_RAW_CHUNK = 65_536  # rows of the exact vectors handed to the writer at a time
_DEFAULTS = IndexConfig()
# A file modified within this long after it was hashed could keep its modification time (file
# systems stamp times at a coarse tick: ~10 ms on Linux, 1 s on ext3, 2 s on FAT); a verification
# made that soon after the last write is not trusted (git calls such entries "racily clean").
_RACY_NS = 2_000_000_000


# -- the manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """A data file of an index: its name in the index directory, size in bytes, and SHA-256."""

    name: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileEntry:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for a malformed entry."""
        name, size, sha256 = data["name"], data["bytes"], data["sha256"]
        if not isinstance(name, str) or not isinstance(sha256, str) or isinstance(size, bool) or not isinstance(size, int):
            raise TypeError("a file entry needs a text name and sha256 and a whole number of bytes")
        return cls(name=name, size=size, sha256=sha256)


@dataclass
class IndexSection:
    """The manifest's ``index`` section: the faiss index type asked for and built, and its knobs.

    ``requested`` is what the settings ask for (``auto`` included); ``kind`` the type built now
    (``flat`` while an ivfpq waits for enough vectors, then ``note`` says why); ``params`` its build
    parameters; ``built_for`` how many vectors it was built (trained) for.
    """

    requested: IndexType = IndexType.FLAT
    kind: IndexType = IndexType.FLAT
    params: dict[str, Any] = field(default_factory=dict)
    built_for: int = 0
    note: str = ""
    memory_budget_mb: int = _DEFAULTS.memory_budget_mb
    ef_search: int = _DEFAULTS.ef_search
    nprobe: int = _DEFAULTS.nprobe

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested.value,
            "type": self.kind.value,
            "params": self.params,
            "built_for": self.built_for,
            "note": self.note,
            "memory_budget_mb": self.memory_budget_mb,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str | Path = MANIFEST) -> IndexSection:
        """The section from its JSON form; ``source`` names the manifest in messages.

        Raises
        ------
        IndexCorruptError
            An unknown index type, or a malformed section.
        """
        if not isinstance(data, dict):
            raise IndexCorruptError(f"{source} has a malformed 'index' field; rebuild the index")
        try:
            kind = IndexType(data.get("type", IndexType.FLAT.value))
            requested = IndexType(data.get("requested", kind.value))
        except ValueError:
            raise IndexCorruptError(f"{source} names an unknown index type; rebuild the index") from None
        try:
            return cls(
                requested=requested,
                kind=kind,
                params=dict(data.get("params", {})),
                built_for=int(data.get("built_for", 0)),
                note=str(data.get("note", "")),
                memory_budget_mb=int(data.get("memory_budget_mb", _DEFAULTS.memory_budget_mb)),
                ef_search=int(data.get("ef_search", _DEFAULTS.ef_search)),
                nprobe=int(data.get("nprobe", _DEFAULTS.nprobe)),
            )
        except (TypeError, ValueError):
            raise IndexCorruptError(f"{source} has a malformed 'index' field; rebuild the index") from None

    def record_build(self, kind: IndexType, params: dict[str, Any], built_for: int, note: str) -> None:
        """Record that the faiss index was (re)built as ``kind`` with ``params`` for ``built_for`` vectors."""
        self.kind, self.params, self.built_for, self.note = kind, params, built_for, note


# Keys every manifest of this format holds, besides format and format_version; "index" is optional
# (manifests written before index types had none: such an index is flat), so are the rest.
_REQUIRED = ("dim", "metric", "distance", "encoder", "preprocess", "key_check", "generation", "counts", "label_columns", "files")
_OPTIONAL = ("index", "updated", "config", "last_run")


@dataclass
class Manifest:
    """What ``manifest.json`` holds, as named fields; read and written as the same JSON.

    ``config`` (the settings the index was built with) and ``last_run`` (the report of the last
    indexing run) are recorded when an index is built; ``extra`` keeps any other key a commit
    recorded (``IndexStore.commit(info=...)``), as it was. Both are absent from an index built
    with :class:`~medsearch.store.IndexStore` alone.
    """

    dim: int
    metric: Metric
    distance: str
    encoder: dict[str, Any]
    preprocess: dict[str, Any]
    key_check: str = ""
    generation: int = 0
    counts: dict[str, Any] = field(default_factory=lambda: {"cases": 0})
    label_columns: list[str] = field(default_factory=list)
    files: dict[str, FileEntry] = field(default_factory=dict)
    index: IndexSection = field(default_factory=IndexSection)
    updated: str | None = None
    config: dict[str, Any] | None = None
    last_run: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(
        cls, *, dim: int, metric: Metric, encoder: Mapping[str, Any], preprocess: Mapping[str, Any], key_check: str = ""
    ) -> Manifest:
        """The manifest of a new, empty index (generation 0: nothing written yet)."""
        return cls(
            dim=int(dim), metric=metric, distance=DISTANCE_TEXT[metric], encoder=dict(encoder),
            preprocess=dict(preprocess), key_check=key_check,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as ``manifest.json`` holds it (``updated``, ``config``, ``last_run`` only when set)."""
        data: dict[str, Any] = {
            **self.extra,
            "format": self.format,
            "format_version": self.format_version,
            "dim": self.dim,
            "metric": self.metric.value,
            "distance": self.distance,
            "encoder": self.encoder,
            "preprocess": self.preprocess,
            "key_check": self.key_check,
            "generation": self.generation,
            "counts": self.counts,
            "label_columns": self.label_columns,
            "files": {role: entry.to_dict() for role, entry in self.files.items()},
            "index": self.index.to_dict(),
        }
        for name in ("updated", "config", "last_run"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, *, source: str | Path = MANIFEST) -> Manifest:
        """A manifest from its JSON form; ``source`` names the file in messages.

        Raises
        ------
        IndexCorruptError
            ``data`` is of another format or version, lacks a field, or has a malformed one.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IndexCorruptError(f"{source} is not a medsearch manifest; rebuild the index")
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexCorruptError(
                f"{source} has format version {data.get('format_version')}, this medsearch reads "
                f"{FORMAT_VERSION}; rebuild the index with this version"
            )
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise IndexCorruptError(
                f"{source} lacks the field(s) {', '.join(missing)}; the file is damaged or was edited: rebuild the index"
            )
        try:
            metric = Metric(data["metric"])
        except ValueError:
            raise IndexCorruptError(f"{source} names an unknown metric {data['metric']!r}; rebuild the index") from None
        try:
            files = {str(role): FileEntry.from_dict(entry) for role, entry in _typed(data, "files", dict, source).items()}
        except (KeyError, TypeError, AttributeError):
            raise IndexCorruptError(f"{source} has a malformed 'files' field; rebuild the index") from None
        known = {"format", "format_version", *_REQUIRED, *_OPTIONAL}
        return cls(
            dim=_typed(data, "dim", int, source),
            metric=metric,
            distance=_typed(data, "distance", str, source),
            encoder=_typed(data, "encoder", dict, source),
            preprocess=_typed(data, "preprocess", dict, source),
            key_check=_typed(data, "key_check", str, source),
            generation=_typed(data, "generation", int, source),
            counts=_typed(data, "counts", dict, source),
            label_columns=_typed(data, "label_columns", list, source),
            files=files,
            index=IndexSection.from_dict(data["index"], source=source) if "index" in data else IndexSection(),
            updated=_typed(data, "updated", str, source) if "updated" in data else None,
            config=_typed(data, "config", dict, source) if "config" in data else None,
            last_run=_typed(data, "last_run", dict, source) if "last_run" in data else None,
            extra={k: v for k, v in data.items() if k not in known},
        )

    def with_info(self, info: Mapping[str, Any]) -> Manifest:
        """A copy with ``info`` recorded: ``config`` and ``last_run`` by name, other keys kept in ``extra``.

        Raises
        ------
        ValueError
            A key names a field the store keeps itself (``dim``, ``files``...).
        """
        own = sorted(set(info) & {"format", "format_version", *_REQUIRED, "index", "updated"})
        if own:
            raise ValueError(f"info may not replace the manifest's own field(s) {', '.join(own)}")
        extra = {**self.extra, **{k: v for k, v in info.items() if k not in ("config", "last_run")}}
        return dataclasses.replace(
            self,
            config=info.get("config", self.config),
            last_run=info.get("last_run", self.last_run),
            extra=extra,
        )

    def committed(self, *, generation: int, files: Mapping[str, FileEntry], cases: int, columns: Iterable[str]) -> Manifest:
        """A copy for a commit of ``generation``: its data files, the case count, the label columns still
        present among the case table's ``columns``, and the time."""
        present = set(columns)
        return dataclasses.replace(
            self,
            generation=generation,
            files=dict(files),
            counts={**self.counts, "cases": cases},
            label_columns=[c for c in self.label_columns if c in present],
            updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )


def _typed(data: Mapping[str, Any], name: str, kind: type, source: str | Path) -> Any:
    """``data[name]``, which must be a ``kind`` (a bool is not a number here)."""
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise IndexCorruptError(
            f"{source} has a malformed {name!r} field ({type(value).__name__}, not {kind.__name__}); rebuild the index"
        )
    return value


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of an index directory.

    Raises
    ------
    IndexNotFoundError
        ``path`` does not exist or holds no manifest.
    IndexCorruptError
        The manifest is not readable JSON, of another format or version, lacks a field or has a
        malformed one.
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
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexCorruptError(f"{manifest_path} is not readable JSON; rebuild the index") from e
    return Manifest.from_dict(data, source=manifest_path)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace ``folder/manifest.json`` atomically: the switch to a new generation."""
    write_bytes(folder / MANIFEST, manifest.to_json().encode("utf-8"))


# -- data files and generations ---------------------------------------------------------------------


def generation_file(role: str, generation: int) -> str:
    """The name of a data file of ``role`` (``vectors``, ``cases``, ``thumbnails``, ``raw``, ``slices``,
    ``slice_table``, ``crops``, ``crop_table``) in ``generation``."""
    stem, suffix = _GENERATION_FILES[role]
    return f"{stem}-{generation:06d}{suffix}"


def write_file(folder: Path, name: str, data: bytes | Iterable[bytes | memoryview]) -> FileEntry:
    """Write ``data`` (bytes, or chunks of them) to ``folder/name`` atomically; its manifest entry."""
    digest, size = write_bytes(folder / name, data)
    return FileEntry(name=name, size=size, sha256=digest)


def write_file_by(folder: Path, name: str, writer: Callable[[str], Any]) -> FileEntry:
    """Atomically write what ``writer`` writes to the path it is given (``faiss.write_index``): streamed,
    and hashed from the disk in blocks, so no serialized copy is held in memory. Its manifest entry."""
    digest, size = write_file_with(folder / name, writer)
    return FileEntry(name=name, size=size, sha256=digest)


def write_raw(
    folder: Path, name: str, parts: Iterable[np.ndarray], *, rows: int, dim: int, dtype: type = np.float32
) -> FileEntry:
    """Write the exact vectors (``parts``, ``rows`` in all) as one ``.npy`` file of ``dtype`` (float32;
    the slice vectors: float16), streamed in chunks."""
    header = BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (rows, dim)}
    )
    chunks = (np.ascontiguousarray(part[i:i + _RAW_CHUNK]).data.cast("B")
              for part in parts for i in range(0, len(part), _RAW_CHUNK))
    return write_file(folder, name, _chain(header.getvalue(), chunks))


def _chain(first: bytes, rest: Iterable[memoryview]) -> Iterable[bytes | memoryview]:
    yield first
    yield from rest


def open_raw(folder: Path, entry: FileEntry | None, *, rows: int, dim: int) -> np.ndarray:
    """The exact vectors of an ivfpq index, memory-mapped; size and shape checked (the checksum when read whole).

    Raises
    ------
    IndexCorruptError
        The manifest lists no such file, or it is missing, unreadable, or of another shape or size.
    """
    if entry is None:
        raise IndexCorruptError(f"{folder / MANIFEST} lists no exact vectors (raw) for an ivfpq index; rebuild the index")
    path = folder / entry.name
    try:
        size = path.stat().st_size
        raw = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if size != entry.size or raw.shape != (rows, dim) or raw.dtype not in (np.float32, np.float16):
        raise IndexCorruptError(
            f"index file {path} holds {raw.shape} {raw.dtype} in {size} bytes, the manifest expects ({rows}, {dim}) "
            f"float32 (float16 for ivfpq-disk) in {entry.size} bytes; rebuild the index"
        )
    return raw


def drop_old_generations(folder: Path, current: int) -> None:
    """Remove data files older than the generation before ``current``, and leftover temporary files."""
    # Keep the generation before the current one: a reader that loaded the old manifest a moment
    # ago may still be reading its files.
    for stem, suffix in _GENERATION_FILES.values():
        for old in folder.glob(f"{stem}-*{suffix}"):
            try:
                generation = int(old.stem.split("-")[-1])
            except ValueError:
                continue
            if generation <= current - _GENERATIONS_KEPT:
                old.unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# -- checksums ------------------------------------------------------------------------------------


def _check_size(folder: Path, entry: FileEntry) -> tuple[Path, os.stat_result]:
    path = folder / entry.name
    try:
        st = path.stat()
    except OSError as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if st.st_size != entry.size:
        raise IndexCorruptError(
            f"index file {path} has {st.st_size} bytes, the manifest says {entry.size} (truncated?); rebuild the index"
        )
    return path, st


def check_file(folder: Path, entry: FileEntry, verified: VerifiedFiles, *, full: bool) -> Path:
    """The path of a data file whose size matches the manifest, and whose SHA-256 does too: hashed
    here from the disk in blocks, unless ``verified`` knows the file unchanged since it was (and not
    ``full``).

    Raises
    ------
    IndexCorruptError
        The file is missing, unreadable, of another size or checksum.
    """
    started = time.time_ns()
    path, st = _check_size(folder, entry)
    if full or not verified.known(path, entry, st):
        try:
            with open(path, "rb") as f:
                digest, _ = sha256_stream(f)
        except OSError as e:
            raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
        _check_digest(path, entry, digest)
        verified.remember(path, entry, st, started)
    return path


def read_checked(folder: Path, entry: FileEntry, verified: VerifiedFiles, *, full: bool) -> bytes:
    """The bytes of a (small) data file, checked as :func:`check_file` does.

    Raises
    ------
    IndexCorruptError
        The file is missing, unreadable, of another size or checksum.
    """
    started = time.time_ns()
    path, st = _check_size(folder, entry)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexCorruptError(f"index file {path} is missing or unreadable; rebuild the index") from e
    if len(data) != entry.size:
        raise IndexCorruptError(
            f"index file {path} has {len(data)} bytes, the manifest says {entry.size} (truncated?); rebuild the index"
        )
    if full or not verified.known(path, entry, st):
        _check_digest(path, entry, hashlib.sha256(data).hexdigest())
        verified.remember(path, entry, st, started)
    return data


def _check_digest(path: Path, entry: FileEntry, digest: str) -> None:
    if digest != entry.sha256:
        raise IndexCorruptError(f"index file {path} does not match its checksum in the manifest; rebuild the index")


class VerifiedFiles:
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

    def known(self, path: Path, entry: FileEntry, st: os.stat_result | None = None) -> bool:
        """Whether ``path`` is verified as it is now, with the checksum ``entry`` (from the manifest) records."""
        seen = self.entries.get(path.name)
        if seen is None:
            return False
        try:
            st = st or path.stat()
        except OSError:
            return False
        return (
            seen.get("sha256") == entry.sha256
            and all(seen.get(k) == v for k, v in self._key(st).items())
            and isinstance(seen.get("checked_ns"), int)
            and seen["checked_ns"] - st.st_mtime_ns >= _RACY_NS
        )

    def remember(self, path: Path, entry: FileEntry, st: os.stat_result, checked_ns: int) -> None:
        """Record that ``path``, as ``st`` describes it, matched ``entry``'s checksum (hashing began at ``checked_ns``)."""
        self.entries[path.name] = {**self._key(st), "sha256": entry.sha256, "checked_ns": checked_ns}
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
            write_text(self.path, data)  # created owner-only (0o600)
        except OSError as e:
            log.debug("could not update %s (%s); files will be hashed again at the next open", self.path, e)
            return
        self._changed = False
