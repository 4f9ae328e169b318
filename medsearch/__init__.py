"""medsearch: find the most similar historical cases for a DICOM study, offline and de-identified.

The public API is the functions the ``medsearch`` command calls::

    from medsearch import build_index, index_info, query
    build_index("archive/", "my-index", labels="labels.csv")
    query("study.dcm", "my-index", k=5).to_frame()

Names are imported on first use, so that ``import medsearch`` (and ``medsearch --help``) stays quick
and does not load torch, MONAI or faiss until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Config",
    "IndexReport",
    "InvalidStudyError",
    "MedsearchError",
    "QueryResult",
    "Searcher",
    "SiteKey",
    "build_index",
    "embed_volume",
    "index_info",
    "load_config",
    "query",
    "render_sheet",
]

__version__ = "0.1.0"

_WHERE = {
    "Config": "medsearch.config",
    "load_config": "medsearch.config",
    "SiteKey": "medsearch.deid",
    "InvalidStudyError": "medsearch.errors",
    "MedsearchError": "medsearch.errors",
    "IndexReport": "medsearch.indexing",
    "QueryResult": "medsearch.search",
    "Searcher": "medsearch.search",
    "build_index": "medsearch.indexing",
    "embed_volume": "medsearch.embedding",
    "index_info": "medsearch.search",
    "query": "medsearch.search",
    "render_sheet": "medsearch.sheets",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'medsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from medsearch.config import Config, load_config
    from medsearch.deid import SiteKey
    from medsearch.embedding import embed_volume
    from medsearch.errors import InvalidStudyError, MedsearchError
    from medsearch.indexing import IndexReport, build_index
    from medsearch.search import QueryResult, Searcher, index_info, query
    from medsearch.sheets import render_sheet
