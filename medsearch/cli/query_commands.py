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
    study: Path = typer.Argument(..., metavar="STUDY", help="A DICOM file or a folder holding one series."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory built by 'medsearch index'."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many similar cases to return."),
    config: str | None = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print {query, results: [{rank, case_id, distance, metadata}]} as JSON."),
    resolve: Path | None = typer.Option(None, "--resolve", help="Link table from 'index --links': show where each result's files are."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Also write a result sheet PNG: the query beside its results, captioned."),
    sheet_html: Path | None = typer.Option(None, "--html", help="Also write the result sheet as a self-contained HTML page."),
    where: list[str] | None = typer.Option(None, "--where", help="Keep cases whose metadata match, e.g. --where modality=CT --where age>=60 (= != >= <= > < ~); repeatable."),
    exclude_same_patient: bool = typer.Option(False, "--exclude-same-patient", help="Leave out every case of the query's own patient (by its keyed pseudonym: needs the site key the index was built with)."),
    one_per_patient: bool = typer.Option(False, "--one-per-patient", help="Show only the most similar case of each patient."),
    keep_copies: bool = typer.Option(False, "--keep-copies", help="Show exact copies of one image as separate results (by default they count once)."),
    key: Path | None = typer.Option(None, "--key", help="Site key file, for --exclude-same-patient (default: MEDSEARCH_KEY_FILE or ~/.config/medsearch/site.key)."),
) -> None:
    """Show the cases of an index most similar to a study, closest first.

    Exact copies of one image count once; --exclude-same-patient and --one-per-patient leave out
    more, and k results still come back whenever k cases remain. Exits with status 1, saying so,
    when no case matches the --where filters.
    """
    _check_query_arguments(study, where, sheet, sheet_html)  # before the heavy imports: a typo is told at once
    silence_pydicom()
    from medsearch.io import load_study
    from medsearch.search import query as run_query

    drawn = sheet is not None or sheet_html is not None
    # decoded once, for the search and for the sheet's picture of the query
    volume = load_study(study)[1] if drawn else None
    result = run_query(
        study, index_dir, k=k, config=config, where=where, volume=volume, exclude_same_patient=exclude_same_patient,
        one_per_patient=one_per_patient, collapse_copies=not keep_copies, key=key,
    )
    if result.query.get("matching_cases") == 0:
        stderr.print(
            f"no case of {index_dir} matches {' and '.join(result.query['where'])}; nothing to rank. "
            f"Change or drop --where (medsearch info {index_dir} lists the values the index holds)",
            highlight=False,
        )
        raise typer.Exit(code=1)
    if resolve is not None:
        result = result.resolve(resolve)
    if drawn:
        _write_sheet(result, index_dir, sheet, sheet_html, volume)
    if as_json:
        print_json(result.to_dict())
        return
    _print_results(result)


def _check_query_arguments(study: Path, where: list[str] | None, sheet: Path | None, page: Path | None) -> None:
    """The checks of ``query``'s arguments that need no heavy library, made before any is imported.

    Raises
    ------
    InvalidStudyError, FilterError, ConfigError
        The study does not exist, a filter is malformed, or a sheet file has the wrong suffix.
    """
    from medsearch.errors import ConfigError, InvalidStudyError
    from medsearch.filters import parse_filters

    if not study.exists():
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
    resolved = any(m.source is not None for m in result.results)
    if resolved:
        table.add_column("source (from the link table)", overflow="fold")
    for m in result.results:
        values = ["" if m.metadata.get(f) is None else str(m.metadata.get(f)) for f in fields]
        if resolved:
            files = (m.source or {}).get("files", [])
            values.append(files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "") if files else "not in link table")
        table.add_row(str(m.rank), m.case_id, f"{m.distance:.4f}", *values)
    stdout.print(table)
    if result.distance:
        stdout.print(f"distance = {result.distance}", highlight=False)


def _write_sheet(result: Any, index_dir: Path, png: Path | None, page: Path | None, study: Any) -> None:
    """Write the result sheet (PNG and/or HTML) and say where, on stderr."""
    from medsearch.sheets import render_sheet

    render_sheet(result, index_dir, png, html=page, query_study=study)
    for path in (png, page):
        if path is not None:
            stderr.print(f"wrote result sheet {path}", highlight=False)
