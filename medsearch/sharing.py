"""Keeping an index shareable, and the controlled way back to the source files.

* The **link table** maps each pseudonymous case id to where the case lives (source files, Study and
  Series Instance UIDs). It identifies patients' studies, so it is written only where the user asks,
  with owner-only permissions, and never inside an index directory.
* :func:`export_index` copies an index directory for sharing, and refuses when anything identifying
  would go with it (see :func:`shareability_problems`). The case table it writes is checked again
  against the vocabularies (:func:`~medsearch.deid.kept_value`) and generalized until every group of
  patients sharing the quasi-identifiers holds at least k of them (:mod:`medsearch.deid.kanon`);
  :func:`measure_k_anonymity` measures an index's table the same way.
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

import pandas as pd

from medsearch._files import write_bytes
from medsearch.deid import (
    CASE_METADATA_KEYS,
    QUASI_IDENTIFIERS,
    GroupMeasure,
    SiteTerms,
    kept_value,
    looks_identifying,
    measure_groups,
    plan_generalization,
)
from medsearch.errors import ConfigError, MedsearchError, WriteError
from medsearch.store import MANIFEST, VERIFIED_CACHE, IndexStore, Manifest, read_manifest
from medsearch.store.files import write_file, write_manifest

__all__ = [
    "DEFAULT_K",
    "ExportReport",
    "LinkTable",
    "NotShareableError",
    "export_index",
    "measure_k_anonymity",
    "shareability_problems",
]

#: The k of k-anonymity an export enforces unless told otherwise.
DEFAULT_K = 5
# Data files of a generation (see medsearch.store.files.generation_file).
_EARLIER_GENERATION = re.compile(r"(vectors|cases|thumbs|raw)-\d{6}\.(faiss|csv|npy)")

LINK_COLUMNS = ("case_id", "study_instance_uid", "series_instance_uid", "part", "files", "dicomweb_root")
# A link table written before cases could come from a DICOMweb server: read as one whose column is empty.
_OLD_LINK_COLUMNS = LINK_COLUMNS[:5]
# Columns medsearch itself writes into a case table besides the de-identified metadata.
_OWN_COLUMNS = frozenset({"case_id", "n_files", "n_slices", "rows", "columns", "spacing_mm", "pixel_hash"})


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
        # folders whose files stand for a DICOMweb server (a sync's spool, emptied after each batch):
        # a case from one is linked by the server's root and its UIDs, not by files that will be gone
        self.remote: dict[Path, str] = {}
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
        paths = [Path(f).resolve() for f in files]
        root = next((r for folder, r in self.remote.items() if paths and folder in paths[0].parents), "")
        self.rows[case_id] = {
            "case_id": case_id,
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "part": part,
            "files": "" if root else ";".join(str(p) for p in paths),
            "dicomweb_root": root,
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
            # a file name that is not UTF-8 keeps its exact bytes (surrogate escapes back to raw bytes)
            write_bytes(self.path, buffer.getvalue().encode("utf-8", "surrogateescape"), mode=0o600)
        except OSError as e:
            raise WriteError(f"cannot write link table {self.path}: {e.strerror or e}; check the folder and its permissions") from e

    def resolve(self, case_id: str) -> dict[str, Any] | None:
        """Where a case lives: ``{"files": [...], "study_instance_uid", "series_instance_uid", "dicomweb_root"}``
        (``dicomweb_root`` is empty for a case indexed from files, ``files`` for one from a DICOMweb server)."""
        row = self.rows.get(case_id)
        if row is None:
            return None
        return {
            "files": [f for f in row["files"].split(";") if f],
            "study_instance_uid": row["study_instance_uid"],
            "series_instance_uid": row["series_instance_uid"],
            "dicomweb_root": row.get("dicomweb_root") or "",
        }

    def _read(self) -> list[dict[str, str]]:
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) not in (LINK_COLUMNS, _OLD_LINK_COLUMNS):
                    raise ConfigError(f"{self.path} is not a medsearch link table (columns {reader.fieldnames})")
                return list(reader)
        except OSError as e:
            raise ConfigError(f"cannot read link table {self.path}: {e.strerror}; check the path and permissions") from e


@dataclass
class ExportReport:
    """What :func:`export_index` did.

    Attributes
    ----------
    files, left_out
        The files copied, and those left behind with the reason.
    k_anonymity
        The generalization of the case table (:meth:`~medsearch.deid.KAnonymityPlan.to_dict`): the groups before
        and after, and what was done to which quasi-identifier.
    replaced
        Per metadata column, how many values are in no vocabulary (an index built by an older
        medsearch, or edited) and were exported as their term, ``OTHER`` or empty.
    labels_below_k
        Label columns with a value that fewer than k patients hold: exported as given (labels are
        the site's choice), listed so that the site can check them.
    """

    source: Path
    destination: Path
    files: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    k_anonymity: dict[str, Any] = field(default_factory=dict)
    replaced: dict[str, int] = field(default_factory=dict)
    labels_below_k: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "files": self.files,
            "left_out": self.left_out,
            "k_anonymity": self.k_anonymity,
            "replaced": self.replaced,
            "labels_below_k": self.labels_below_k,
        }


def shareability_problems(index_dir: str | Path) -> list[str]:
    """What in an index directory would identify someone if shared; empty when nothing does.

    Checks: every case-table column is de-identified metadata, medsearch's own image facts, or a
    declared label; no label value looks like a person name, a UID, a date or an e-mail address
    (:func:`~medsearch.deid.looks_identifying`); no key file or link table sits in the directory.
    (Thumbnails are left out by :func:`export_index` unless asked for; metadata values outside the
    vocabularies are replaced, not refused, see :class:`ExportReport`.)
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
        found: dict[str, int] = {}
        for value in store.cases[column].dropna().astype(str):
            what = looks_identifying(value)
            if what is not None:
                found[what] = found.get(what, 0) + 1
        for what, hits in sorted(found.items()):
            problems.append(
                f"label column {column!r} has {hits} value(s) that look like {what}; "
                "leave the column out (--label-columns) or clean the labels CSV, then index again"
            )
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
    k: int = DEFAULT_K,
) -> ExportReport:
    """Copy an index directory for sharing, or refuse if anything identifying would go with it.

    The copy holds the manifest (local paths removed), the faiss index and the case table, and the
    thumbnails only with ``with_thumbnails`` (source pixels may carry burned-in text, which is the
    archive's to clean). The skip report (local file paths) and the local caches (which files were
    read or verified on this machine) stay behind. The copy is checked against every checksum.

    The exported case table is the index's, with every metadata value checked against the
    vocabularies again (:func:`~medsearch.deid.kept_value`), then generalized until every group of
    patients sharing the quasi-identifiers (:data:`~medsearch.deid.QUASI_IDENTIFIERS`) holds at
    least ``k`` patients (:func:`~medsearch.deid.plan_generalization`). The index itself is not
    changed. :attr:`ExportReport.k_anonymity` says what was generalized.

    Raises
    ------
    NotShareableError
        :func:`shareability_problems` found something, or the index holds fewer than ``k``
        patients (no table of them can be k-anonymous); nothing is copied.
    ConfigError
        ``k`` is below 1.
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
    store = IndexStore.open(source)
    report = ExportReport(source=source, destination=destination)
    cases, report.replaced = _checked_cases(store.cases, _site_terms(manifest))
    plan = plan_generalization(_columns(cases), k=k)
    if not plan.reached:
        raise NotShareableError(
            f"refusing to export {source}: it holds {plan.after.patients} patient(s), fewer than k = {k}, "
            "so no case table of it is k-anonymous; index more patients, or give a smaller --k-anonymity "
            "if sharing so few is acceptable"
        )
    for name in plan.levels:
        cases[name] = plan.apply(name, cases[name].tolist())
    report.k_anonymity = plan.to_dict()
    report.labels_below_k = _labels_below_k(cases, manifest.label_columns, k)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=destination.parent if destination.parent.exists() else None))
    try:
        files = dict(manifest.files)
        if "thumbnails" in files and not with_thumbnails:
            report.left_out[files.pop("thumbnails").name] = "thumbnails (use --with-thumbnails after checking for burned-in text)"
        for role, entry in files.items():
            if role == "cases":
                files[role] = write_file(staging, entry.name, cases.to_csv(index=False).encode("utf-8"))
            else:
                shutil.copy2(source / entry.name, staging / entry.name)
            report.files.append(entry.name)
        for path in source.iterdir():
            if path.name in report.files or path.name == MANIFEST or path.name in report.left_out:
                continue
            if path.is_dir():
                report.left_out[path.name] = "site-only folder (skip report, file-state cache)"
            elif path.name == VERIFIED_CACHE:
                report.left_out[path.name] = "local checksum cache (this machine's file ids)"
            elif _EARLIER_GENERATION.fullmatch(path.name):
                report.left_out[path.name] = "an earlier generation of the index, kept for readers of the last commit"
            elif path.is_file():
                report.left_out[path.name] = "local report, cache or lock file"
        exported = _without_local_paths(dataclasses.replace(manifest, files=files))
        exported = exported.with_info({"export": {"k_anonymity": {
            "k": k, "smallest_group": plan.after.smallest_group, "generalized": dict(plan.generalized),
        }}})
        write_manifest(staging, exported)
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


def measure_k_anonymity(cases: pd.DataFrame, *, k: int = DEFAULT_K) -> GroupMeasure:
    """How small the groups of patients sharing every quasi-identifier are in a case table.

    See :func:`~medsearch.deid.measure_groups`; ``cases`` is an index's table
    (:attr:`IndexStore.cases`).

    Raises
    ------
    ConfigError
        ``k`` is below 1.
    """
    return measure_groups(_columns(cases), k=k)


def _columns(cases: pd.DataFrame) -> dict[str, list[Any]]:
    """The quasi-identifiers and the patient column of a case table, as lists with None for missing."""
    names = [c for c in (*QUASI_IDENTIFIERS, "patient") if c in cases.columns]
    out = {name: cases[name].astype(object).where(cases[name].notna(), None).tolist() for name in names}
    if "patient" not in out:  # a table from before patient pseudonyms: each case is its own patient
        out["patient"] = cases["case_id"].astype(str).tolist() if "case_id" in cases.columns else [str(i) for i in range(len(cases))]
    return out


def _site_terms(manifest: Manifest) -> SiteTerms:
    """The site's vocabulary additions the index was built with (its config's [deid] section)."""
    recorded = (manifest.config or {}).get("deid") or {}
    try:
        return SiteTerms(**{name: tuple(recorded.get(name, ())) for name in ("body_parts", "manufacturers", "models")})
    except (ConfigError, TypeError):
        return SiteTerms()  # an unreadable list adds nothing: every value is then held to the vocabularies


def _checked_cases(cases: pd.DataFrame, terms: SiteTerms) -> tuple[pd.DataFrame, dict[str, int]]:
    """The case table with each metadata value as :func:`kept_value` keeps it, and how many changed."""
    cases = cases.copy()
    replaced: dict[str, int] = {}
    for name in CASE_METADATA_KEYS:
        if name not in cases.columns:
            continue
        before = cases[name].astype(object).where(cases[name].notna(), None).tolist()
        after = [kept_value(name, v, terms) for v in before]
        changed = sum(1 for a, b in zip(before, after) if a != b and not _same_number(a, b))
        if changed:
            replaced[name] = changed
            cases[name] = pd.Series(after, index=cases.index, dtype=object)
    return cases, replaced


def _same_number(a: object, b: object) -> bool:
    try:
        return a is not None and b is not None and float(str(a)) == float(str(b))
    except ValueError:
        return False


def _labels_below_k(cases: pd.DataFrame, labels: list[str], k: int) -> list[str]:
    """Label columns with a value that fewer than ``k`` patients hold."""
    if "patient" not in cases.columns:
        return []
    out = []
    for column in labels:
        if column in cases.columns:
            held = cases[[column, "patient"]].dropna().groupby(column)["patient"].nunique()
            if len(held) and int(held.min()) < k:
                out.append(column)
    return out


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
