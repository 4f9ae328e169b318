"""Connecting to a PACS: DICOMweb (QIDO-RS to list, WADO-RS to fetch) through ``dicomweb-client``.

- ``client``: :class:`DicomWeb`, a server with its credentials (environment or a file, never the
  command line), bounded retries and one-line errors that name the server, never a UID;
- ``listing``: :func:`list_series`, the series a server holds, by modality and study date;
- ``fetch``: :func:`fetch_series` (one series into a folder, as stored, whole or only what a case
  needs) and :func:`fetched_study` (a query study in a temporary folder);
- ``partial``: :class:`SlicePlan` and the header-only files that let a series be fetched in part;
- ``state``: :class:`SyncState`, which series an index already holds, under keyed pseudonyms;
- ``viewer``: :func:`viewer_url`, a link back to the study in a viewer (OHIF, Orthanc, a template).

Indexing from a server is :func:`medsearch.build_index` with a URL as the archive
(:mod:`medsearch.indexing.dicomweb`); a query by Study UID is :func:`fetched_study` then
:func:`medsearch.query`.
"""

from __future__ import annotations

from medsearch.pacs.client import (
    ENV_AUTH_FILE,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    Credentials,
    DicomWeb,
    RequestFailed,
    is_dicomweb_url,
    public_url,
    read_credentials,
)
from medsearch.pacs.fetch import Fetched, fetch_series, fetch_study_into, fetched_study
from medsearch.pacs.listing import RemoteSeries, date_range, list_series
from medsearch.pacs.partial import SlicePlan
from medsearch.pacs.state import SeriesRecord, SyncState, series_token
from medsearch.pacs.viewer import VIEWERS, viewer_url

__all__ = [
    "ENV_AUTH_FILE",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "VIEWERS",
    "Credentials",
    "DicomWeb",
    "Fetched",
    "RemoteSeries",
    "RequestFailed",
    "SeriesRecord",
    "SlicePlan",
    "SyncState",
    "date_range",
    "fetch_series",
    "fetch_study_into",
    "fetched_study",
    "is_dicomweb_url",
    "list_series",
    "public_url",
    "read_credentials",
    "series_token",
    "viewer_url",
]
