"""Labels from a CSV: read the table, and find a case's row(s) by file path, file name or UID.

A labels CSV has one row per file or per series. Its key column is named with ``--label-key`` or
found among :data:`LABEL_KEYS`. The label columns are the ones named (``--label-columns``), else
every other column except those that are not labels (:func:`label_columns`): file paths, file
names, identifiers and dates, which would crowd the result table and identify cases; which were
left out, and why, is kept in ``table.attrs["dropped"]``. Values stay as written (an age of ``71``
is ``71``, not ``71.0``). The index, the evaluation and training match labels to cases with
:func:`labels_for_case`, so a label means the same thing everywhere.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medsearch.deid import CASE_METADATA_KEYS
from medsearch.errors import ConfigError, first_line
from medsearch.io.dicom import CaseRef

__all__ = ["LABEL_KEYS", "label_columns", "label_rows_of_case", "labels_for_case", "read_labels"]

LABEL_KEYS = ("path", "file", "filename", "file_name", "dicom_name", "SeriesInstanceUID", "StudyInstanceUID")
# What the case table already holds: a label may not take these names.
_RESERVED = frozenset(CASE_METADATA_KEYS) | {"case_id", "patient", "n_slices", "n_files", "rows", "columns", "spacing_mm", "pixel_hash"}
# A column is "not a label" when this share of its non-empty values look like one of the kinds below.
_SHARE = 0.9
_FILE_NAME = re.compile(
    r"^[^/\\\s]+\.(dcm|dicom|ima|img|png|jpe?g|tiff?|bmp|gif|nii|nii\.gz|nrrd|mha|mhd|npz|npy|gz|zip)$", re.IGNORECASE
)
_DICOM_UID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*)){3,}$")
_DATE = re.compile(
    r"^(\d{4}-\d{1,2}-\d{1,2}([ T][0-9:.]+)?|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}|(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01]))$"
)
# Column names of identifiers: "id", "PatientID", "subject_id", "MRN", "accession"...
_ID_NAME = re.compile(r"(^|[_\s-])(id|uid|mrn|accession)$|^accession[_\s-]?(number|no)$|^(patientid|subjectid|studyid|seriesid)$", re.IGNORECASE)
_ID_NAME_CASED = re.compile(r"[a-z0-9_](ID|Id|UID|Uid)$")  # PatientID, SubjectId (not "thyroid")
# An identifier value: letters and digits (with - _ .), at least one digit, no spaces, not a plain number.
_ID_VALUE = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9._-]{3,}$")


def read_labels(path: str | Path, key: str | None, columns: Sequence[str] | None) -> pd.DataFrame:
    """The labels table, indexed by its key column (kept in ``attrs["key"]``), one row per key.

    ``columns`` names the label columns; by default every other column that is a label
    (:func:`label_columns`), and ``attrs["dropped"]`` maps each column left out to why.
    ``attrs["rows"]`` is the number of rows (distinct keys).

    Raises
    ------
    ConfigError
        The file is missing or not a CSV, has no key column, lacks a named column, or a label
        column takes the name of a case-table field.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} does not exist; give a CSV with one row per file or series")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(f"labels file {path} is not a readable CSV: {first_line(e)}") from e
    if key is None:
        by_lower = {c.lower(): c for c in table.columns}
        key = next((by_lower[c.lower()] for c in LABEL_KEYS if c.lower() in by_lower), None)
        if key is None:
            raise ConfigError(
                f"labels file {path} has none of the columns {', '.join(LABEL_KEYS)}; name the key column with --label-key"
            )
    elif key not in table.columns:
        raise ConfigError(f"labels file {path} has no column {key!r}; its columns: {', '.join(table.columns)}")
    dropped: dict[str, str] = {}
    if columns:
        keep = list(columns)
    else:
        keep, dropped = label_columns(table, key)
    missing = [c for c in keep if c not in table.columns]
    if missing:
        raise ConfigError(f"labels file {path} has no column(s) {', '.join(missing)}; its columns: {', '.join(table.columns)}")
    clash = sorted(_RESERVED & set(keep))
    if clash:
        raise ConfigError(f"label column(s) {', '.join(clash)} clash with medsearch metadata; rename them in {path}")
    table = table.drop_duplicates(subset=[key]).set_index(key)[keep]
    table.attrs["key"] = key
    table.attrs["dropped"] = dropped
    table.attrs["rows"] = len(table)
    return table


def label_columns(table: pd.DataFrame, key: str) -> tuple[list[str], dict[str, str]]:
    """The columns of a labels table that are labels, and the others with why they are not.

    Not labels: the key column; unnamed columns (a saved index); and columns of which most values
    (90%) are file paths (a ``/`` or ``\\``), file names (``x.dcm``, ``x.png``...), DICOM UIDs or
    dates, or that hold identifiers: named like one (``id``, ``PatientID``, ``subject_id``, ``MRN``,
    ``accession``) or a different code of letters and digits in every row (``LIDC-0001``).

    >>> t = pd.DataFrame({"file": ["a.dcm", "b.dcm"], "path": ["scans/a.dcm", "scans/b.dcm"],
    ...                   "PatientID": ["7", "8"], "date": ["2020-01-02", "2021-03-04"], "grade": ["2", "3"]})
    >>> label_columns(t, "file")
    (['grade'], {'path': 'file paths', 'PatientID': 'identifiers', 'date': 'dates'})
    """
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for column in table.columns:
        if column == key or str(column).startswith("Unnamed"):
            continue
        why = _not_a_label(str(column), [str(v).strip() for v in table[column] if str(v).strip()])
        if why is None:
            kept.append(column)
        else:
            dropped[column] = why
    return kept, dropped


def _not_a_label(name: str, values: list[str]) -> str | None:
    if _ID_NAME.search(name) or _ID_NAME_CASED.search(name):
        return "identifiers"
    if not values:
        return None

    def most(test: Any) -> bool:
        return sum(1 for v in values if test(v)) >= _SHARE * len(values)

    if most(lambda v: "/" in v or "\\" in v):
        return "file paths"
    if most(_FILE_NAME.match):
        return "file names"
    if most(_DICOM_UID.match):
        return "DICOM UIDs"
    if most(_DATE.match):
        return "dates"
    if len(values) >= 5 and len(set(values)) >= _SHARE * len(values) and most(_ID_VALUE.match):
        return "identifiers"
    return None


def labels_for_case(case: CaseRef, labels: pd.DataFrame, archive: Path) -> dict[str, Any]:
    """A case's labels: by its series or study UID, or by its files' paths (relative to ``archive``) and names.

    Values are the CSV's text as written; a label no row gives is None.
    """
    found = labels.loc[label_rows_of_case(case, labels, archive)]
    out: dict[str, Any] = {}
    for col in labels.columns:
        values = [v for v in found[col] if v != ""]
        # several files of one case may disagree: keep the most common value
        out[col] = Counter(values).most_common(1)[0][0] if values else None
    return out


def label_rows_of_case(case: CaseRef, labels: pd.DataFrame, archive: Path) -> list[str]:
    """The keys of the rows of ``labels`` that name the case (its UID, or its files' paths and names)."""
    key = labels.attrs.get("key", "")
    if key.lower() in ("seriesinstanceuid", "studyinstanceuid"):
        uid = case.series_uid if key.lower() == "seriesinstanceuid" else case.study_uid
        candidates: Iterable[str] = [uid]
    else:
        candidates = []
        for f in case.files:
            try:
                rel = f.resolve().relative_to(archive.resolve()).as_posix()
            except ValueError:
                rel = f.name
            candidates = [*candidates, rel, f.name]
    return list(dict.fromkeys(c for c in candidates if c in labels.index))
