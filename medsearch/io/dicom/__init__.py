"""DICOM loading: discovery, header scan, grouping into cases, pixel decoding into volumes.

Three steps, each usable alone:

1. :func:`find_files` lists the files under a path (any name: ``.dcm``, none, GE ``i12.MRDC.3``).
2. :func:`scan` reads headers only, sorts each file into a :class:`CaseRef` (one series, or one
   multi-frame object) or into ``skipped`` with a :class:`SkipReason`.
3. :func:`load_volume` decodes the pixels of one case into a float32 :class:`Volume`.

:func:`load_study` chains the three for a single query study and turns every problem into one
:class:`~medsearch.errors.InvalidStudyError` line that says what to do.

The modules: ``read`` (one file: header or whole file, skip reasons), ``decode`` (pixel data to
float32 frames), ``stack`` (slice geometry and the order of a stack), ``scan`` (files to cases) and
``study`` (a case to a volume, a query study). No message or log line carries a header value that
could identify a patient (names, IDs, dates, UIDs): they name the file path, the SOP class name,
the transfer syntax, or the decoder's message.
"""

from __future__ import annotations

from medsearch.io.dicom.read import LoadFailure, SkippedFile, SkipReason
from medsearch.io.dicom.scan import CaseFiles, CaseRef, HeaderSummary, ScanResult, find_files, group_headers, scan, summarize_file
from medsearch.io.dicom.stack import SliceGeometry
from medsearch.io.dicom.study import Volume, load_study, load_volume

__all__ = [
    "CaseFiles",
    "CaseRef",
    "HeaderSummary",
    "LoadFailure",
    "ScanResult",
    "SkipReason",
    "SkippedFile",
    "SliceGeometry",
    "Volume",
    "find_files",
    "group_headers",
    "load_study",
    "load_volume",
    "scan",
    "summarize_file",
]
