"""The web page of ``medsearch serve``: drop a study in a browser, see its most similar cases.

What lives here:

- :mod:`medsearch.web.routes`: the page, its files and the JSON endpoints it calls (a FastAPI router);
- :mod:`medsearch.web.engine`: how those endpoints reach the service's index, lock and decoder;
- :mod:`medsearch.web.uploads`: receiving one DICOM file, several, or a series folder in one request;
- :mod:`medsearch.web.studies`: the query studies kept a while (case vector, pixel preview);
- :mod:`medsearch.web.auth`: credentials (``--auth-file``), cookie sessions, the gate, and the
  refusal to serve a non-loopback address without them;
- :mod:`medsearch.web.audit`: the audit log of every query;
- :mod:`medsearch.web.pictures`: pictures of the index's cases (stored thumbnails; with the link
  table, the slice of a case that matched, read from the archive);
- ``static/``: the page itself (HTML, a stylesheet, and vanilla-JS modules: ``app.js`` wires the
  controls; ``page.js`` holds the elements, state and calls to the service; ``filters.js``,
  ``send.js``, ``viewer.js``, ``region.js`` and ``results.js`` one part of the page each), shipped
  in the package: it loads nothing from anywhere else.

:func:`mount_page` puts all of it on an application::

    from fastapi import FastAPI
    from medsearch.search import Searcher
    from medsearch.web import PageEngine, mount_page

    app = FastAPI()
    mount_page(app, PageEngine(Searcher("my-index")), max_upload_bytes=512_000_000)
"""

from __future__ import annotations

from fastapi import FastAPI

from medsearch.pacs import DicomWeb
from medsearch.web.audit import AUDIT_FILE, AuditedQueries, AuditLog
from medsearch.web.auth import Access, AuthGate, Credentials, Sessions, check_exposure, is_loopback
from medsearch.web.engine import PageEngine
from medsearch.web.pictures import CaseSlices
from medsearch.web.routes import MAX_K, create_router
from medsearch.web.studies import StudyCache
from medsearch.web.uploads import Refused

__all__ = [
    "AUDIT_FILE",
    "MAX_K",
    "Access",
    "AuditLog",
    "AuditedQueries",
    "AuthGate",
    "CaseSlices",
    "Credentials",
    "PageEngine",
    "Refused",
    "Sessions",
    "StudyCache",
    "check_exposure",
    "create_router",
    "is_loopback",
    "mount_page",
]


def mount_page(
    app: FastAPI,
    engine: PageEngine,
    *,
    max_upload_bytes: int,
    credentials: Credentials | None = None,
    audit: AuditLog | None = None,
    audited_paths: tuple[str, ...] = (),
    dicomweb: DicomWeb | None = None,
    links: CaseSlices | None = None,
) -> Access:
    """Add the page's routes to ``app``, and the gate in front of all of ``app``'s routes.

    With ``credentials``, every route but ``/login``, ``/static/...`` and ``/health`` needs a bearer
    token, basic credentials or a signed-in session (:class:`AuthGate`). With ``audit``, the page's
    queries are recorded, and so are the ``POST`` requests to ``audited_paths`` (the JSON API's
    ``/query``: :class:`AuditedQueries`). Returns the :class:`Access` the gate checks with (its
    sessions, its failed attempts). With ``dicomweb``, the page shows a Study UID field and fetches
    that study from the PACS (:mod:`medsearch.web.pacs`). With ``links`` (the index's link table),
    each result shows the slice that matched, read from the archive (:mod:`medsearch.web.pictures`).
    """
    access = Access(credentials)
    app.include_router(create_router(engine, max_upload_bytes=max_upload_bytes, access=access, audit=audit, dicomweb=dicomweb,
                                     links=links))
    if audit is not None and audited_paths:
        app.add_middleware(AuditedQueries, audit=audit, paths=audited_paths)
    app.add_middleware(AuthGate, access=access)  # added last: the outermost, so the audit knows the user
    return access
