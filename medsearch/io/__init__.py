"""Reading studies from disk: DICOM files, series folders and archives (pydicom), MedMNIST npz, label CSVs.

This layer knows nothing of transforms, encoders or faiss: it turns paths into headers, cases and
float32 pixel volumes, and says why a file was skipped. What lives here:

- :mod:`medsearch.io.dicom`: finding DICOM files, grouping their headers into cases, decoding a
  case into a :class:`Volume`, loading one query study;
- :mod:`medsearch.io.npz`: the labeled image splits of a MedMNIST-format ``.npz`` file;
- :mod:`medsearch.io.labels`: a labels CSV, and the labels of one case;
- :mod:`medsearch.io.quiet`: keeping pydicom's log lines and warnings, which may quote patient
  data, off the terminal.
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
from medsearch.io.labels import labels_for_case, read_labels
from medsearch.io.npz import NPZ_SPLITS, NpzLayout, NpzSplit, load_npz_split, npz_splits
from medsearch.io.quiet import pydicom_silenced, silence_pydicom

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
    "labels_for_case",
    "load_npz_split",
    "load_study",
    "load_volume",
    "npz_splits",
    "pydicom_silenced",
    "read_labels",
    "scan",
    "silence_pydicom",
    "summarize_file",
]
