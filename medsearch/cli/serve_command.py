"""``medsearch serve``: keep an index loaded, for the page and for HTTP queries."""

from __future__ import annotations

from pathlib import Path

import typer

from medsearch.cli.base import Command, app, stderr, user_errors


@app.command(cls=Command)
@user_errors
def serve(
    index_dir: Path = typer.Argument(..., metavar="INDEX_DIR", help="Index directory built by 'medsearch index'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default answers this machine only."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    config: str | None = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    max_upload_mb: int = typer.Option(512, "--max-upload-mb", min=1, help="Largest DICOM upload accepted, in MB."),
    request_timeout: float = typer.Option(60.0, "--request-timeout", min=1, help="Seconds a query may take to arrive, decode and wait for its turn."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=1, help="Seconds a connection may take to send its request headers."),
    worker_memory_gib: float = typer.Option(2.0, "--worker-memory-gib", min=0.5, help="GiB each decoder worker may allocate beyond its start."),
    decode_workers: int = typer.Option(1, "--decode-workers", min=1, help="Worker processes that decode uploads and read the archive's slices for --links, each bounded by --worker-memory-gib and --request-timeout; more let several uploads decode at once."),
    auth_file: Path | None = typer.Option(None, "--auth-file", help="NAME:SECRET lines of who may use the service (also: MEDSEARCH_AUTH_TOKEN)."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="JSON-lines file every query is recorded in (default: INDEX_DIR/local/audit.jsonl)."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve a non-loopback --host without credentials (behind a gateway that authenticates)."),
    dicomweb: str | None = typer.Option(None, "--dicomweb", help="DICOMweb root URL of a PACS: POST /query?study_uid=UID then fetches the study from it."),
    dicomweb_auth_file: Path | None = typer.Option(None, "--dicomweb-auth-file", help="The PACS credentials: a file holding 'Bearer TOKEN' or 'USER:PASSWORD' (default: MEDSEARCH_DICOMWEB_TOKEN, or MEDSEARCH_DICOMWEB_USER and MEDSEARCH_DICOMWEB_PASSWORD)."),
    links: Path | None = typer.Option(None, "--links", help="The index's link table (written by 'medsearch index --links'): the page then shows the slice of each result that matched, read from the archive, with the tile it matched outlined."),
) -> None:
    """Keep an index and its encoder loaded: a page for clinicians at /, and queries over HTTP as JSON.

    Open http://127.0.0.1:8000/ and drop a DICOM file, several files or a series folder. POST
    /query?k=10 with a DICOM file (raw body or multipart form) returns what 'query --json' prints;
    GET /health and GET /info. With --dicomweb, POST /query?study_uid=UID (and series_uid) queries with
    a study of the PACS instead of an upload. Cases that 'medsearch index' adds while it runs are served from the
    next request on. Uploads are decoded in worker processes (--decode-workers) with a memory cap and a time limit. Any
    --host but loopback needs --auth-file; every query goes to the audit log.
    """
    import os

    from medsearch.serve import serve as run_service
    from medsearch.web.auth import TOKEN_VARIABLE, is_loopback

    if insecure_no_auth and auth_file is None and not os.environ.get(TOKEN_VARIABLE) and not is_loopback(host):
        stderr.print(f"warning: serving on {host} without authentication; anyone who reaches port {port} can query this index", highlight=False)
    run_service(index_dir, host=host, port=port, config=config, max_upload_mb=max_upload_mb, request_timeout=request_timeout,
                header_timeout=header_timeout, worker_memory_gib=worker_memory_gib, decode_workers=decode_workers,
                auth_file=auth_file, audit_log=audit_log, insecure_no_auth=insecure_no_auth, dicomweb=dicomweb,
                dicomweb_auth_file=dicomweb_auth_file, links=links)
