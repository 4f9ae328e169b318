"""The query side: open an index with its encoder and find the cases most similar to a study.

These functions are the Python API and what the CLI calls::

    from medsearch import build_index, query
    report = build_index("archive/", "my-index", labels="labels.csv")
    result = query("study/", "my-index", k=5)
    result.to_frame()

:class:`Searcher` keeps an index and its encoder open for many queries; :func:`query` is one query;
:func:`index_info` says what an index holds. Building an index lives in :mod:`medsearch.indexing`,
which this module does not import: ``medsearch.search.build_index`` and ``IndexReport`` still work,
loaded from there on first use.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medsearch._json import plain
from medsearch.config import Config, as_config, config_for_index
from medsearch.deid import SiteKey, patient_pseudonym
from medsearch.embedding import Region, SliceSet, embed_volume, is_box, pool_slices, query_slices, study_array
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, IndexNotFoundError, KeyFileError
from medsearch.filters import Filter, parse_filters
from medsearch.io import CaseRef, Volume, load_study, scan
from medsearch.rerank import (
    LATE_DISTANCE_TEXT,
    LAYOUT_DISTANCE_TEXT,
    ON_BY_DEFAULT,
    candidate_count,
    location,
    rerank_rows,
    slice_matches,
)
from medsearch.sharing import DEFAULT_K, LinkTable, measure_k_anonymity
from medsearch.store import MANIFEST, IndexStore, SliceTable

if TYPE_CHECKING:  # for type checkers only: at run time, __getattr__ (below) loads them on first use
    from medsearch.indexing import IndexReport as IndexReport
    from medsearch.indexing import build_index as build_index

__all__ = [
    "Match",
    "QueryResult",
    "Searcher",
    "embed_volume",
    "index_info",
    "query",
]

# Names of the building side that callers have imported from here; see __getattr__.
_INDEXING = frozenset({"IndexReport", "build_index"})


def __getattr__(name: str) -> Any:
    """``build_index`` and ``IndexReport`` from :mod:`medsearch.indexing`, imported only when asked for."""
    if name in _INDEXING:
        import medsearch.indexing

        return getattr(medsearch.indexing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Match:
    """One retrieved case. ``distance``: lower is closer (see the index manifest's ``distance``)."""

    rank: int
    case_id: str
    distance: float
    metadata: dict[str, Any]
    source: dict[str, Any] | None = None  # only after QueryResult.resolve() with a link table
    # where the case matched, when both sides have slice vectors (medsearch.rerank.location):
    # best_slice, best_slice_mm, query_slice, query_slice_mm, slice_score
    location: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "case_id": self.case_id, "distance": self.distance, "metadata": self.metadata}
        if self.location is not None:
            out.update(self.location)
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass
class QueryResult:
    """The ranked cases most similar to one study."""

    query: dict[str, Any]
    results: list[Match]
    distance: str = ""
    labels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "distance": self.distance, "results": [m.to_dict() for m in self.results]}

    def resolve(self, links: str | Path) -> QueryResult:
        """The same result with each match's source location, from a link table (``index --links``).

        Raises
        ------
        ConfigError
            The link table is missing or not one.
        """
        path = Path(links)
        if not path.is_file():
            raise ConfigError(f"link table {path} does not exist; it is written by: medsearch index ... --links FILE")
        table = LinkTable(path)
        matches = [replace(m, source=table.resolve(m.case_id) or {"files": []}) for m in self.results]
        return replace(self, results=matches)

    def to_frame(self) -> pd.DataFrame:
        """A table: rank, case_id, distance, where each case matched when the results say so
        (``best_slice``, ``best_slice_mm``, ``query_slice``, ``query_slice_mm``, ``slice_score``,
        and ``best_box`` for a box query against crop vectors), then one column per metadata field."""
        rows = [{"rank": m.rank, "case_id": m.case_id, "distance": m.distance, **(m.location or {}), **m.metadata}
                for m in self.results]
        return pd.DataFrame(rows)


def query(
    study: str | Path,
    index_dir: str | Path,
    *,
    k: int = 10,
    config: Config | str | Path | None = None,
    where: str | Filter | Sequence[str | Filter] | None = None,
    volume: Volume | None = None,
    exclude_same_patient: bool = False,
    one_per_patient: bool = False,
    collapse_copies: bool = True,
    key: SiteKey | str | Path | None = None,
    slices: str | Sequence[int] | None = None,
    roi: str | Sequence[int] | None = None,
    rerank: bool | None = None,
    layout: bool | None = None,
) -> QueryResult:
    """The ``k`` cases of an index most similar to a study (a DICOM file or a series folder).

    ``slices`` (``"40:60"`` or ``(40, 60)``: a slab, 0 = the first slice in stack order, the stop
    excluded) and ``roi`` (``"X0,Y0,X1,Y1"``: a box in pixels on those slices, or on the middle
    slice) make it a region query; ``rerank`` orders the candidates by their slice vectors
    (:mod:`medsearch.rerank`; None: the default), ``layout`` matches those slices whole and tile by
    tile (None: a slab on an index with tiles). See :meth:`Searcher.search`.

    ``where`` keeps only the cases whose metadata match every filter, e.g.
    ``["modality=CT", "age>=60", "Contrast=True"]`` (see :mod:`medsearch.filters`); ``k`` results
    still come back whenever ``k`` cases match. ``volume``: the study as
    :func:`~medsearch.io.load_study` already decoded it (e.g. to draw it on a result sheet too), so
    that it is not decoded again; ``study`` is then only recorded in the result (and its header
    read again where ``exclude_same_patient`` needs it).

    The results are different cases: ``collapse_copies`` (on by default) keeps one of the cases
    whose pixels are exact copies; ``exclude_same_patient`` leaves out every case of the query's own
    patient (by the keyed patient pseudonym, which needs the site ``key`` the index was built with);
    ``one_per_patient`` keeps the best-ranked case of each patient. See :meth:`Searcher.search`.

    Raises
    ------
    InvalidStudyError
        The study is missing, not DICOM, has no image, or several series.
    IndexNotFoundError, IndexCorruptError
        ``index_dir`` is not a readable index.
    EncoderMismatchError
        ``config`` differs from the settings the index was built with.
    FilterError
        A filter is malformed, names a field the index lacks, or compares text as a number.
    KeyFileError
        ``exclude_same_patient`` without the site key the index was built with.
    """
    return Searcher(index_dir, config=config, key=key).search(
        study, k=k, where=where, volume=volume, exclude_same_patient=exclude_same_patient,
        one_per_patient=one_per_patient, collapse_copies=collapse_copies, slices=slices, roi=roi, rerank=rerank,
        layout=layout,
    )


def _manifest_stamp(index_dir: Path) -> tuple[int, int, int] | None:
    """What changes when a commit replaces the manifest (it is written anew, then renamed over)."""
    try:
        st = os.stat(index_dir / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Searcher:
    """An open index with its encoder, for many queries in a row (a notebook, a service).

    ``key`` is the site key the index was built with (a :class:`~medsearch.deid.SiteKey` or a key
    file); it is needed only to leave out the query's own patient, and is then loaded (by default
    from ``MEDSEARCH_SITE_KEY``, ``MEDSEARCH_KEY_FILE`` or ``~/.config/medsearch/site.key``).
    """

    def __init__(
        self,
        index_dir: str | Path,
        *,
        config: Config | str | Path | None = None,
        key: SiteKey | str | Path | None = None,
    ) -> None:
        self.index_dir = Path(index_dir)
        self._own_config = config is not None
        self._key_source = key
        self._key: SiteKey | None = None
        self._seen = _manifest_stamp(self.index_dir)
        _check_not_an_archive(self.index_dir)
        self.store = IndexStore.open(index_dir)
        self.config = config_for_index(self.store.manifest.config) if config is None else as_config(config)
        self.encoder = load_encoder(self.config.encoder, input_size=self.config.preprocess.size)
        self._adopt(self.store)

    def _adopt(self, store: IndexStore) -> None:
        store.check_compatible(self.encoder.info.to_dict(), self.config.to_dict()["preprocess"])
        if self._own_config:  # a config's search knobs apply to this searcher (not written to the index)
            store.configure(ef_search=self.config.index.ef_search, nprobe=self.config.index.nprobe)
        # a query box is widened to the tiles the index keeps (embedded_box): their grid, 0 without
        grid = int((store.manifest.config or {}).get("index", {}).get("crop_grid", 0)) if store.crops is not None else 0
        if grid != self.config.index.crop_grid:
            self.config = self.config.replace(index={"crop_grid": grid})
        self.store = store

    def refresh(self) -> bool:
        """Load the index again if ``medsearch index`` has committed to it since; True when it did.

        A long-lived searcher (``medsearch serve``, a notebook) calls this between queries: it costs
        one ``stat`` when nothing changed. Each commit is a consistent snapshot, so a query sees the
        index before or after a commit, never a mix.

        Raises
        ------
        IndexNotFoundError, IndexCorruptError, EncoderMismatchError
            The index on disk can no longer be opened with this searcher's encoder and settings; the
            searcher keeps the index it had, and the next call tries again.
        """
        stamp = _manifest_stamp(self.index_dir)
        if stamp == self._seen:
            return False
        store = IndexStore.open(self.index_dir)
        if store.manifest.files == self.store.manifest.files:  # names and checksums
            self._seen = stamp
            return False
        self._adopt(store)
        self._seen = stamp
        return True

    def info(self) -> dict[str, Any]:
        """What the loaded index holds, as :func:`index_info` says (without opening it again)."""
        return _store_info(self.store, self.index_dir)

    def search(
        self,
        study: str | Path,
        *,
        k: int = 10,
        where: str | Filter | Sequence[str | Filter] | None = None,
        volume: Volume | None = None,
        exclude_same_patient: bool = False,
        one_per_patient: bool = False,
        collapse_copies: bool = True,
        slices: str | Sequence[int] | None = None,
        roi: str | Sequence[int] | None = None,
        rerank: bool | None = None,
        layout: bool | None = None,
    ) -> QueryResult:
        """The ``k`` cases most similar to a study, among those matching ``where`` (see :func:`query`).

        Parameters
        ----------
        study
            A DICOM file or a folder holding one series.
        k
            How many cases to return; ``k`` come back whenever ``k`` cases remain after the
            filters and exclusions (faiss is asked for more candidates as needed).
        where
            Metadata filters that must all hold.
        volume
            The study already decoded (its pixels are not decoded again).
        exclude_same_patient
            Leave out every case of the query's patient: its keyed pseudonym, made from the study
            header as at indexing, with this searcher's site key.
        one_per_patient
            Keep only the best-ranked case of each patient.
        collapse_copies
            Cases whose pixels are exact copies (the same ``pixel_hash``, recorded at indexing)
            count once: the best-ranked is kept.
        slices, roi
            A region of the study to search with (see :class:`~medsearch.embedding.Region`): a slab
            of slices, a box on them (on the middle slice without a slab). The region's slices are
            embedded (a box cropped and resized to the encoder input) and matched against the
            slices of each case; the results say where each case matched.
        rerank
            Re-rank the case-vector candidates by late interaction over slice vectors
            (:mod:`medsearch.rerank`). None: on for region queries, else
            :data:`~medsearch.rerank.ON_BY_DEFAULT`. An index without slice vectors ranks by case
            vector, and ``query["rerank"]`` says so.
        layout
            Match the query's slices in layout, whole and tile by tile (:mod:`medsearch.rerank`),
            on an index that keeps tiles (``crop_grid``). None: a slab is matched in layout, a
            whole study not (:func:`~medsearch.embedding.in_layout`); ``query["rerank"]["layout"]``
            says whether it was.

        Returns
        -------
        QueryResult
            Ranks 1..n after the exclusions; ``query["excluded"]`` counts what each option left out.
            Each match carries ``best_slice`` (and ``query_slice``) where both sides have slice vectors.

        Raises
        ------
        ConfigError
            ``k`` is below 1, or a malformed ``slices`` or ``roi``.
        FilterError
            A bad filter (checked before the study is read).
        InvalidStudyError
            The study is missing, not DICOM, has no image, or several series.
        KeyFileError
            ``exclude_same_patient`` without the site key the index was built with.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        filters = parse_filters(where)
        region = Region.parse(slices=slices, roi=roi)  # a malformed region too
        matching = self.store.matching(filters)  # a bad filter fails before the study is decoded and encoded
        if exclude_same_patient:
            self.site_key()  # a missing key fails before the study is decoded too
        case: CaseRef | None = None
        min_size = self.config.index.min_image_size
        if volume is None:
            case, volume = load_study(study, min_size=min_size)
        patients: tuple[str, ...] = ()
        if exclude_same_patient:
            patients = (self._patient(case.header if case is not None else _study_header(study, min_size)),)
        seen = study_array(volume, self.encoder.info, self.config, region, layout)
        # the case vector pooled from the slice vectors (not the tiles), as embed_volume pools them
        pooled, slices_seen = query_slices(self.encoder.embed(seen.images), seen.slice_indices, volume.gap_mm, tiles=seen.tiles,
                                           cropped=is_box(region))
        vector = pool_slices(pooled, self.config.preprocess.pool)
        info: dict[str, Any] = {"path": str(study), "modality": volume.modality, "n_slices": int(volume.pixels.shape[0])}
        if seen.region is not None:
            info["region"] = seen.region
        if filters:
            info["where"] = [str(f) for f in filters]
            info["matching_cases"] = int(matching.sum())
        result = self.search_vector(
            vector, k=k, where=filters, query=info, exclude_patients=patients,
            one_per_patient=one_per_patient, collapse_copies=collapse_copies, slices=slices_seen,
            rerank=True if region is not None and rerank is None else rerank,
        )
        plan = result.query.get("rerank")
        if layout and isinstance(plan, dict) and plan.get("used") and not plan.get("layout"):
            plan["layout_note"] = ("slices matched without layout: " + (
                "a box is one tile already" if is_box(region) else
                "the index keeps no tiles; rebuild it with [index] crop_grid = 2 to match slices in layout"))
        return result

    def search_vector(
        self,
        vector: np.ndarray,
        *,
        k: int = 10,
        where: str | Filter | Sequence[str | Filter] | None = None,
        query: dict[str, Any] | None = None,
        exclude_patients: Collection[str] = (),
        one_per_patient: bool = False,
        collapse_copies: bool = True,
        slices: SliceSet | None = None,
        rerank: bool | None = None,
    ) -> QueryResult:
        """The ``k`` cases nearest to an embedding, among those matching ``where``.

        ``exclude_patients`` lists patient pseudonyms whose cases are left out (see
        :meth:`patient_of`); ``one_per_patient`` and ``collapse_copies`` as in :meth:`search`.
        ``slices``: the query's slice vectors (:func:`~medsearch.embedding.embed_slices`), for
        re-ranking (``rerank``, as in :meth:`search`) and to say where each result matched.

        Raises
        ------
        FilterError
            A filter is malformed or names a field the index lacks.
        """
        picker = _Picker(
            self.store.cases, exclude=frozenset(exclude_patients), one_per_patient=one_per_patient,
            collapse_copies=collapse_copies,
        )
        total = len(self.store)
        info = dict(query or {})
        late = self._rerank_plan(slices, rerank, info)
        ask = k if not picker.active else min(total, 2 * k + 16)
        if late:
            ask = candidate_count(k, total)
            info["rerank"]["candidates"] = ask
        found: dict[int, Any] = {}
        while True:
            hits = self.store.search(vector[None, :], max(ask, 1), where=where)
            valid = hits.ids[0] >= 0
            rows, distances = hits.ids[0][valid], hits.distances[0][valid]
            if late and slices is not None:
                rows, distances, matches = rerank_rows(self.store.slices, slices.vectors, slices.indices, rows, distances,
                                                       crops=self._crops(slices), query_tiles=slices.tiles)
                found = dict(zip(rows.tolist(), matches))
            kept = picker.pick(rows, distances, k)
            # done: k kept, or faiss gave fewer candidates than asked (none left), or all were asked
            if len(kept) >= k or int(valid.sum()) < ask or ask >= total:
                break
            ask = min(total, ask * 4)
        # only the rows returned: the whole table would cost more than the search on a large index
        records = self.store.cases.iloc[[row for row, _ in kept]].to_dict(orient="records")
        places = self._locations(slices, [row for row, _ in kept], found if late else None)
        results = []
        labels = set(self.store.manifest.label_columns)
        for rank, (record, (_, distance), place) in enumerate(zip(records, kept, places), start=1):
            record = {key: _label_value(v) if key in labels else plain(v) for key, v in record.items()}
            cid = record.pop("case_id")
            results.append(Match(rank=rank, case_id=cid, distance=round(float(distance), 6), metadata=record, location=place))
        if picker.active:
            info["excluded"] = picker.counts()
        # one slice against cases of one slice each: the late score is their cosine, as the text says
        volumes = late and slices is not None and (len(slices) > 1 or self._any_volume([row for row, _ in kept]))
        meaning = self.store.manifest.distance
        if late and (info.get("rerank") or {}).get("layout"):
            meaning = LAYOUT_DISTANCE_TEXT
        elif volumes:
            meaning = LATE_DISTANCE_TEXT
        return QueryResult(
            query=info,
            results=results,
            distance=meaning,
            labels=list(self.store.manifest.label_columns),
        )

    def _any_volume(self, rows: list[int]) -> bool:
        """Whether any of these cases keeps more than one slice vector."""
        table = self.store.slices
        return table is not None and bool(len(rows)) and bool((np.diff(table.offsets)[rows] > 1).any())

    def _rerank_plan(self, slices: SliceSet | None, rerank: bool | None, info: dict[str, Any]) -> bool:
        """Whether to re-rank by slice vectors; records the answer, and why not, in ``info["rerank"]``."""
        wanted = ON_BY_DEFAULT if rerank is None else rerank
        if not wanted:
            return False
        why = ""
        if self.store.slices is None:
            why = "the index holds no slice vectors (built before they were kept): ranked by case vector; rebuild the index to re-rank"
        elif slices is None or not len(slices):
            why = "the encoder sees no slices (a 3D encoder or tri-planar images): ranked by case vector"
        info["rerank"] = {"used": not why, **({"note": why} if why else {})}
        if not why and slices is not None:
            info["rerank"]["layout"] = slices.tiles is not None and self.store.crops is not None
        if not why and slices is not None and slices.cropped:
            info["rerank"]["crop_vectors"] = self.store.crops is not None
            if self.store.crops is None:
                info["rerank"]["crop_note"] = ("the index keeps no crop vectors: the box was matched against whole slices; "
                                               "rebuild it with [index] crop_grid = 2 to match tiles")
        return not why

    def _crops(self, slices: SliceSet) -> SliceTable | None:
        """The index's crop vectors, for a query of boxes or one matched in layout; None otherwise."""
        return self.store.crops if slices.cropped or slices.tiles is not None else None

    def _locations(
        self, slices: SliceSet | None, rows: list[int], found: dict[int, Any] | None
    ) -> list[dict[str, Any] | None]:
        """Where each result matched: from the re-ranking, else computed for these rows alone."""
        table = self.store.slices
        if slices is None or table is None or not len(slices) or not rows:
            return [None] * len(rows)
        if found is None:
            found = dict(zip(rows, slice_matches(table, slices.vectors, slices.indices, rows, crops=self._crops(slices),
                                                 query_tiles=slices.tiles)))
        gaps, counts = table.gaps, np.diff(table.offsets)
        # one image against one image: nothing to locate (but a box, which a tile may locate)
        single = len(slices) == 1 and int(slices.indices[0]) == 0 and not slices.cropped
        return [
            None if single and counts[row] <= 1 else
            location(found.get(row), query_gap=slices.gap_mm, case_gap=float(gaps[row]) if np.isfinite(gaps[row]) else None)
            for row in rows
        ]

    def site_key(self) -> SiteKey:
        """The site key this index was built with (loaded once).

        Raises
        ------
        KeyFileError
            No key is found, or it is not the key the index was built with.
        """
        if self._key is None:
            source = self._key_source
            try:
                key = source if isinstance(source, SiteKey) else SiteKey.load(source)
            except KeyFileError as e:
                raise KeyFileError(
                    f"leaving out the query's patient needs the site key {self.index_dir} was built with: {e}"
                ) from e
            if self.store.manifest.key_check and key.check_value() != self.store.manifest.key_check:
                raise KeyFileError(
                    f"index {self.index_dir} was built with another site key than {key}; give the key it was "
                    "built with (--key or MEDSEARCH_KEY_FILE) to leave out the query's patient"
                )
            self._key = key
        return self._key

    def patient_of(self, study: str | Path) -> str:
        """The keyed pseudonym of a study's patient, as the index records it (headers only, no pixels).

        Raises
        ------
        InvalidStudyError
            The study holds no readable DICOM image header.
        KeyFileError
            As :meth:`site_key`.
        """
        return self._patient(_study_header(study, self.config.index.min_image_size))

    def _patient(self, header: Any) -> str:
        key = self.site_key()
        return patient_pseudonym(key, header)


class _Picker:
    """Walks the candidates faiss found, closest first, and keeps those that are different cases."""

    def __init__(
        self, cases: pd.DataFrame, *, exclude: frozenset[str], one_per_patient: bool, collapse_copies: bool
    ) -> None:
        has_patient = "patient" in cases
        self.patients = cases["patient"].to_numpy() if has_patient and (exclude or one_per_patient) else None
        self.copies = cases["pixel_hash"].to_numpy() if collapse_copies and "pixel_hash" in cases else None
        self.exclude = exclude
        self.one_per_patient = one_per_patient and has_patient
        self.collapse = collapse_copies
        self.active = bool(exclude) or one_per_patient or self.copies is not None
        self._counts = {"same_patient": 0, "copies": 0, "other_cases_of_patient": 0}

    def pick(self, rows: np.ndarray, distances: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The first ``k`` candidates that are not left out, as (case-table row, distance)."""
        self._counts = dict.fromkeys(self._counts, 0)
        kept: list[tuple[int, float]] = []
        seen_copies: set[str] = set()
        seen_patients: set[str] = set()
        for row, distance in zip(rows.tolist(), distances.tolist()):
            if len(kept) >= k:
                break
            patient = self.patients[row] if self.patients is not None else None
            if patient is not None and patient in self.exclude:
                self._counts["same_patient"] += 1
                continue
            digest = self.copies[row] if self.copies is not None else None
            if isinstance(digest, str) and digest:
                if digest in seen_copies:
                    self._counts["copies"] += 1
                    continue
                seen_copies.add(digest)
            if self.one_per_patient and isinstance(patient, str) and patient:
                if patient in seen_patients:
                    self._counts["other_cases_of_patient"] += 1
                    continue
                seen_patients.add(patient)
            kept.append((row, distance))
        return kept

    def counts(self) -> dict[str, int]:
        """What the last :meth:`pick` left out, for the options in use."""
        used = {"same_patient": bool(self.exclude), "copies": self.collapse, "other_cases_of_patient": self.one_per_patient}
        return {name: n for name, n in self._counts.items() if used[name]}


def _label_value(value: Any) -> Any:
    """A label as written in its CSV: a whole number read back as a float (``71.0``) is ``71`` again."""
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _study_header(study: str | Path, min_size: int) -> Any:
    """The header of a query study's one case (read, not decoded), as the index's row was made from.

    Raises
    ------
    InvalidStudyError
        The study holds no image, or several series.
    """
    found = scan(Path(study), min_size=min_size) if Path(study).exists() else None
    if found is None or len(found.cases) != 1:
        # the full loader says precisely what is wrong with the study
        return load_study(study, min_size=min_size)[0].header
    case = found.cases[0]
    header = case.header
    if not str(header.get("PatientID", "") or "") and not str(header.get("StudyInstanceUID", "") or ""):
        # as at indexing: a file without patient or study identity is its own patient, under the
        # stand-in study key the scan gave it
        header = copy.copy(header)
        header.StudyInstanceUID = case.study_uid
    return header


def _check_not_an_archive(index_dir: Path) -> None:
    """Refuse, with what to do, a folder of DICOM files given where an index belongs.

    Raises
    ------
    IndexNotFoundError
        ``index_dir`` is a folder of other files with no manifest.
    """
    if not index_dir.is_dir() or (index_dir / MANIFEST).exists():
        return
    with os.scandir(index_dir) as listing:
        names = sorted(entry.name for entry in listing if not entry.name.startswith("."))
    if names:
        raise IndexNotFoundError(
            f"{index_dir} is not a medsearch index but a folder of {len(names)} file(s) or folder(s) (an archive?); "
            f"index it first: medsearch index {index_dir} --index NEW_FOLDER, then query with --index NEW_FOLDER"
        )


def index_info(index_dir: str | Path, *, verify: bool = False, k_anonymity: int = DEFAULT_K) -> dict[str, Any]:
    """What an index holds: counts, encoder, metric, preprocessing, label columns, and per-field tallies.

    With ``verify``, every data file is hashed and compared with the manifest's SHA-256, even the
    files this machine verified before (an ordinary open checks sizes, and hashes only files that
    changed since they were last verified); ``"verified"`` lists the files checked.
    ``"k_anonymity"`` measures the groups of patients over the quasi-identifiers: the smallest
    group, and how many patients are in groups below ``k_anonymity``
    (:func:`medsearch.sharing.measure_k_anonymity`; ``export-index`` generalizes until there are none).

    Raises
    ------
    IndexNotFoundError
        ``index_dir`` holds no index (an archive given by mistake is named as one).
    IndexCorruptError
        A data file is missing, truncated or does not match its checksum (the message names it).
    ConfigError
        ``k_anonymity`` is below 1.
    """
    _check_not_an_archive(Path(index_dir))
    return _store_info(IndexStore.open(index_dir, verify=verify), index_dir, verify=verify, k=k_anonymity)


def _store_info(store: IndexStore, index_dir: str | Path, *, verify: bool = False, k: int = DEFAULT_K) -> dict[str, Any]:
    m = store.manifest
    cases = store.cases
    tallies = {
        col: {str(k): int(v) for k, v in cases[col].astype(object).fillna("unknown").value_counts().head(12).items()}
        for col in ("modality", "body_part", "sex", "age_band", "manufacturer")
        if col in cases
    }
    return {
        "index_dir": str(index_dir),
        "cases": len(store),
        "dim": m.dim,
        "metric": m.metric.value,
        "distance": m.distance,
        "index": {k: m.index.to_dict()[k] for k in ("type", "requested", "params", "ef_search", "nprobe", "memory_budget_mb", "note")},
        "encoder": {k: m.encoder.get(k) for k in ("name", "dim", "weights_sha256")},
        "preprocess": m.preprocess,
        "label_columns": m.label_columns,
        "updated": m.updated,
        "last_run": m.last_run or {},
        "tallies": tallies,
        "verified": sorted(entry.name for entry in m.files.values()) if verify else [],
        "slice_vectors": _slice_info(store.slices),
        "crop_vectors": _slice_info(store.crops),
        "k_anonymity": measure_k_anonymity(cases, k=k).to_dict(),
    }


def _slice_info(table: SliceTable | None) -> dict[str, Any]:
    """What the index keeps of slice (or crop) vectors: how many, for how many cases, and their bytes per case."""
    if table is None:
        return {"kept": False}
    with_slices = int((np.diff(table.offsets) > 0).sum())
    return {
        "kept": True,
        "vectors": table.n_slices,
        "cases_with_slices": with_slices,
        "mean_per_case": round(table.n_slices / max(with_slices, 1), 1),
        "bytes_per_case": round(table.nbytes() / max(len(table), 1)),
    }
