"""Queries by Study Instance UID: ``POST /query?study_uid=...`` fetches the study from the service's PACS.

:func:`fetch_query_study` gets the study (or the ``series_uid`` series of it) from the DICOMweb
server given to ``medsearch serve --dicomweb`` into a temporary folder that the caller's
:class:`contextlib.ExitStack` removes; the folder then goes through the same bounded decoder and
search as an upload. The UIDs never appear in an answer, a log line or the audit log: errors name
the server and say what to do, and the audit log records the request's ``k``, filters and options only.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from medsearch.errors import DicomWebError, InvalidStudyError
from medsearch.pacs import DicomWeb, fetched_study
from medsearch.serve.http import _UploadError
from medsearch.web.pacs import fetch_failure

__all__ = ["UidsHidden", "fetch_query_study", "hide_uids_in_access_log"]


_UID_PARAMETER = re.compile(r"((?:study|series)_uid=)[^&\s]*", re.IGNORECASE)


class UidsHidden(logging.Filter):
    """Writes ``study_uid=...`` and ``series_uid=...`` of a logged request line as ``(withheld)``.

    uvicorn's access log quotes each request's path with its query string, where a query by UID
    carries the UIDs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_UID_PARAMETER.sub(r"\1(withheld)", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _UID_PARAMETER.sub(r"\1(withheld)", record.msg)
        return True


def hide_uids_in_access_log() -> None:
    """Add :class:`UidsHidden` to uvicorn's access logger (once)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, UidsHidden) for f in logger.filters):
        logger.addFilter(UidsHidden())


async def fetch_query_study(
    server: DicomWeb | None, study_uid: str | None, series_uid: str | None, stack: contextlib.ExitStack
) -> Path:
    """The query study, fetched into a temporary folder that ``stack`` removes when closed.

    Raises
    ------
    _UploadError
        422: no PACS configured, or ``series_uid`` without ``study_uid``; 404: the PACS does not hold
        the study (or it holds several series and none was picked); 502: the PACS cannot be
        reached, refuses the service's credentials or fails the retrieval.
    """
    if server is None:
        raise _UploadError(422, "this service has no PACS to fetch a study from; start it with --dicomweb URL, or upload the study")
    if study_uid is None:
        raise _UploadError(422, "series_uid picks a series of study_uid; give study_uid too")
    try:
        return await run_in_threadpool(stack.enter_context, fetched_study(server, study_uid.strip(), series_uid=series_uid))
    except (InvalidStudyError, DicomWebError) as e:
        raise _UploadError(*fetch_failure(e, lambda m: m.replace("--series-uid", "series_uid").replace("--study-uid", "study_uid"))) from None
