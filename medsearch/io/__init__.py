"""Reading studies from disk: DICOM files, series folders and archives (pydicom), and MedMNIST npz.

This layer knows nothing of transforms, encoders or faiss: it turns paths into headers, cases and
float32 pixel volumes, and says why a file was skipped.
"""

from __future__ import annotations

from medsearch.io.dicom import (
    CaseFiles,
    CaseRef,
    HeaderSummary,
    LoadFailure,
    ScanResult,
    SkippedFile,
    SkipReason,
    SliceGeometry,
    Volume,
    find_files,
    group_headers,
    load_study,
    load_volume,
    scan,
    summarize_file,
)
from medsearch.io.npz import NPZ_SPLITS, NpzLayout, NpzSplit, load_npz_split, npz_splits

__all__ = [
    "NPZ_SPLITS",
    "CaseFiles",
    "CaseRef",
    "HeaderSummary",
    "LoadFailure",
    "NpzLayout",
    "NpzSplit",
    "ScanResult",
    "SkipReason",
    "SkippedFile",
    "SliceGeometry",
    "Volume",
    "find_files",
    "group_headers",
    "load_npz_split",
    "load_study",
    "load_volume",
    "npz_splits",
    "scan",
    "summarize_file",
]
