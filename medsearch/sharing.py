"""Keeping an index shareable, and the controlled way back to the source files.

* The **link table** maps each pseudonymous case id to where the case lives (source files, Study and
  Series Instance UIDs). It identifies patients' studies, so it is written only where the user asks,
  with owner-only permissions, and never inside an index directory.
* :func:`export_index` copies an index directory for sharing, and refuses when anything identifying
  would go with it (see :func:`shareability_problems`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

from medsearch._files import write_bytes
from medsearch.deid import CASE_METADATA_KEYS
from medsearch.errors import ConfigError, MedsearchError, WriteError
from medsearch.store import MANIFEST, VERIFIED_CACHE, IndexStore, Manifest, read_manifest
from medsearch.store.files import write_manifest

__all__ = ["ExportReport", "LinkTable", "NotShareableError", "export_index", "shareability_problems"]

LINK_COLUMNS = ("case_id", "study_instance_uid", "series_instance_uid", "part", "files")
# Columns medsearch itself writes into a case table besides the de-identified metadata.
_OWN_COLUMNS = frozenset({"case_id", "n_files", "n_slices", "rows", "columns", "spacing_mm"})
# Values that look like a DICOM UID, a DICOM/ISO date, or an e-mail address.
_SUSPECT_VALUES = [
    ("a UID", re.compile(r"^\s*\d+(\.\d+){4,}\s*$")),
    ("a date", re.compile(r"^\s*(19|20)\d{2}-?(0[1-9]|1[0-2])-?(0[1-9]|[12]\d|3[01])\s*$")),
    ("an e-mail address", re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")),
]


class NotShareableError(MedsearchError, ValueError):
    """An index directory holds something that must not leave the site."""


class LinkTable:
    """Case id -> source location, kept apart from the index (owner-only file, outside any index).

    Parameters
    ----------
    path
        The CSV file. It must not be inside an index directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, str]] = {}
        if self.path.exists():
            self.rows = {r["case_id"]: r for r in self._read()}

    @classmethod
    def for_index(cls, path: str | Path, index_dir: str | Path) -> LinkTable:
        """The link table at ``path``, refusing a place inside ``index_dir`` (it would be shared).

        Raises
        ------
        ConfigError
            ``path`` is inside the index directory.
        """
        path, index_dir = Path(path).resolve(), Path(index_dir).resolve()
        if path == index_dir or index_dir in path.parents:
            raise ConfigError(
                f"the link table {path} would be inside the index directory {index_dir}, which is meant to "
                "be shared; write it somewhere else (e.g. next to your site key)"
            )
        return cls(path)

    def add(self, case_id: str, *, study_uid: str, series_uid: str, part: str, files: Iterable[Path]) -> None:
        self.rows[case_id] = {
            "case_id": case_id,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "part": part,
            "files": ";".join(str(Path(f).resolve()) for f in files),
        }

    def save(self) -> None:
        """Write the table atomically with owner-only permissions (0600).

        Raises
        ------
        WriteError
            The table's folder cannot be created or written.
        """
        buffer = StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LINK_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows[k] for k in sorted(self.rows))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(self.path, buffer.getvalue().encode("utf-8"), mode=0o600)
        except OSError as e:
            raise WriteError(f"cannot write link table {self.path}: {e.strerror or e}; check the folder and its permissions") from e

    def resolve(self, case_id: str) -> dict[str, Any] | None:
        """Where a case lives: ``{"files": [...], "study_instance_uid", "series_instance_uid"}``."""
        row = self.rows.get(case_id)
        if row is None:
            return None
        return {
            "files": [f for f in row["files"].split(";") if f],
            "study_instance_uid": row["study_instance_uid"],
            "series_instance_uid": row["series_instance_uid"],
        }

    def _read(self) -> list[dict[str, str]]:
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != LINK_COLUMNS:
                    raise ConfigError(f"{self.path} is not a medsearch link table (columns {reader.fieldnames})")
                return list(reader)
        except OSError as e:
            raise ConfigError(f"cannot read link table {self.path}: {e.strerror}; check the path and permissions") from e


@dataclass
class ExportReport:
    source: Path
    destination: Path
    files: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "files": self.files,
            "left_out": self.left_out,
        }


def shareability_problems(index_dir: str | Path) -> list[str]:
    """What in an index directory would identify someone if shared; empty when nothing does.

    Checks: every case-table column is de-identified metadata, medsearch's own image facts, or a
    declared label; no label value looks like a UID, a date or an e-mail address; no key file or link
    table sits in the directory. (Thumbnails are left out by :func:`export_index` unless asked for.)
    """
    index_dir = Path(index_dir)
    store = IndexStore.open(index_dir)
    problems = []
    labels = set(store.manifest.label_columns)
    allowed = set(CASE_METADATA_KEYS) | _OWN_COLUMNS | labels
    unknown = [c for c in store.cases.columns if c not in allowed]
    if unknown:
        problems.append(f"case table has columns that are neither metadata nor declared labels: {', '.join(unknown)}")
    for column in sorted(labels & set(store.cases.columns)):
        values = store.cases[column].dropna().astype(str)
        for what, pattern in _SUSPECT_VALUES:
            hits = sum(1 for v in values if pattern.search(v))
            if hits:
                problems.append(f"label column {column!r} has {hits} value(s) that look like {what}")
    for path in index_dir.iterdir():
        if path.suffix == ".key" or path.name.startswith("links"):
            problems.append(f"{path.name} looks like a key file or link table; move it out of the index directory")
        elif path.is_file() and _is_link_table(path):
            problems.append(f"{path.name} is a link table; move it out of the index directory")
    return problems


def export_index(
    source: str | Path,
    destination: str | Path,
    *,
    with_thumbnails: bool = False,
) -> ExportReport:
    """Copy an index directory for sharing, or refuse if anything identifying would go with it.

    The copy holds the manifest (local paths removed), the faiss index and the case table, and the
    thumbnails only with ``with_thumbnails`` (source pixels may carry burned-in text, which is the
    archive's to clean). The skip report (local file paths) and the local caches (which files were
    read or verified on this machine) stay behind. The copy is checked against every checksum.

    Raises
    ------
    NotShareableError
        :func:`shareability_problems` found something; nothing is copied.
    WriteError
        ``destination`` exists and is not empty.
    """
    source, destination = Path(source), Path(destination)
    problems = shareability_problems(source)
    if problems:
        raise NotShareableError(f"refusing to export {source}: " + "; ".join(problems))
    if destination.exists() and any(destination.iterdir()):
        raise WriteError(f"{destination} exists and is not empty; give a new folder for the export")
    manifest = read_manifest(source)
    report = ExportReport(source=source, destination=destination)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=destination.parent if destination.parent.exists() else None))
    try:
        files = dict(manifest.files)
        if "thumbnails" in files and not with_thumbnails:
            report.left_out[files.pop("thumbnails").name] = "thumbnails (use --with-thumbnails after checking for burned-in text)"
        for entry in files.values():
            shutil.copy2(source / entry.name, staging / entry.name)
            report.files.append(entry.name)
        for path in source.iterdir():
            if path.name not in report.files and path.name != MANIFEST and path.name not in report.left_out and path.is_file():
                report.left_out[path.name] = (
                    "local checksum cache (this machine's file ids)" if path.name == VERIFIED_CACHE
                    else "local report, cache or lock file"
                )
        write_manifest(staging, _without_local_paths(dataclasses.replace(manifest, files=files)))
        report.files.append(MANIFEST)
        IndexStore.open(staging, verify=True)  # the copy must load and match its checksums
        (staging / VERIFIED_CACHE).unlink(missing_ok=True)  # written by that check; local to this machine
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.rmdir()
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _without_local_paths(manifest: Manifest) -> Manifest:
    run = dict(manifest.last_run or {})
    run.pop("index_dir", None)
    config = json.loads(json.dumps(manifest.config or {}))  # a deep copy
    if config.get("encoder", {}).get("checkpoint"):
        config["encoder"]["checkpoint"] = Path(config["encoder"]["checkpoint"]).name
    return dataclasses.replace(manifest, last_run=run, config=config)


def _is_link_table(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    return first.strip().split(",")[:2] == list(LINK_COLUMNS[:2])
