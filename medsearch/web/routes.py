"""The page's endpoints: the page itself, its files, sign-in, and the JSON it asks for.

:func:`create_router` returns a FastAPI router that ``medsearch serve`` includes beside its JSON API:

* ``GET /``: the page (``static/index.html``); ``GET /static/NAME``: its script and style;
* ``GET /login``, ``POST /login``, ``POST /logout``: sign-in with a name and secret of the auth file
  (a session cookie), when the service has credentials;
* ``GET /api/options``: what the filter controls offer (the index's modalities, body parts, sexes,
  age range, label columns and their values), ``k``'s range, and which features are on;
* ``POST /api/search``: a study (one DICOM file as the body, or any number of files as a
  ``multipart/form-data`` form: several files or the files of a series folder) and the query
  (``k``, ``where`` filters as ``query --where``, ``exclude_same_patient``, ``one_per_patient``,
  and for a region query ``slices=START:STOP`` and ``roi=X0,Y0,X1,Y1`` as ``query --slices/--roi``,
  re-ranked). The answer is the JSON of ``query --json`` plus ``study`` (a token for the study, or
  for its region, kept a while: :mod:`medsearch.web.studies`), ``preview`` (how to draw the whole
  study) and each result's ``thumbnail`` URL. The service keeps no file of a study, so the page
  sends the files again (or the Study UID) for each region it searches;
* ``GET /api/search?study=TOKEN&k=...``: the same query again for a kept study (or region), with
  other filters or ``k`` (a reload, a shared link), without another upload;
* ``GET /api/study/TOKEN/slice/I``: slice ``I`` of a kept study's preview, as raw little-endian pixels;
* ``GET /api/thumbnail/CASE_ID``: a case's stored thumbnail as a PNG;
* ``GET /api/case/CASE_ID/slice/I?box=X0,Y0,X1,Y1``: with the index's link table
  (:mod:`medsearch.web.pictures`), slice ``I`` of a case read from the archive, as the result sheet
  draws it (the box outlined), as a PNG: the page shows each result's best-matching slice so.

Every query is written to the audit log (:mod:`medsearch.web.audit`), with the user the gate let in.
Every error is a JSON ``{"error": "..."}`` line, as for the rest of the service, and no answer
carries a file name, a UID or a header value: the upload's files are named by their position
("uploaded file 3").
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medsearch.embedding import Region, sees_slices
from medsearch.errors import (
    EncoderMismatchError,
    IndexCorruptError,
    IndexNotFoundError,
    InvalidStudyError,
    KeyFileError,
    MedsearchError,
)
from medsearch.filters import Filter
from medsearch.pacs import DicomWeb
from medsearch.search import QueryResult
from medsearch.sheets import CAPTION_FIELDS
from medsearch.web.audit import AuditLog
from medsearch.web.auth import Access, client_address, request_user, session_cookie
from medsearch.web.engine import EncodedStudy, PageEngine
from medsearch.web.pacs import fetch_for_page
from medsearch.web.pictures import CaseSlices, png
from medsearch.web.studies import StudyCache
from medsearch.web.uploads import Refused, receive_files, upload_folder, upload_name

__all__ = ["MAX_K", "SCRIPTS", "create_router"]

log = logging.getLogger(__name__)

#: The largest ``k`` the page's endpoints accept (as ``POST /query``).
MAX_K = 1000
#: The page's files: its script (ES modules: app.js imports the others), style and HTML.
SCRIPTS = ("app.js", "page.js", "filters.js", "send.js", "viewer.js", "region.js", "results.js")
_STATIC = {
    **{name: "text/javascript; charset=utf-8" for name in SCRIPTS},
    "style.css": "text/css; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
    "login.html": "text/html; charset=utf-8",
}
# The page loads nothing from anywhere else, and nothing may frame it.
_PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
_CHOICE_FIELDS = ("modality", "body_part", "sex")
_MAX_CHOICES = 60  # a label column with more distinct values gets a text box, not a list
_LOGIN_FAILED = '<p class="error" role="alert">That name and secret do not match; try again.</p>'
_LOGIN_BLOCKED = '<p class="error" role="alert">Too many failed sign-ins from this computer; wait five minutes.</p>'


def create_router(
    engine: PageEngine,
    *,
    max_upload_bytes: int,
    access: Access | None = None,
    audit: AuditLog | None = None,
    studies: StudyCache | None = None,
    dicomweb: DicomWeb | None = None,
    links: CaseSlices | None = None,
) -> APIRouter:
    """The page and its endpoints, for one service.

    Parameters
    ----------
    engine
        The service's way to its index (:class:`~medsearch.web.engine.PageEngine`).
    max_upload_bytes
        The largest upload (all files of a study together).
    access
        The service's credentials and sessions, shared with its :class:`~medsearch.web.auth.AuthGate`
        (None: no sign-in).
    audit
        Where every query is recorded (None: nowhere).
    studies
        The kept query studies (a new :class:`StudyCache` by default).
    dicomweb
        The PACS the service fetches a study from by its Study Instance UID (None: none; the field is hidden).
    links
        The index's link table, to show the slice of each result that matched (None: the stored thumbnails only).
    """
    router = APIRouter()
    files = {name: (resources.files("medsearch.web") / "static" / name).read_bytes() for name in _STATIC}
    kept = studies if studies is not None else StudyCache()
    searcher = engine.searcher
    rows = _CaseRows()

    @router.get("/")
    async def page() -> Response:
        return Response(files["index.html"], media_type=_STATIC["index.html"], headers=_PAGE_HEADERS)

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _STATIC or name.endswith(".html"):
            return _error(404, f"no file {name!r} here")
        return Response(files[name], media_type=_STATIC[name],
                        headers={**_PAGE_HEADERS, "cache-control": "no-cache"})

    @router.get("/login")
    async def login_page(request: Request) -> Response:
        if access is None or not access.required or getattr(request.state, "user", None):
            return _redirect(_local_target(request.query_params.get("next")))
        message = _LOGIN_FAILED if request.query_params.get("failed") else ""
        return _login(files["login.html"], message, 200, _local_target(request.query_params.get("next")))

    @router.post("/login")
    async def login(request: Request) -> Response:
        if access is None or not access.required:
            return _redirect("/")
        form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
        name, secret = str(form.get("user") or ""), str(form.get("password") or "")
        target = _local_target(str(form.get("next") or ""))
        try:
            token = access.sign_in(name, secret, client_address(request.scope))
        except PermissionError:
            return _login(files["login.html"], _LOGIN_BLOCKED, 429, target)
        if token is None:
            log.info("a failed sign-in from %s", client_address(request.scope))
            return _redirect(f"/login?failed=1&next={_quote(target)}")
        response = _redirect(target)
        response.headers["set-cookie"] = session_cookie(token, secure=request.url.scheme == "https")
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        token = request.cookies.get("medsearch_session")
        if access is not None and token:
            access.sessions.close(token)
        response = _redirect("/login" if access is not None and access.required else "/")
        response.headers["set-cookie"] = session_cookie("", secure=request.url.scheme == "https", clear=True)
        return response

    @router.get("/api/options")
    async def options(request: Request) -> Response:
        return _json(_options(engine, max_upload_bytes, access, request, dicomweb is not None, links is not None))

    @router.post("/api/search")
    async def search_upload(
        request: Request,
        k: int = 10,
        where: Annotated[list[str] | None, Query()] = None,
        exclude_same_patient: bool = False,
        one_per_patient: bool = False,
        study_uid: str | None = None,
        series_uid: str | None = None,
        slices: str | None = None,
        roi: str | None = None,
    ) -> Response:
        asked = _Asked(k, {"exclude_same_patient": exclude_same_patient, "one_per_patient": one_per_patient})
        try:
            deadline = engine.deadline()
            _check_k(k)
            region = Region.parse(slices=slices, roi=roi)  # a malformed region fails before the upload is read
            asked.region = region.to_dict() if region is not None else None
            asked.filters = await engine.filters(where, deadline)
            if exclude_same_patient:
                await _site_key(engine)  # a missing key fails before the upload is read
            with upload_folder() as folder:
                if study_uid is None and series_uid is None:
                    count = await _receive(request, folder, max_upload_bytes, deadline)
                    path = folder / upload_name(1) if count == 1 else folder
                else:  # the Study UID field: fetched from the PACS where an upload would be written
                    count, path = await fetch_for_page(dicomweb, study_uid, series_uid, folder), folder
                try:
                    encoded = await engine.encode(path, deadline, region)
                    preview = await engine.preview(path, encoded)
                    patient = await _patient(engine, path)
                except (MedsearchError, Refused) as e:
                    raise _StudyProblem(e, folder, count) from e
            study = kept.add(encoded.vector, _query_info(encoded), preview,
                             {"patient": patient, "slices": encoded.slices, "region": encoded.region is not None})
            asked.result = await engine.search(study.vector, k=k, filters=asked.filters, query=dict(study.query),
                                               deadline=deadline, options=_search_options(asked.choices, study.extra))
            response = _json(_answer(asked.result, study.token, study.query, preview.describe(), asked.choices, engine))
        except Exception as e:  # noqa: BLE001 - every failure becomes one JSON line; see _failure
            asked.status, message = _failure(e)
            response = _error(asked.status, message)
        return _recorded(audit, request, asked, response)

    @router.get("/api/search")
    async def search_again(
        request: Request,
        study: str,
        k: int = 10,
        where: Annotated[list[str] | None, Query()] = None,
        exclude_same_patient: bool = False,
        one_per_patient: bool = False,
    ) -> Response:
        asked = _Asked(k, {"exclude_same_patient": exclude_same_patient, "one_per_patient": one_per_patient})
        try:
            deadline = engine.deadline()
            _check_k(k)
            asked.filters = await engine.filters(where, deadline)
            held = kept.get(study)
            if held is None:
                raise Refused(404, "this study is no longer held by the service (it keeps the last ones, until it "
                                   "restarts); drop the study on the page again")
            asked.region = held.query.get("region")
            if exclude_same_patient and not held.extra.get("patient"):
                await _site_key(engine)
                raise Refused(422, "the patient of this study is not known; drop the study again to leave out its patient")
            asked.result = await engine.search(held.vector, k=k, filters=asked.filters, query=dict(held.query),
                                               deadline=deadline, options=_search_options(asked.choices, held.extra))
            preview = held.preview.describe() if held.preview is not None else None
            response = _json(_answer(asked.result, held.token, held.query, preview, asked.choices, engine))
        except Exception as e:  # noqa: BLE001 - every failure becomes one JSON line; see _failure
            asked.status, message = _failure(e)
            response = _error(asked.status, message)
        return _recorded(audit, request, asked, response)

    @router.get("/api/study/{token}/slice/{index}")
    async def study_slice(token: str, index: int) -> Response:
        held = kept.get(token)
        if held is None or held.preview is None:
            return _error(404, "this study is no longer held by the service; drop it on the page again")
        try:
            data = held.preview.slice_bytes(index)
        except IndexError:
            return _error(404, f"the preview of this study has no slice {index}")
        return Response(data, media_type="application/octet-stream",
                        headers={"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"})

    @router.get("/api/thumbnail/{case_id}")
    async def thumbnail(case_id: str) -> Response:
        store = searcher.store
        thumbs = store.thumbnails
        row = rows(store).get(case_id)
        if thumbs is None or row is None or not thumbs[row].any():
            return _error(404, "no thumbnail is stored for this case")
        return Response(png(thumbs[row]), media_type="image/png",
                        headers={"cache-control": "private, max-age=86400", "x-content-type-options": "nosniff"})

    @router.get("/api/case/{case_id}/slice/{index}")
    async def case_slice(case_id: str, index: int, box: str | None = None) -> Response:
        if links is None:
            return _error(404, "this service reads no case from the archive; start it with --links FILE (the index's "
                               "link table) to show the slices that matched")
        try:
            region = Region.parse(roi=box) if box is not None else None
        except MedsearchError as e:
            return _error(422, str(e))
        if index < 0 or rows(searcher.store).get(case_id) is None:
            return _error(404, "no such case or slice in this index")
        store = searcher.store
        size = int(store.thumbnails.shape[1]) if store.thumbnails is not None else 256
        picture = await run_in_threadpool(links.picture, case_id, index, searcher.config.preprocess, size,
                                          region.roi if region is not None else None)
        if picture is None:
            return _error(404, "this case's files cannot be read where the link table says (moved, deleted, or on a "
                               "PACS only); its stored thumbnail stands in")
        return Response(png(picture), media_type="image/png",
                        headers={"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"})

    return router


# -- queries ----------------------------------------------------------------------------------------


class _StudyProblem(Exception):
    """A study that cannot be used, with its message already free of the upload's paths."""

    def __init__(self, error: MedsearchError | Refused, folder: Path, count: int) -> None:
        message = _without_paths(str(error), folder, count)
        super().__init__(message)
        self.status = _study_status(error, message, folder)


def _failure(error: Exception) -> tuple[int, str]:
    """The status and one-line message of a failed page query; a bug is logged by its type only."""
    if isinstance(error, (Refused, _StudyProblem)):
        return error.status, str(error)
    if isinstance(error, EncoderMismatchError):
        return 409, str(error)
    if isinstance(error, KeyFileError):
        return 422, f"{error}"
    if isinstance(error, (IndexNotFoundError, IndexCorruptError)):
        return 503, f"the index cannot be read ({error}); ask the person who runs this service"
    if isinstance(error, MedsearchError):
        return 422, str(error)
    if isinstance(error, TimeoutError):
        return 422, "the study could not be decoded in time; give a smaller study"
    log.error("a page query failed with %s", type(error).__name__)
    return 500, f"the query failed ({type(error).__name__}); see the service log"


def _study_status(error: MedsearchError | Refused, message: str, folder: Path) -> int:
    """415 for an upload with no DICOM file at all, 409 for a mismatch, 422 for DICOM medsearch cannot use."""
    if isinstance(error, EncoderMismatchError):
        return 409
    if isinstance(error, InvalidStudyError) and "not a DICOM file" in message:
        if not any(_has_dicom_marker(p) for p in folder.iterdir()):
            return 415
    if isinstance(error, Refused):
        return error.status
    return 422


def _has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _without_paths(message: str, folder: Path, count: int) -> str:
    """A message with the upload's temporary paths replaced by what the user knows: their position."""
    if count == 1:
        message = message.replace(str(folder / upload_name(1)), "the uploaded file")
    pattern = re.escape(str(folder)) + r"/(\d+)\.dcm"
    message = re.sub(pattern, lambda m: f"uploaded file {int(m.group(1))} of {count}", message)
    return message.replace(str(folder), "the upload")


async def _receive(request: Request, folder: Path, limit: int, deadline: float) -> int:
    try:
        return await asyncio.wait_for(receive_files(request, folder, limit), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise Refused(408, "the upload did not arrive in time; send it again") from None


async def _site_key(engine: PageEngine) -> None:
    await run_in_threadpool(engine.searcher.site_key)


async def _patient(engine: PageEngine, path: Path) -> str | None:
    """The study's patient pseudonym when the site key is at hand (for ``exclude_same_patient`` later), else None."""
    try:
        return await run_in_threadpool(engine.searcher.patient_of, path)
    except KeyFileError:
        return None


def _search_options(choices: dict[str, bool], extra: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"one_per_patient": choices["one_per_patient"], "slices": extra.get("slices")}
    if choices["exclude_same_patient"]:
        options["exclude_patients"] = (extra["patient"],)
    if extra.get("region"):  # a region query is re-ranked by its slice vectors, as query --slices/--roi is
        options["rerank"] = True
    return options


def _query_info(encoded: EncodedStudy) -> dict[str, Any]:
    info: dict[str, Any] = {"path": "upload", "modality": encoded.modality, "n_slices": encoded.n_slices}
    if encoded.region is not None:
        info["region"] = encoded.region
    return info


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise Refused(422, f"k must be between 1 and {MAX_K}, got {k}")


def _answer(result: QueryResult, token: str, query: dict[str, Any], preview: dict[str, Any] | None,
            choices: dict[str, bool], engine: PageEngine) -> dict[str, Any]:
    data = result.to_dict()
    data["query"] = {**result.query, **{k: v for k, v in query.items() if k not in result.query}}
    stamp = _stamp(engine)
    for match in data["results"]:
        match["thumbnail"] = f"/api/thumbnail/{match['case_id']}?v={stamp}"
    data.update({"study": token, "preview": preview, "labels": list(result.labels), "options": choices,
                 "caption_fields": list(CAPTION_FIELDS)})
    return data


@dataclass
class _Asked:
    """One page query as the audit log records it."""

    k: int
    choices: dict[str, bool]
    filters: Sequence[Filter] = ()
    result: QueryResult | None = None
    status: int = 200
    region: dict[str, Any] | None = None  # a region query's slab and box (pixel numbers, nothing of the patient)


def _recorded(audit: AuditLog | None, request: Request, asked: _Asked, response: Response) -> Response:
    """``response``, once the query is in the audit log; a 503 instead when it cannot be written there."""
    if audit is None:
        return response
    options: dict[str, Any] = {name: True for name, on in asked.choices.items() if on}
    if asked.region:
        options["region"] = {name: asked.region[name] for name in ("slices", "roi") if name in asked.region}
    try:
        audit.record(
            user=request_user(request.scope), client=client_address(request.scope), via="page", k=asked.k,
            filters=asked.filters, options=options, status=asked.status,
            cases=[m.case_id for m in asked.result.results] if asked.result is not None else (),
        )
    except OSError as e:
        log.error("the audit log %s cannot be written: %s", audit.path, e.strerror or type(e).__name__)
        return _error(503, "this query cannot be recorded in the audit log, so it is not answered; tell the person who "
                           "runs this service")
    return response


# -- options, thumbnails ----------------------------------------------------------------------------


def _options(engine: PageEngine, max_upload_bytes: int, access: Access | None, request: Request,
             dicomweb: bool, case_slices: bool) -> dict[str, Any]:
    store = engine.searcher.store
    cases = store.cases
    fields = {}
    for name in _CHOICE_FIELDS:
        if name in cases:
            fields[name] = _choices(cases[name])
    age = None
    if "age_band" in cases:
        lows = [int(m.group(1)) for v in cases["age_band"].dropna().astype(str) if (m := re.match(r"\s*(\d+)", v))]
        if lows:
            age = {"min": min(lows), "max": max(lows) + 9}
    labels = {}
    for name in store.manifest.label_columns:
        if name in cases:
            values = _choices(cases[name])
            labels[name] = values if len(values) <= _MAX_CHOICES else None
    key_ok = True
    try:
        engine.searcher.site_key()
    except KeyFileError:
        key_ok = False
    info = engine.searcher.store.manifest
    return {
        "cases": len(store),
        "distance": info.distance,
        "encoder": str(info.encoder.get("name", "")),
        "k": {"default": 10, "max": MAX_K},
        "fields": fields,
        "age": age,
        "labels": labels,
        "max_upload_bytes": max_upload_bytes,
        "user": request_user(request.scope) if access is not None and access.required else None,
        "features": {"exclude_same_patient": key_ok and "patient" in cases, "one_per_patient": "patient" in cases,
                     "dicomweb": dicomweb, "thumbnails": store.thumbnails is not None,
                     "regions": sees_slices(engine.searcher.encoder.info, engine.searcher.config), "crop_vectors": store.crops is not None, "case_slices": case_slices},
    }


def _choices(values: Any) -> list[list[Any]]:
    counts = values.dropna().astype(str).value_counts()
    return [[str(v), int(n)] for v, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


class _CaseRows:
    """case id -> row of the case table of the loaded store, made again when a refresh brings a new one."""

    def __init__(self) -> None:
        self._store: Any = None
        self._rows: dict[str, int] = {}

    def __call__(self, store: Any) -> dict[str, int]:
        if store is not self._store:
            self._rows = {str(cid): i for i, cid in enumerate(store.cases["case_id"])} if len(store.cases) else {}
            self._store = store
        return self._rows


def _stamp(engine: PageEngine) -> str:
    """Part of a thumbnail's URL that changes when a commit brings new thumbnails (so no stale one is cached)."""
    manifest = engine.searcher.store.manifest
    entry = manifest.files.get("thumbnails")
    name = entry.name if entry is not None else str(manifest.generation)
    return re.sub(r"[^\w.-]", "", name)[:64] or "0"


# -- responses --------------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str), status_code=status, media_type="application/json",
                    headers={"cache-control": "no-store"})


def _error(status: int, message: str) -> Response:
    return _json({"error": " ".join(message.split())}, status)


def _redirect(target: str) -> Response:
    return Response(status_code=303, headers={"location": target, "cache-control": "no-store"})


def _login(template: bytes, message: str, status: int, target: str) -> Response:
    body = template.replace(b"<!--message-->", message.encode()).replace(b"__NEXT__", html.escape(target).encode())
    return Response(body, status_code=status, media_type=_STATIC["login.html"], headers=_PAGE_HEADERS)


def _local_target(target: str | None) -> str:
    """A redirect target on this service only (a path; never another host)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def _quote(text: str) -> str:
    return quote(text, safe="")

