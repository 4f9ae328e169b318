"""The ``medsearch`` command: a thin layer over the library functions a notebook calls too.

Each command parses its options, calls one function of :mod:`medsearch.search` (or
:mod:`medsearch.demo`), and prints the result as a table or, with ``--json``, as JSON on stdout.
Errors meant for the user (:class:`~medsearch.errors.MedsearchError`) print one line on stderr and
exit with status 2; progress goes to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from medsearch.errors import MedsearchError

app = typer.Typer(
    name="medsearch",
    help="Find the most similar historical cases for a DICOM study, offline and de-identified.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is not wrapped at 80 columns: a table cut into slivers helps nobody.
_out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
_err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(func: F) -> F:
    """Turn a MedsearchError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedsearchError as e:
            _err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (to stderr).")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # pydicom warns about every oddity of a file it can still read; the skip report and our own
        # one-line errors already say what matters to the user. (pydicom sets its logger's level
        # when imported, so import it first.)
        import pydicom  # noqa: F401

        logging.getLogger("pydicom").setLevel(logging.ERROR)


@app.command()
@_user_errors
def index(
    archive: Path = typer.Argument(..., help="A DICOM file or a folder of studies, at any depth."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory (created when missing)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML config file or preset name (default, chest-ct)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV of labels per file or series."),
    label_key: Optional[str] = typer.Option(None, "--label-key", help="Column of --labels naming the file or SeriesInstanceUID."),
    label_columns: Optional[str] = typer.Option(None, "--label-columns", help="Comma-separated label columns to keep (default: all)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Site key file for pseudonyms (default: MEDSEARCH_KEY_FILE or ~/.config/medsearch/site.key)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Index every case of an archive, or add a new folder to an existing index.

    Files that are not images (SR, RT, non-DICOM, truncated, duplicates...) are skipped and listed with
    a reason in INDEX/skipped.csv. Running it again on the same archive adds nothing twice.
    """
    from medsearch.search import build_index

    report = build_index(
        archive,
        index_dir,
        config=config,
        labels=labels,
        label_key=label_key,
        label_columns=[c.strip() for c in label_columns.split(",")] if label_columns else None,
        key=key,
        progress=not quiet and not as_json,
    )
    if report.key_created is not None:
        _err.print(f"created a new site key at {report.key_created} (keep it safe; it is not in the index)", highlight=False)
    summary = report.to_dict()
    if as_json:
        _print_json(summary)
        return
    _out.print(
        f"indexed {summary['cases_added']} new case(s) from {summary['files_found']} file(s) "
        f"({summary['cases_already_indexed']} already indexed); the index holds {summary['cases_in_index']} case(s)",
        highlight=False,
    )
    if report.skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["skipped_by_reason"].items())
        _out.print(f"skipped {len(report.skipped)} file(s): {reasons}; see {index_dir / 'skipped.csv'}", highlight=False)


@app.command()
@_user_errors
def query(
    study: Path = typer.Argument(..., help="A DICOM file or a folder holding one series."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory built by 'medsearch index'."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many similar cases to return."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print {query, results: [{rank, case_id, distance, metadata}]} as JSON."),
) -> None:
    """Show the cases of an index most similar to a study, closest first."""
    from medsearch.search import query as run_query

    result = run_query(study, index_dir, k=k, config=config)
    if as_json:
        _print_json(result.to_dict())
        return
    _print_results(result)


@app.command()
@_user_errors
def info(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an index holds: case counts, encoder, metric, preprocessing, labels."""
    from medsearch.search import index_info

    data = index_info(index_dir)
    if as_json:
        _print_json(data)
        return
    enc = data["encoder"]
    _out.print(f"[bold]{data['index_dir']}[/]: {data['cases']} case(s), {data['dim']}-d {data['metric']} index")
    _out.print(f"encoder: {enc['name']} (weights sha256 {str(enc['weights_sha256'])[:12]}...)", highlight=False)
    _out.print(f"distance: {data['distance']}", highlight=False)
    _out.print(f"preprocess: {json.dumps(data['preprocess'])}", highlight=False)
    if data["label_columns"]:
        _out.print(f"labels: {', '.join(data['label_columns'])}", highlight=False)
    for field, counts in data["tallies"].items():
        _out.print(f"{field}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    if data.get("last_run"):
        run = data["last_run"]
        _out.print(
            f"last run: {run.get('cases_added', 0)} added, {run.get('files_skipped', 0)} file(s) skipped "
            f"{run.get('skipped_by_reason', {})}",
            highlight=False,
        )


@app.command()
@_user_errors
def demo(
    out: Path = typer.Option(Path("medsearch-demo"), "--out", help="Folder for the demo index and its site key."),
    k: int = typer.Option(5, "-k", "--top", min=1, help="How many similar cases to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the query result as JSON."),
) -> None:
    """Index the chest CT sample shipped with medsearch and query one of its slices (offline).

    The sample: slices of the TCGA-LUAD collection (The Cancer Imaging Archive, CC BY 3.0).
    """
    from medsearch.demo import run_demo

    report, result = run_demo(out, k=k, progress=not as_json)
    if as_json:
        _print_json({"index": report.to_dict(), **result.to_dict()})
        return
    _out.print(
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
    for m in result.results:
        values = ["" if m.metadata.get(f) is None else str(m.metadata.get(f)) for f in fields]
        table.add_row(str(m.rank), m.case_id, f"{m.distance:.4f}", *values)
    _out.print(table)
    if result.distance:
        _out.print(f"distance = {result.distance}", highlight=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover - python -m medsearch.cli
    main()
