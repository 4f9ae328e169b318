"""Labels from a CSV: read the table, and find a case's row(s) by file path, file name or UID.

A labels CSV has one row per file or per series. Its key column is named with ``--label-key`` or
found among :data:`LABEL_KEYS`; every other column (or the ones named) becomes a label of the case.
The index, the evaluation and training match labels to cases with these two functions, so a label
means the same thing everywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medsearch.errors import ConfigError, first_line
from medsearch.io.dicom import CaseRef

__all__ = ["LABEL_KEYS", "labels_for_case", "read_labels"]

LABEL_KEYS = ("path", "file", "filename", "file_name", "dicom_name", "SeriesInstanceUID", "StudyInstanceUID")


def read_labels(path: str | Path, key: str | None, columns: Sequence[str] | None) -> pd.DataFrame:
    """The labels table, indexed by its key column (kept in ``attrs["key"]``), one row per key."""
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
    keep = list(columns) if columns else [c for c in table.columns if c != key and not c.startswith("Unnamed")]
    missing = [c for c in keep if c not in table.columns]
    if missing:
        raise ConfigError(f"labels file {path} has no column(s) {', '.join(missing)}; its columns: {', '.join(table.columns)}")
    reserved = {"case_id", "patient", "modality", "body_part", "sex", "age_band", "n_slices", "n_files"}
    clash = sorted(reserved & set(keep))
    if clash:
        raise ConfigError(f"label column(s) {', '.join(clash)} clash with medsearch metadata; rename them in {path}")
    table = table.drop_duplicates(subset=[key]).set_index(key)[keep]
    table.attrs["key"] = key
    return table


def labels_for_case(case: CaseRef, labels: pd.DataFrame, archive: Path) -> dict[str, Any]:
    """A case's labels: by its series or study UID, or by its files' paths (relative to ``archive``) and names."""
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
    found = labels.loc[[c for c in candidates if c in labels.index]]
    out: dict[str, Any] = {}
    for col in labels.columns:
        values = [v for v in found[col] if v != ""]
        # several files of one case may disagree: keep the most common value
        out[col] = Counter(values).most_common(1)[0][0] if values else None
    return out
