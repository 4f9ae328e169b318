"""The page's Study UID field: the query study fetched from the service's PACS instead of dropped.

:func:`fetch_for_page` writes the study (:func:`medsearch.pacs.fetch_study_into`) into the folder
an upload would have been written to, so that the page's search goes on exactly as for an upload.
Its errors are :class:`~medsearch.web.uploads.Refused` with messages that never quote a UID.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from medsearch.errors import DicomWebAuthError, DicomWebError, InvalidStudyError
from medsearch.pacs import DicomWeb, fetch_study_into
from medsearch.web.uploads import Refused

__all__ = ["fetch_failure", "fetch_for_page"]

log = logging.getLogger(__name__)


async def fetch_for_page(server: DicomWeb | None, study_uid: str | None, series_uid: str | None, folder: Path) -> int:
    """Fetch the query study into ``folder``; return how many files it holds.

    Raises
    ------
    Refused
        422: the service has no PACS, or a series without a study; 404: the PACS does not hold it
        (or the study has several series); 502: the PACS cannot be reached or refuses the service.
    """
    if server is None:
        raise Refused(422, "this service has no PACS to fetch from; drop the study's files instead")
    if not study_uid or not study_uid.strip():
        raise Refused(422, "type the Study Instance UID of the study to fetch")
    try:
        fetched = await run_in_threadpool(fetch_study_into, server, study_uid.strip(), folder, series_uid=series_uid)
    except (InvalidStudyError, DicomWebError) as e:
        raise Refused(*fetch_failure(e, lambda m: m.replace(" with --series-uid", "").replace(" (--study-uid)", ""))) from None
    return len(fetched.files)


def fetch_failure(error: InvalidStudyError | DicomWebError, wording: Callable[[str], str]) -> tuple[int, str]:
    """The HTTP status and message for a query study the service could not fetch from its PACS.

    404 when the PACS does not hold it (its message put in the caller's ``wording``); 502 when the
    PACS cannot be reached or fails; 502 with a message of its own when the PACS refuses the service's
    credentials, which are logged for the operator (the user cannot act on them).
    """
    if isinstance(error, InvalidStudyError):
        return 404, wording(str(error))
    if isinstance(error, DicomWebAuthError):
        log.error("%s", error)
        return 502, "the PACS refused this service's credentials; tell the person who runs this service"
    return 502, str(error)
