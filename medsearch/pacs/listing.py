"""What a DICOMweb server holds: its series, listed by QIDO-RS, with optional modality and date filters.

:func:`list_series` asks for every series at once (by ``Modality``, and ``StudyDate`` as a
relational key), or, from a server that does not answer that, for the studies (by ``StudyDate`` and
``ModalitiesInStudy``) then the series of each; it returns one :class:`RemoteSeries` per series, in
a stable order. Only the attributes needed to fetch and to recognise a series are asked for; its
UIDs stay in memory and are never printed (``repr`` leaves them out).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from medsearch.errors import ConfigError, DicomWebError
from medsearch.pacs.client import DicomWeb, RequestFailed

__all__ = ["RemoteSeries", "date_range", "list_series"]

_STUDY_UID, _SERIES_UID = "0020000D", "0020000E"
_MODALITY, _STUDY_DATE, _N_INSTANCES = "00080060", "00080020", "00201209"
_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
_MODALITY_CODE = re.compile(r"[A-Z0-9]{1,16}")
_PAGE = 1000  # results per QIDO request (servers cap a page; Orthanc's LimitFindResults, often 100 to 1000)


@dataclass(frozen=True)
class RemoteSeries:
    """One series on a DICOMweb server: its UIDs (never shown), modality and instance count."""

    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str = ""
    n_instances: int = 0


def date_range(since: str | None, until: str | None) -> str | None:
    """A QIDO ``StudyDate`` range from ``since``/``until`` (``YYYYMMDD`` or ``YYYY-MM-DD``, both inclusive).

    >>> date_range("2024-01-01", None)
    '20240101-'

    Raises
    ------
    ConfigError
        A date is not written as ``YYYYMMDD`` or ``YYYY-MM-DD``, or ``since`` is after ``until``.
    """
    if not since and not until:
        return None
    dates = []
    for name, value in (("--since", since), ("--until", until)):
        if not value:
            dates.append("")
            continue
        match = _DATE.fullmatch(value.strip())
        if match is None:
            raise ConfigError(f"{name} {value!r} is not a date; write it as YYYYMMDD or YYYY-MM-DD, e.g. 20240131")
        dates.append("".join(match.groups()))
    if dates[0] and dates[1] and dates[0] > dates[1]:
        raise ConfigError(f"--since {since} is after --until {until}; swap them")
    return f"{dates[0]}-{dates[1]}"


def _modality(value: str | None) -> str | None:
    if not value:
        return None
    code = value.strip().upper()
    if not _MODALITY_CODE.fullmatch(code):
        raise ConfigError(f"--modality {value!r} is not a DICOM modality code; give one like CT, MR, CR or DX")
    return code


def list_series(
    server: DicomWeb,
    *,
    modality: str | None = None,
    since: str | None = None,
    until: str | None = None,
    study_uid: str | None = None,
) -> list[RemoteSeries]:
    """The series of ``server`` (of one study with ``study_uid``), filtered, ordered by study then series UID.

    ``modality`` keeps the series of that modality (and, to ask the server less, only the studies
    that hold one); ``since`` and ``until`` keep the studies of those dates (inclusive).

    Raises
    ------
    ConfigError
        A filter is malformed.
    DicomWebError
        The server cannot be reached, refuses the credentials, or fails the search.
    """
    code = _modality(modality)
    dates = date_range(since, until)
    try:
        return _list(server, code, dates, study_uid)
    except RequestFailed as e:
        if study_uid is not None and e.status == 404:
            return []  # a server that answers "not found" for a study it does not hold
        if e.status is not None and e.status >= 500:
            raise
        raise DicomWebError(
            f"{e}; check that {server.public_url} is the DICOMweb root (where QIDO-RS answers /studies), "
            "e.g. http://127.0.0.1:8042/dicom-web for Orthanc"
        ) from None


def _list(server: DicomWeb, code: str | None, dates: str | None, study_uid: str | None) -> list[RemoteSeries]:
    if study_uid is None:
        every = _all_series(server, code, dates)
        if every is not None:
            return every
    if study_uid is not None:
        studies = [study_uid]
    else:
        filters: dict[str, Any] = {}
        if dates:
            filters["StudyDate"] = dates
        if code:
            filters["ModalitiesInStudy"] = code
        found = _paged(
            server, "the search for studies", _STUDY_UID,
            lambda c, *, offset: c.search_for_studies(fields=["StudyInstanceUID"], search_filters=filters, limit=_PAGE, offset=offset),
        )
        studies = sorted({uid for item in found if (uid := _value(item, _STUDY_UID))})
    out: list[RemoteSeries] = []
    for study in studies:
        out.extend(_series_of(server, study, code))
    return out


def _all_series(server: DicomWeb, modality: str | None, dates: str | None) -> list[RemoteSeries] | None:
    """Every series in one (paged) search at the series level, with the study date as a relational key;
    None where the server does not answer such a search (then the studies are listed first, then the
    series of each: one request per study)."""
    filters: dict[str, Any] = {}
    if modality:
        filters["Modality"] = modality
    if dates:
        filters["StudyDate"] = dates
    try:
        found = _paged(
            server, "the search for series", _SERIES_UID,
            lambda c, *, offset: c.search_for_series(
                fields=["StudyInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"], search_filters=filters,
                limit=_PAGE, offset=offset,
            ),
        )
    except RequestFailed as e:
        if e.status in (400, 404, 405, 501):  # no relational search here
            return None
        raise
    out = []
    for item in found:
        study, series = _value(item, _STUDY_UID), _value(item, _SERIES_UID)
        if not study:
            return None  # a server that leaves the study out of series results: ask study by study
        if not series or (modality and (_value(item, _MODALITY) or "").upper() != modality):
            continue
        count = _value(item, _N_INSTANCES)
        out.append(RemoteSeries(study, series, _value(item, _MODALITY) or "", int(count) if count else 0))
    return sorted(out, key=lambda s: (s.study_uid, s.series_uid))


def _series_of(server: DicomWeb, study: str, modality: str | None) -> Iterator[RemoteSeries]:
    filters = {"Modality": modality} if modality else {}
    found = _paged(
        server, "the search for the series of a study", _SERIES_UID,
        lambda c, *, offset: c.search_for_series(
            study, fields=["Modality", "NumberOfSeriesRelatedInstances"], search_filters=filters, limit=_PAGE, offset=offset
        ),
    )
    series = []
    for item in found:
        uid = _value(item, _SERIES_UID)
        if not uid or (modality and (_value(item, _MODALITY) or "").upper() != modality):
            continue  # a server that ignores the filter still gets it applied
        count = _value(item, _N_INSTANCES)
        series.append(RemoteSeries(study, uid, _value(item, _MODALITY) or "", int(count) if count else 0))
    yield from sorted(series, key=lambda s: s.series_uid)


def _paged(
    server: DicomWeb, what: str, uid_tag: str, search: Callable[..., list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Every result of a QIDO search, a page of :data:`_PAGE` at a time.

    The library's own paging (``get_remaining``) asks until a page comes back empty, which never
    happens with a server that ignores ``offset``; here a short page, or one that adds no new UID,
    ends it.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = server.call(what, functools.partial(search, offset=offset))
        fresh = [item for item in page if (uid := _value(item, uid_tag)) and uid not in seen]
        seen.update(_value(item, uid_tag) or "" for item in fresh)
        out.extend(fresh)
        if len(page) < _PAGE or not fresh:
            return out
        offset += len(page)


def _value(item: dict[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON dataset, as text (None when absent)."""
    values = (item.get(tag) or {}).get("Value") or []
    return None if not values or values[0] is None else str(values[0])
