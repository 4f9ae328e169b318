"""The index directory: a faiss index of case embeddings beside a table of non-identifying metadata.

``index_store`` holds :class:`IndexStore` (open, create, add, search, commit); ``faiss_index`` the
faiss side (the ``auto`` rule, build parameters, search parameters, filtered search, re-ranking);
``files`` the on-disk format (the typed :class:`Manifest`, generations of data files, checksums and
the cache of verified files); ``slices`` the per-slice vectors of each case (:class:`SliceTable`). The store takes float32 arrays; it never imports torch or an encoder.
"""

from __future__ import annotations

from medsearch.store.faiss_index import (
    FLAT_MAX_MB,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    IVFPQ_MIN_VECTORS,
    IVFPQ_RERANK,
    RETRAIN_GROWTH,
    choose_index_type,
    index_bytes_per_vector,
)
from medsearch.store.files import (
    FORMAT_VERSION,
    LOCAL_DIR,
    MANIFEST,
    VERIFIED_CACHE,
    FileEntry,
    IndexSection,
    Manifest,
    read_manifest,
)
from medsearch.store.index_store import IndexStore, SearchHits
from medsearch.store.slices import CandidateSlices, SliceTable

__all__ = [
    "FLAT_MAX_MB",
    "FORMAT_VERSION",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "IVFPQ_MIN_VECTORS",
    "IVFPQ_RERANK",
    "LOCAL_DIR",
    "MANIFEST",
    "RETRAIN_GROWTH",
    "VERIFIED_CACHE",
    "CandidateSlices",
    "FileEntry",
    "IndexSection",
    "IndexStore",
    "Manifest",
    "SearchHits",
    "SliceTable",
    "choose_index_type",
    "index_bytes_per_vector",
    "read_manifest",
]
