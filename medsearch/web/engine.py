"""How the page's endpoints reach the loaded index: encode a study, search a vector, one query at a time.

:class:`PageEngine` wraps the service's :class:`~medsearch.search.Searcher` with what the service
already has for its JSON API: the query lock (the encoder uses every core; one query at a time),
the check for a newer index before each query, and the decoder of uploads. ``medsearch serve``
passes its own, so the page and ``POST /query`` share them: an upload from the page is decoded in
the same bounded worker processes. Without them (a page mounted on a bare :class:`Searcher`), the
engine decodes in a thread of this process, as :meth:`Searcher.search` does.

A study goes the way of ``medsearch query FOLDER``: :func:`~medsearch.io.load_study` on the upload's
folder, the configured preprocessing (:func:`~medsearch.embedding.encoder_input`), the encoder, and
:func:`~medsearch.embedding.pool_slices`; the vector then goes to :meth:`Searcher.search_vector`.
A region of the study (a :class:`~medsearch.embedding.Region`: a slab, a box) goes the way of
``medsearch query FOLDER --slices/--roi``: only the region is embedded
(:func:`~medsearch.embedding.region_array`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from medsearch.embedding import Region, SliceSet, is_box, pool_slices, query_slices, study_array
from medsearch.errors import MedsearchError
from medsearch.filters import Filter, parse_filters
from medsearch.io import CaseRef, Volume, load_study, load_volume
from medsearch.io.quiet import pydicom_silenced
from medsearch.search import QueryResult, Searcher
from medsearch.web.studies import Preview, make_preview, preview_slices
from medsearch.web.uploads import Refused

__all__ = ["DEFAULT_TIMEOUT_S", "EncodedStudy", "PageEngine", "Prepared"]

DEFAULT_TIMEOUT_S = 60.0


class Prepared(Protocol):
    """A study made into encoder input (what the service's decoder gives, e.g. ``PreparedStudy``)."""

    @property
    def images(self) -> np.ndarray: ...

    @property
    def modality(self) -> str: ...

    @property
    def n_slices(self) -> int: ...


#: The service's decoder: (the study's path, a deadline of time.monotonic(), the region or None) -> the encoder input.
Prepare = Callable[[Path, float, Region | None], Awaitable[Prepared]]


@dataclass(frozen=True)
class EncodedStudy:
    """A study's case vector and what a result says of the query, with its loaded case where there is one."""

    vector: np.ndarray
    modality: str
    n_slices: int
    loaded: tuple[CaseRef, Volume] | None = None  # set when it was decoded in this process
    slices: SliceSet | None = None  # its slice vectors, for re-ranking and the match location
    region: dict[str, list[int]] | None = None  # a region query's region, as the answer records it (Region.record)


@dataclass(frozen=True)
class _InProcess:
    images: np.ndarray
    modality: str
    n_slices: int
    loaded: tuple[CaseRef, Volume]
    slice_indices: list[int] | None = None
    gap_mm: float | None = None
    region: dict[str, list[int]] | None = None
    tiles: int = 0


class PageEngine:
    """The page's way to the index, sharing the service's lock, refresh and decoder.

    Parameters
    ----------
    searcher
        The service's open index and encoder.
    lock
        Held while a query encodes and searches (the service's; a new one by default).
    refresh
        Called under ``lock`` before a query: loads a newer commit of the index (default:
        :meth:`Searcher.refresh`, keeping the loaded index when the new one cannot be opened).
    prepare
        The service's decoder (default: :func:`load_study` and :func:`encoder_input` in a thread).
    timeout
        Seconds a query may wait for the lock and for its decoding.
    """

    def __init__(
        self,
        searcher: Searcher,
        *,
        lock: threading.Lock | None = None,
        refresh: Callable[[], None] | None = None,
        prepare: Prepare | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.searcher = searcher
        self.lock = lock if lock is not None else threading.Lock()
        self._refresh = refresh if refresh is not None else self._default_refresh
        self._prepare = prepare
        self.timeout = timeout

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    async def filters(self, where: Sequence[str] | None, deadline: float) -> tuple[Filter, ...]:
        """``where`` parsed and checked against the index (a bad filter fails before an upload is read).

        Raises
        ------
        FilterError
            A filter is malformed or names a field the index lacks.
        Refused
            503: the service stayed busy until ``deadline``.
        """
        filters = parse_filters(list(where or ()))
        await run_in_threadpool(self._locked, deadline, lambda: self.searcher.store.matching(filters))
        return filters

    async def encode(self, path: Path, deadline: float, region: Region | None = None) -> EncodedStudy:
        """The case vector of the study at ``path`` (a file or a folder of one series), or of its ``region``.

        Raises
        ------
        InvalidStudyError, EncoderMismatchError, MedsearchError
            As :meth:`Searcher.search` raises them.
        Refused
            The service's decoder refused the study (too slow, crashed), or stayed busy.
        """
        if self._prepare is not None:
            prepared: Prepared = await self._prepare(path, deadline, region)
            loaded = None
        else:
            local = await asyncio.wait_for(run_in_threadpool(self._prepare_here, path, region),
                                           max(0.0, deadline - time.monotonic()))
            prepared, loaded = local, local.loaded
        vectors = await run_in_threadpool(self._locked, deadline, lambda: self.searcher.encoder.embed(prepared.images))
        cropped = is_box(region)  # matched against the index's tiles too
        pooled, slices = query_slices(vectors, getattr(prepared, "slice_indices", None), getattr(prepared, "gap_mm", None),
                                      tiles=getattr(prepared, "tiles", 0), cropped=cropped)
        vector = pool_slices(pooled, self.searcher.config.preprocess.pool)
        record = None
        if region is not None:
            record = getattr(prepared, "region", None) or region.to_dict()
        return EncodedStudy(vector, prepared.modality, int(prepared.n_slices), loaded, slices, record)

    async def search(
        self, vector: np.ndarray, *, k: int, filters: Sequence[Filter], query: dict[str, Any], deadline: float,
        options: dict[str, Any] | None = None,
    ) -> QueryResult:
        """The ``k`` nearest cases to ``vector`` among those matching ``filters`` (after a refresh).

        ``options`` are further keywords of :meth:`Searcher.search_vector`.
        """
        def work() -> QueryResult:
            info = dict(query)
            if filters:  # as Searcher.search records them
                info["where"] = [str(f) for f in filters]
                info["matching_cases"] = int(self.searcher.store.matching(filters).sum())
            return self.searcher.search_vector(vector, k=k, where=list(filters), query=info, **(options or {}))

        result: QueryResult = await run_in_threadpool(self._locked, deadline, work)
        return result

    async def preview(self, path: Path, encoded: EncodedStudy) -> Preview:
        """The preview of the study at ``path``: from the volume already loaded, else decoded again here
        (only the slices a preview keeps), now that the service's decoder has shown the study decodes."""
        if encoded.loaded is not None:
            case, volume = encoded.loaded
            return await run_in_threadpool(make_preview, case, volume)
        return await run_in_threadpool(_load_preview, path)

    def _prepare_here(self, path: Path, region: Region | None = None) -> _InProcess:
        with pydicom_silenced():
            case, volume = load_study(path)
            seen = study_array(volume, self.searcher.encoder.info, self.searcher.config, region)
        return _InProcess(np.ascontiguousarray(seen.images, np.float32), volume.modality, int(volume.pixels.shape[0]), (case, volume),
                          seen.slice_indices, volume.gap_mm, seen.region, seen.tiles)

    def _locked(self, deadline: float, work: Callable[[], Any]) -> Any:
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Refused(503, "the service is busy with other queries; try again in a moment")
        try:
            self._refresh()
            return work()
        finally:
            self.lock.release()

    def _default_refresh(self) -> None:
        try:
            self.searcher.refresh()
        except MedsearchError:  # a broken or incompatible new commit: keep answering from the index loaded
            pass


def _load_preview(path: Path) -> Preview:
    def select_rows(case: CaseRef) -> tuple[Volume, list[Any]]:
        rows, columns = _size(case.header, "Rows"), _size(case.header, "Columns")
        return load_volume(case, select=lambda depth: preview_slices(depth, rows, columns))

    with pydicom_silenced():
        case, volume = load_study(path, load=select_rows)
    return make_preview(case, volume)


def _size(header: Any, keyword: str) -> int:
    """Rows or Columns of a header, for planning a preview (512 where it is not a usable number)."""
    try:
        value = int(getattr(header, keyword, 0) or 0)
    except (TypeError, ValueError):
        value = 0
    return value if value > 0 else 512
