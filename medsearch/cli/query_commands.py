"""``medsearch query`` and ``demo``: the most similar cases as a table, JSON or a result sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from medsearch.cli.base import Command, app, print_json, silence_pydicom, stderr, stdout, user_errors


@app.command(cls=Command)
@user_errors
def query(
    ctx: typer.Context,
    study: Path | None = typer.Argument(None, metavar="STUDY", help="A DICOM file or a folder holding one series (or give --study-uid)."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory built by 'medsearch index'."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many similar cases to return."),
    config: str | None = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print {query, results: [{rank, case_id, distance, metadata}]} as JSON; a series also gets best_slice, best_slice_mm, query_slice, query_slice_mm, slice_score, and a --roi query on an index with crop vectors best_box."),
    resolve: Path | None = typer.Option(None, "--resolve", help="Link table from 'index --links': show where each result's files are."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Also write a result sheet PNG: the query beside its results, captioned."),
    sheet_html: Path | None = typer.Option(None, "--html", help="Also write the result sheet as a self-contained HTML page."),
    where: list[str] | None = typer.Option(None, "--where", help="Keep cases whose metadata match, e.g. --where modality=CT --where age>=60 (= != >= <= > < ~); repeatable."),
    exclude_same_patient: bool = typer.Option(False, "--exclude-same-patient", help="Leave out every case of the query's own patient (by its keyed pseudonym: needs the site key the index was built with)."),
    one_per_patient: bool = typer.Option(False, "--one-per-patient", help="Show only the most similar case of each patient."),
    keep_copies: bool = typer.Option(False, "--keep-copies", help="Show exact copies of one image as separate results (by default they count once)."),
    key: Path | None = typer.Option(None, "--key", help="Site key file, for --exclude-same-patient (default: MEDSEARCH_KEY_FILE or ~/.config/medsearch/site.key)."),
    study_uid: str | None = typer.Option(None, "--study-uid", help="Query with this study of the --dicomweb server (fetched into a temporary folder, removed after) instead of STUDY."),
    series_uid: str | None = typer.Option(None, "--series-uid", help="With --study-uid: the series to query with (needed when the study holds several)."),
    dicomweb: str | None = typer.Option(None, "--dicomweb", help="DICOMweb root URL of the PACS, e.g. http://127.0.0.1:8042/dicom-web: for --study-uid, and the server --viewer links point to for cases indexed from files."),
    dicomweb_auth_file: Path | None = typer.Option(None, "--dicomweb-auth-file", help="A file holding 'Bearer TOKEN' or 'USER:PASSWORD' (default: MEDSEARCH_DICOMWEB_TOKEN, or MEDSEARCH_DICOMWEB_USER and MEDSEARCH_DICOMWEB_PASSWORD)."),
    viewer: str = typer.Option("ohif", "--viewer", help="With --resolve: the viewer link of each result from a PACS: ohif, orthanc (Orthanc Explorer 2), stone, or a template with {root} {base} {study_uid} {series_uid}."),
    slices: str | None = typer.Option(None, "--slices", help="Query with a slab of the study: START:STOP (e.g. 40:60; 0 = first slice in stack order, STOP excluded) or one slice number. Results say where each case matched."),
    roi: str | None = typer.Option(None, "--roi", help="Query with a box X0,Y0,X1,Y1 (pixels, x across, y down) on the --slices slab, or on the middle slice: cropped and matched against each case's slices, and against their tiles where the index keeps them ([index] crop_grid; the box is then widened to a tile and each result names the tile, best_box)."),
    rerank: bool | None = typer.Option(None, "--rerank/--no-rerank", help="Re-order the case-vector candidates by how their slices match the query's (late interaction, anatomical order). Default: on (always on for --slices/--roi)."),
    layout: bool | None = typer.Option(None, "--layout/--no-layout", help="On an index with tiles ([index] crop_grid): match each query slice with a case's slices whole and tile by tile, each tile with the one at the same place, which tells apart series of one anatomy far better; each query slice then costs grid x grid more encoder images. Default: on for --slices, off for a whole study."),
) -> None:
    """Show the cases of an index most similar to a study, closest first.

    Exact copies of one image count once; --exclude-same-patient and --one-per-patient leave out
    more, and k results still come back whenever k cases remain. Exits with status 1, saying so,
    when no case matches the --where filters.
    """
    _check_query_arguments(study, where, sheet, sheet_html, study_uid=study_uid, series_uid=series_uid, dicomweb=dicomweb)
    if study is None:  # --study-uid (checked above): fetched for this command, removed when it ends
        study = _fetched_study(ctx, dicomweb or "", study_uid or "", series_uid, dicomweb_auth_file)
    silence_pydicom()
    from medsearch.io import load_study
    from medsearch.search import query as run_query

    drawn = sheet is not None or sheet_html is not None
    # decoded once, for the search and for the sheet's picture of the query
    volume = load_study(study)[1] if drawn else None
    result = run_query(
        study, index_dir, k=k, config=config, where=where, volume=volume, exclude_same_patient=exclude_same_patient,
        one_per_patient=one_per_patient, collapse_copies=not keep_copies, key=key, slices=slices, roi=roi, rerank=rerank,
        layout=layout,
    )
    if result.query.get("matching_cases") == 0:
        stderr.print(
            f"no case of {index_dir} matches {' and '.join(result.query['where'])}; nothing to rank. "
            f"Change or drop --where (medsearch info {index_dir} lists the values the index holds)",
            highlight=False,
        )
        raise typer.Exit(code=1)
    if study_uid is not None:  # the temporary folder means nothing to the reader (and the UID must not be shown)
        result.query["path"] = f"a study of {_public(dicomweb or '')}"
    if resolve is not None:
        result = result.resolve(resolve)
        _add_viewer_links(result, viewer, dicomweb)
    if drawn:
        _write_sheet(result, index_dir, sheet, sheet_html, volume)
    if as_json:
        print_json(result.to_dict())
        return
    _print_results(result)


def _check_query_arguments(
    study: Path | None,
    where: list[str] | None,
    sheet: Path | None,
    page: Path | None,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    dicomweb: str | None = None,
) -> None:
    """The checks of ``query``'s arguments that need no heavy library, made before any is imported.

    Raises
    ------
    InvalidStudyError, FilterError, ConfigError
        The study does not exist (or both or neither of STUDY and --study-uid are given, or
        --study-uid without --dicomweb), a filter is malformed, or a sheet file has the wrong suffix.
    """
    from medsearch.errors import ConfigError, InvalidStudyError
    from medsearch.filters import parse_filters

    if (study is None) == (study_uid is None):
        raise ConfigError("give the query study as STUDY (a file or folder) or as --study-uid with --dicomweb, not both")
    if series_uid is not None and study_uid is None:
        raise ConfigError("--series-uid picks a series of --study-uid; give --study-uid too")
    if study_uid is not None and not dicomweb:
        raise ConfigError("--study-uid needs --dicomweb URL, the DICOMweb root of the PACS (e.g. http://127.0.0.1:8042/dicom-web)")
    if study is not None and not study.exists():
        raise InvalidStudyError(f"{study} does not exist; check the path")
    parse_filters(where)
    for path, suffixes in ((sheet, (".png",)), (page, (".html", ".htm"))):
        if path is not None and path.suffix.lower() not in suffixes:
            raise ConfigError(f"sheet file {path} must end in {' or '.join(suffixes)}; give a name like sheet{suffixes[0]}")


@app.command(cls=Command)
@user_errors
def demo(
    out: Path = typer.Option(Path("medsearch-demo"), "--out", help="Folder for the demo index and its site key."),
    k: int = typer.Option(5, "-k", "--top", min=1, help="How many similar cases to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the query result as JSON."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Also write a result sheet PNG: the query beside its results, captioned."),
    sheet_html: Path | None = typer.Option(None, "--html", help="Also write the result sheet as a self-contained HTML page."),
) -> None:
    """Index the chest CT sample shipped with medsearch and query one of its slices (offline).

    The sample: slices of the TCGA-LUAD collection (The Cancer Imaging Archive, CC BY 3.0).
    """
    from medsearch.demo import run_demo

    report, result = run_demo(out, k=k, progress=not as_json)
    if sheet is not None or sheet_html is not None:
        _write_sheet(result, report.index_dir, sheet, sheet_html, Path(result.query["path"]))
    if as_json:
        print_json({"index": report.to_dict(), **result.to_dict()})
        return
    stdout.print(
        f"indexed {report.n_cases_total} sample case(s) into {report.index_dir}; "
        f"querying with {result.query['path']}",
        highlight=False,
    )
    _print_results(result)


_TABLE_FIELDS = ("modality", "body_part", "sex", "age_band", "manufacturer", "model", "n_slices")


def _fetched_study(ctx: typer.Context, url: str, study_uid: str, series_uid: str | None, auth_file: Path | None) -> Path:
    """The query study fetched from the DICOMweb server into a temporary folder that lives as long as the command."""
    from medsearch.pacs import fetched_study

    return ctx.with_resource(fetched_study(url, study_uid, series_uid=series_uid, auth_file=auth_file))


def _public(url: str) -> str:
    from medsearch.pacs import public_url

    return public_url(url)


def _add_viewer_links(result: Any, viewer: str, dicomweb: str | None) -> None:
    """A ``viewer_url`` in each resolved source that a DICOMweb server holds: the server it was indexed
    from, else ``--dicomweb`` (a case indexed from files that the PACS holds too)."""
    from medsearch.pacs import public_url, viewer_url

    for match in result.results:
        source = match.source or {}
        root = source.get("dicomweb_root") or (public_url(dicomweb) if dicomweb else "")
        if root and source.get("study_instance_uid"):
            source["viewer_url"] = viewer_url(viewer, root=root, study_uid=source["study_instance_uid"],
                                              series_uid=source.get("series_instance_uid", ""))


def _where_matched(place: dict[str, Any] | None) -> str:
    """``slice 14 (56.0 mm) <- 12 (48.0 mm)``: where a result matched the query, 0-based stack slices."""
    if place is None:
        return ""

    def at(index: int, mm: float | None) -> str:
        return f"{index}" + ("" if mm is None else f" ({mm:.1f} mm)")

    where = f"slice {at(place['best_slice'], place.get('best_slice_mm'))} <- {at(place['query_slice'], place.get('query_slice_mm'))}"
    box = place.get("best_box")
    return where + (f", box {box[0]},{box[1]},{box[2]},{box[3]}" if box else "")


def _print_results(result: Any) -> None:
    """A ranked table with the key metadata and any labels; ``--json`` has every field."""
    table = Table(title=f"most similar to {result.query.get('path', 'the query')}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("case id", no_wrap=True)
    table.add_column("distance", justify="right")
    fields = [f for f in _TABLE_FIELDS if any(m.metadata.get(f) is not None for m in result.results)]
    fields += [f for f in result.labels if f not in fields]
    for name in fields:
        table.add_column(name)
    located = any(m.location is not None for m in result.results)
    if located:
        table.add_column("matched at (case slice <- query slice)")
    resolved = any(m.source is not None for m in result.results)
    if resolved:
        table.add_column("source (from the link table)", overflow="fold")
    for m in result.results:
        values = ["" if m.metadata.get(f) is None else str(m.metadata.get(f)) for f in fields]
        if located:
            values.append(_where_matched(m.location))
        if resolved:
            files = (m.source or {}).get("files", [])
            link = (m.source or {}).get("viewer_url") or (m.source or {}).get("dicomweb_root")
            values.append(link or (files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "") if files else "not in link table"))
        table.add_row(str(m.rank), m.case_id, f"{m.distance:.4f}", *values)
    stdout.print(table)
    if result.distance:
        stdout.print(f"distance = {result.distance}", highlight=False)
    plan = result.query.get("rerank") or {}
    for key in ("note", "crop_note", "layout_note"):  # what the search could not do, and what to do
        if plan.get(key):
            stderr.print(f"note: {plan[key]}", highlight=False)


def _write_sheet(result: Any, index_dir: Path, png: Path | None, page: Path | None, study: Any) -> None:
    """Write the result sheet (PNG and/or HTML) and say where, on stderr."""
    from medsearch.sheets import render_sheet

    render_sheet(result, index_dir, png, html=page, query_study=study)
    for path in (png, page):
        if path is not None:
            stderr.print(f"wrote result sheet {path}", highlight=False)
