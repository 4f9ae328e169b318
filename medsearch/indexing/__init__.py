"""Building an index from an archive: :func:`build_index`, the engine it runs, and that engine's parts.

``build.py`` (:func:`build_index`: the index folder, its lock, settings and labels), ``options.py``
(:class:`IndexOptions`: the settings of one run), ``engine.py`` (:func:`index_files`: plan, decode,
encode, commit), ``cases.py`` (:func:`prepare_case`: the work for one case), ``workers.py`` (the
worker processes), ``filecache.py`` (:class:`FileStateCache`: files not read again) and
``report.py`` (:class:`IndexReport`: what a run did). The query side (:mod:`medsearch.search`)
imports none of this.
"""

from __future__ import annotations

from medsearch.indexing.build import SKIP_REPORT, build_index
from medsearch.indexing.cases import CaseJob, FailedCase, PreparedCase, prepare_case
from medsearch.indexing.engine import Chunk, index_files
from medsearch.indexing.filecache import FILE_STATE, FileStateCache
from medsearch.indexing.options import IndexOptions
from medsearch.indexing.report import STAGES, IndexReport, default_workers

__all__ = [
    "FILE_STATE",
    "SKIP_REPORT",
    "STAGES",
    "CaseJob",
    "Chunk",
    "FailedCase",
    "FileStateCache",
    "IndexOptions",
    "IndexReport",
    "PreparedCase",
    "build_index",
    "default_workers",
    "index_files",
    "prepare_case",
]
