"""``medsearch index``, ``info`` and ``export-index``: build an index, show what it holds, share a copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from medsearch.cli.base import Command, app, print_json, stderr, stdout, user_errors


@app.command(cls=Command)
@user_errors
def index(
    archive: str = typer.Argument(..., metavar="ARCHIVE", help="A DICOM file or a folder of studies, at any depth; or a DICOMweb root URL (a PACS), e.g. http://127.0.0.1:8042/dicom-web."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory (created when missing)."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file or preset name (default, chest-ct)."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV of labels per file or series."),
    label_key: str | None = typer.Option(None, "--label-key", help="Column of --labels naming the file or SeriesInstanceUID."),
    label_columns: str | None = typer.Option(None, "--label-columns", help="Comma-separated label columns to keep (default: all but file paths, file names, ids and dates)."),
    key: Path | None = typer.Option(None, "--key", help="Site key file for pseudonyms (default: MEDSEARCH_KEY_FILE or ~/.config/medsearch/site.key)."),
    links: Path | None = typer.Option(None, "--links", help="Also write a link table (case id -> source files and UIDs) here: owner-only, never inside the index."),
    index_type: str | None = typer.Option(None, "--index-type", help="auto, flat, hnsw, ivfpq or ivfpq-disk (lists on disk, memory-mapped: beyond memory) (default: the config's, auto); converts an existing index."),
    workers: int | None = typer.Option(None, "--workers", "-w", min=0, help="Processes that read and decode (default: min(4, CPU count); 0: none)."),
    commit_every: int = typer.Option(64, "--commit-every", min=1, help="Save progress every N new cases (or every minute)."),
    case_timeout: float = typer.Option(600.0, "--case-timeout", min=1.0, help="Seconds one case may take to decode before it is skipped."),
    retry_skipped: bool = typer.Option(False, "--retry-skipped", help="Decode again the cases an earlier run skipped entirely."),
    wait: float = typer.Option(10.0, "--wait", min=0.0, help="Seconds to wait for another process writing to the same index."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON (counts, skips by reason, seconds per stage)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    modality: str | None = typer.Option(None, "--modality", help="DICOMweb: only the series of this modality (CT, MR, CR...)."),
    since: str | None = typer.Option(None, "--since", help="DICOMweb: only studies dated on or after this day (YYYYMMDD or YYYY-MM-DD)."),
    until: str | None = typer.Option(None, "--until", help="DICOMweb: only studies dated on or before this day (YYYYMMDD or YYYY-MM-DD)."),
    dicomweb_auth_file: Path | None = typer.Option(None, "--dicomweb-auth-file", help="DICOMweb: a file holding 'Bearer TOKEN' or 'USER:PASSWORD' (default: MEDSEARCH_DICOMWEB_TOKEN, or MEDSEARCH_DICOMWEB_USER and MEDSEARCH_DICOMWEB_PASSWORD; never a credential on the command line)."),
    fetch_slices_only: bool = typer.Option(False, "--fetch-slices-only", help="DICOMweb: fetch the pixels of only the slices the encoder reads and the headers of the rest (fewer bytes over a slow link; slower on a fast one). Default: whole series."),
    engine: str = typer.Option("local", "--engine", help="local (worker processes here) or ray (a Ray cluster: pip install \"medsearch[ray]\"; see docs/cluster.md)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="The Ray cluster of --engine ray: auto (the one `ray start` began here) or HOST:PORT (default: a Ray started for this run)."),
) -> None:
    """Index every case of an archive, or add a new folder to an existing index.

    Files that are not images (SR, RT, non-DICOM, truncated, duplicates, FIFOs, broken links...) are
    skipped and listed with a reason in INDEX/local/skipped.csv (site-only, like all of INDEX/local/).
    Running it again on the same archive adds nothing twice, and an interrupted run (even kill -9)
    picks up where its last saved chunk ended.

    With a DICOMweb URL, the server's series (filtered by --modality, --since, --until) that the index
    lacks are fetched into INDEX/local/spool/ in batches, indexed the same way, and deleted; running
    it again fetches only the series new since (see docs/pacs.md).
    """
    from medsearch.indexing import SKIP_REPORT, build_index

    report = build_index(
        archive,
        index_dir,
        config=config,
        labels=labels,
        label_key=label_key,
        label_columns=[c.strip() for c in label_columns.split(",")] if label_columns else None,
        key=key,
        links=links,
        index_type=index_type,
        progress=not quiet,
        workers=workers,
        commit_every=commit_every,
        case_timeout=case_timeout,
        retry_skipped=retry_skipped,
        lock_timeout=wait,
        engine=engine,
        ray_address=ray_address,
        modality=modality,
        since=since,
        until=until,
        dicomweb_auth_file=dicomweb_auth_file,
        dicomweb_slices_only=fetch_slices_only,
    )
    if report.key_created is not None:
        stderr.print(f"created a new site key at {report.key_created} (keep it safe; it is not in the index)", highlight=False)
    summary = report.to_dict()
    if as_json:
        print_json(summary)
        return
    if summary["cases_added"] == 0 and summary["cases_already_indexed"]:
        stdout.print(
            f"nothing new to index: the {summary['files_found']} file(s) are already indexed or skipped "
            f"({summary['headers_from_cache']} unchanged since the last run); checked in {summary['seconds']:.1f} s",
            highlight=False,
        )
    stdout.print(
        f"indexed {summary['cases_added']} new case(s) from {summary['files_found']} file(s) "
        f"({summary['cases_already_indexed']} already indexed); the index holds {summary['cases_in_index']} case(s)",
        highlight=False,
    )
    stdout.print(
        f"files: {summary['files_in_added_cases']} in new cases + {summary['files_already_indexed']} already indexed "
        f"+ {summary['files_skipped']} skipped = {summary['files_found']} found; "
        f"{summary['seconds']:.1f} s ({summary['files_per_second'] or 0:.1f} files/s)",
        highlight=False,
    )
    if report.skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["skipped_by_reason"].items())
        stdout.print(f"skipped {len(report.skipped)} file(s): {reasons}; see {index_dir / SKIP_REPORT}", highlight=False)
    if summary.get("labels"):
        _print_label_summary(summary["labels"], labels)
    if summary.get("dicomweb"):
        _print_dicomweb_summary(archive, summary["dicomweb"])


def _print_dicomweb_summary(url: str, sync: dict[str, Any]) -> None:
    """What came from the DICOMweb server: series listed, already indexed, fetched and failed (never a UID)."""
    from medsearch.pacs import public_url

    failed = ", ".join(f"{n} {status}" for status, n in sync["failed_by_status"].items())
    stdout.print(
        f"DICOMweb {public_url(url)}: {sync['series_listed']} series listed, {sync['series_already_indexed']} already indexed, "
        f"{sync['series_fetched']} fetched ({sync['instances_fetched']} instances, {sync['megabytes_fetched']:.1f} MB)"
        + (f", {sync['series_failed']} failed ({failed}; fetched again by the next run)" if sync["series_failed"] else ""),
        highlight=False,
    )


def _print_label_summary(labels: dict[str, Any], csv: Path | None) -> None:
    """Which label columns were kept and left out (and why), and how many rows named a new case."""
    name = csv.name if csv is not None else "the labels CSV"
    columns = ", ".join(labels["columns"]) or "none"
    stdout.print(
        f"labels from {name}: {labels['rows_matched']} of {labels['rows']} row(s) matched a case added now; "
        f"{labels['cases_labelled']} of {labels['cases_added']} new case(s) have labels; columns: {columns}",
        highlight=False,
    )
    if labels["dropped"]:
        why = "; ".join(f"{column} ({reason})" for column, reason in labels["dropped"].items())
        stdout.print(f"label columns left out: {why}; choose the columns with --label-columns", highlight=False)


@app.command(cls=Command)
@user_errors
def info(
    index_dir: Path = typer.Argument(..., metavar="INDEX_DIR", help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Hash every data file and compare it with the manifest (reads the whole index)."
    ),
    k_anonymity: int = typer.Option(5, "--k-anonymity", min=1, help="Count the patients in groups smaller than K (as export-index would)."),
) -> None:
    """Show what an index holds: case counts, encoder, metric, preprocessing, labels, k-anonymity."""
    from medsearch.search import index_info

    data = index_info(index_dir, verify=verify, k_anonymity=k_anonymity)
    if as_json:
        print_json(data)
        return
    enc = data["encoder"]
    stdout.print(f"[bold]{data['index_dir']}[/]: {data['cases']} case(s), {data['dim']}-d {data['metric']} index")
    stdout.print(f"encoder: {enc['name']} (weights sha256 {str(enc['weights_sha256'])[:12]}...)", highlight=False)
    stdout.print(f"distance: {data['distance']}", highlight=False)
    ix = data["index"]
    params = ", ".join(f"{k} {v}" for k, v in (ix.get("params") or {}).items())
    stdout.print(
        f"index type: {ix['type']} (asked for {ix['requested']}{'; ' + params if params else ''})"
        + (f"; {ix['note']}" if ix.get("note") else ""),
        highlight=False,
    )
    stdout.print(f"preprocess: {json.dumps(data['preprocess'])}", highlight=False)
    _print_vectors(data)
    if data["label_columns"]:
        stdout.print(f"labels: {', '.join(data['label_columns'])}", highlight=False)
    for field, counts in data["tallies"].items():
        stdout.print(f"{field}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    _print_groups("k-anonymity", data["k_anonymity"])
    if data["verified"]:
        stdout.print(f"checksums: all {len(data['verified'])} data file(s) match the manifest", highlight=False)
    if data.get("last_run"):
        run = data["last_run"]
        stdout.print(
            f"last run: {run.get('cases_added', 0)} added, {run.get('files_skipped', 0)} file(s) skipped "
            f"{run.get('skipped_by_reason', {})}",
            highlight=False,
        )


def _print_vectors(data: dict[str, Any]) -> None:
    """What the slice and crop vectors an index keeps let a query do (``info``'s text)."""
    slices, crops = data.get("slice_vectors") or {}, data.get("crop_vectors") or {}
    if not slices.get("kept"):
        stdout.print("slice vectors: none (3D encoder, tri-planar, or an old index): no region queries", highlight=False)
        return
    stdout.print(f"slice vectors: {slices['vectors']:,}, {slices['mean_per_case']:g} a case ({slices['bytes_per_case'] / 1e3:.1f} KB): "
                 "re-ranking, region queries", highlight=False)
    if crops.get("kept"):
        stdout.print(f"crop vectors: {crops['vectors']:,} tiles ({crops['bytes_per_case'] / 1e3:.1f} KB a case): boxes on tiles, "
                     "slabs in layout", highlight=False)
    else:
        stdout.print("crop vectors: none (boxes against whole slices; tiles need crop_grid = 2)", highlight=False)


@app.command("export-index", cls=Command)
@user_errors
def export_index(
    index_dir: Path = typer.Argument(..., metavar="INDEX_DIR", help="Index directory to share."),
    destination: Path = typer.Argument(..., metavar="DESTINATION", help="New folder for the copy."),
    with_thumbnails: bool = typer.Option(False, "--with-thumbnails", help="Include case thumbnails (check the source pixels for burned-in text first)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was copied, left out and generalized as JSON."),
    k_anonymity: int = typer.Option(5, "--k-anonymity", min=1, help="Generalize the case table until every group of patients sharing sex, age, size, weight, scanner and spacing holds at least K."),
) -> None:
    """Copy an index for sharing; refuse if anything identifying would go with it.

    The copy has the manifest (local paths removed), the faiss index and the de-identified case table,
    generalized (coarser bands, columns dropped) until it is k-anonymous; the index itself is unchanged.
    The skip report, lock file and (unless asked) thumbnails stay behind.
    """
    from medsearch.sharing import export_index as run_export

    report = run_export(index_dir, destination, with_thumbnails=with_thumbnails, k=k_anonymity)
    if as_json:
        print_json(report.to_dict())
        return
    stdout.print(f"exported {index_dir} to {destination}: {', '.join(report.files)}", highlight=False)
    for name, why in report.left_out.items():
        stdout.print(f"left out {name}: {why}", highlight=False)
    plan = report.k_anonymity
    _print_groups("before", plan["before"])
    _print_groups("exported", plan["after"])
    done = "; ".join(f"{column}: {what}" for column, what in plan["generalized"].items())
    stdout.print(f"generalized: {done or 'nothing (every group already held k patients)'}", highlight=False)
    for column, count in report.replaced.items():
        stdout.print(f"{column}: {count} value(s) checked again against the vocabularies and exported as a term, band, OTHER or empty", highlight=False)
    if report.labels_below_k:
        stdout.print(
            f"note: label column(s) {', '.join(report.labels_below_k)} have values held by fewer than {k_anonymity} "
            "patients; labels are exported as given (leave a column out with index --label-columns)",
            highlight=False,
        )


def _print_groups(title: str, measure: dict[str, Any]) -> None:
    """One line: the smallest group of patients over the quasi-identifiers, and how many are below k."""
    columns = ", ".join(measure["quasi_identifiers"]) or "none"
    smallest = "no cases" if measure["smallest_group"] is None else f"smallest group {measure['smallest_group']} patient(s)"
    stdout.print(
        f"{title}: {smallest} over {columns}; {measure['patients_below_k']} of {measure['patients']} patient(s) "
        f"in groups below k = {measure['k']}, {measure['unique_patients']} alone in theirs",
        highlight=False,
    )
