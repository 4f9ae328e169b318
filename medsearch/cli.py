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
from typing import Any, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from medsearch.errors import MedsearchError


class _Command(TyperCommand):
    """A command whose usage line names its arguments as its help does: ``query [OPTIONS] STUDY``.

    (typer writes a required argument as ``{study}``, which reads like a literal or a template.)
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # typer's own (vendored) click Context
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


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

    return cast(F, wrapper)


@app.callback()
def _main(
    ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (to stderr).")
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand != "query":  # query checks its arguments first (quickly), then silences pydicom
        _silence_pydicom()


def _silence_pydicom() -> None:
    from medsearch.io.quiet import silence_pydicom

    silence_pydicom()


@app.command(cls=_Command)
@_user_errors
def index(
    archive: Path = typer.Argument(..., metavar="ARCHIVE", help="A DICOM file or a folder of studies, at any depth."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory (created when missing)."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file or preset name (default, chest-ct)."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV of labels per file or series."),
    label_key: str | None = typer.Option(None, "--label-key", help="Column of --labels naming the file or SeriesInstanceUID."),
    label_columns: str | None = typer.Option(None, "--label-columns", help="Comma-separated label columns to keep (default: all but file paths, file names, ids and dates)."),
    key: Path | None = typer.Option(None, "--key", help="Site key file for pseudonyms (default: MEDSEARCH_KEY_FILE or ~/.config/medsearch/site.key)."),
    links: Path | None = typer.Option(None, "--links", help="Also write a link table (case id -> source files and UIDs) here: owner-only, never inside the index."),
    index_type: str | None = typer.Option(None, "--index-type", help="auto, flat, hnsw or ivfpq (default: the config's, auto); converts an existing index."),
    workers: int | None = typer.Option(None, "--workers", "-w", min=0, help="Processes that read and decode (default: min(4, CPU count); 0: none)."),
    commit_every: int = typer.Option(64, "--commit-every", min=1, help="Save progress every N new cases (or every minute)."),
    case_timeout: float = typer.Option(600.0, "--case-timeout", min=1.0, help="Seconds one case may take to decode before it is skipped."),
    retry_skipped: bool = typer.Option(False, "--retry-skipped", help="Decode again the cases an earlier run skipped entirely."),
    wait: float = typer.Option(10.0, "--wait", min=0.0, help="Seconds to wait for another process writing to the same index."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON (counts, skips by reason, seconds per stage)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Index every case of an archive, or add a new folder to an existing index.

    Files that are not images (SR, RT, non-DICOM, truncated, duplicates, FIFOs, broken links...) are
    skipped and listed with a reason in INDEX/local/skipped.csv (site-only, like all of INDEX/local/).
    Running it again on the same archive adds nothing twice, and an interrupted run (even kill -9)
    picks up where its last saved chunk ended.
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
    )
    if report.key_created is not None:
        _err.print(f"created a new site key at {report.key_created} (keep it safe; it is not in the index)", highlight=False)
    summary = report.to_dict()
    if as_json:
        _print_json(summary)
        return
    if summary["cases_added"] == 0 and summary["cases_already_indexed"]:
        _out.print(
            f"nothing new to index: the {summary['files_found']} file(s) are already indexed or skipped "
            f"({summary['headers_from_cache']} unchanged since the last run); checked in {summary['seconds']:.1f} s",
            highlight=False,
        )
    _out.print(
        f"indexed {summary['cases_added']} new case(s) from {summary['files_found']} file(s) "
        f"({summary['cases_already_indexed']} already indexed); the index holds {summary['cases_in_index']} case(s)",
        highlight=False,
    )
    _out.print(
        f"files: {summary['files_in_added_cases']} in new cases + {summary['files_already_indexed']} already indexed "
        f"+ {summary['files_skipped']} skipped = {summary['files_found']} found; "
        f"{summary['seconds']:.1f} s ({summary['files_per_second'] or 0:.1f} files/s)",
        highlight=False,
    )
    if report.skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["skipped_by_reason"].items())
        _out.print(f"skipped {len(report.skipped)} file(s): {reasons}; see {index_dir / SKIP_REPORT}", highlight=False)
    if summary.get("labels"):
        _print_label_summary(summary["labels"], labels)


def _print_label_summary(labels: dict[str, Any], csv: Path | None) -> None:
    """Which label columns were kept and left out (and why), and how many rows named a new case."""
    name = csv.name if csv is not None else "the labels CSV"
    columns = ", ".join(labels["columns"]) or "none"
    _out.print(
        f"labels from {name}: {labels['rows_matched']} of {labels['rows']} row(s) matched a case added now; "
        f"{labels['cases_labelled']} of {labels['cases_added']} new case(s) have labels; columns: {columns}",
        highlight=False,
    )
    if labels["dropped"]:
        why = "; ".join(f"{column} ({reason})" for column, reason in labels["dropped"].items())
        _out.print(f"label columns left out: {why}; choose the columns with --label-columns", highlight=False)


@app.command(cls=_Command)
@_user_errors
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
    _silence_pydicom()
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
        _err.print(
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
        _print_json(result.to_dict())
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


@app.command(cls=_Command)
@_user_errors
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
        _print_json(data)
        return
    enc = data["encoder"]
    _out.print(f"[bold]{data['index_dir']}[/]: {data['cases']} case(s), {data['dim']}-d {data['metric']} index")
    _out.print(f"encoder: {enc['name']} (weights sha256 {str(enc['weights_sha256'])[:12]}...)", highlight=False)
    _out.print(f"distance: {data['distance']}", highlight=False)
    ix = data["index"]
    params = ", ".join(f"{k} {v}" for k, v in (ix.get("params") or {}).items())
    _out.print(
        f"index type: {ix['type']} (asked for {ix['requested']}{'; ' + params if params else ''})"
        + (f"; {ix['note']}" if ix.get("note") else ""),
        highlight=False,
    )
    _out.print(f"preprocess: {json.dumps(data['preprocess'])}", highlight=False)
    if data["label_columns"]:
        _out.print(f"labels: {', '.join(data['label_columns'])}", highlight=False)
    for field, counts in data["tallies"].items():
        _out.print(f"{field}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    _print_groups("k-anonymity", data["k_anonymity"])
    if data["verified"]:
        _out.print(f"checksums: all {len(data['verified'])} data file(s) match the manifest", highlight=False)
    if data.get("last_run"):
        run = data["last_run"]
        _out.print(
            f"last run: {run.get('cases_added', 0)} added, {run.get('files_skipped', 0)} file(s) skipped "
            f"{run.get('skipped_by_reason', {})}",
            highlight=False,
        )


@app.command("export-index", cls=_Command)
@_user_errors
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
        _print_json(report.to_dict())
        return
    _out.print(f"exported {index_dir} to {destination}: {', '.join(report.files)}", highlight=False)
    for name, why in report.left_out.items():
        _out.print(f"left out {name}: {why}", highlight=False)
    plan = report.k_anonymity
    _print_groups("before", plan["before"])
    _print_groups("exported", plan["after"])
    done = "; ".join(f"{column}: {what}" for column, what in plan["generalized"].items())
    _out.print(f"generalized: {done or 'nothing (every group already held k patients)'}", highlight=False)
    for column, count in report.replaced.items():
        _out.print(f"{column}: {count} value(s) checked again against the vocabularies and exported as a term, band, OTHER or empty", highlight=False)
    if report.labels_below_k:
        _out.print(
            f"note: label column(s) {', '.join(report.labels_below_k)} have values held by fewer than {k_anonymity} "
            "patients; labels are exported as given (leave a column out with index --label-columns)",
            highlight=False,
        )


def _print_groups(title: str, measure: dict[str, Any]) -> None:
    """One line: the smallest group of patients over the quasi-identifiers, and how many are below k."""
    columns = ", ".join(measure["quasi_identifiers"]) or "none"
    smallest = "no cases" if measure["smallest_group"] is None else f"smallest group {measure['smallest_group']} patient(s)"
    _out.print(
        f"{title}: {smallest} over {columns}; {measure['patients_below_k']} of {measure['patients']} patient(s) "
        f"in groups below k = {measure['k']}, {measure['unique_patients']} alone in theirs",
        highlight=False,
    )


@app.command(cls=_Command)
@_user_errors
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
        _print_json({"index": report.to_dict(), **result.to_dict()})
        return
    _out.print(
        f"indexed {report.n_cases_total} sample case(s) into {report.index_dir}; "
        f"querying with {result.query['path']}",
        highlight=False,
    )
    _print_results(result)


@app.command(cls=_Command)
@_user_errors
def evaluate(
    data: Path | None = typer.Argument(None, metavar="DATA", help="A MedMNIST-format .npz file (train/val/test images and labels)."),
    index_dir: Path | None = typer.Option(None, "--index", "-i", help="An index built with --labels: leave-one-out, or the gallery for --queries."),
    label: str | None = typer.Option(None, "--label", help="Label column of the index (needed when it has several)."),
    exclude_same_patient: bool = typer.Option(False, "--exclude-same-patient", help="Leave out every case of the query's patient pseudonym, not only the query."),
    queries: Path | None = typer.Option(None, "--queries", help="Folder of query studies, scored against --index with --labels."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV of labels per file or series of the --queries studies."),
    label_key: str | None = typer.Option(None, "--label-key", help="Column of --labels naming the file or SeriesInstanceUID."),
    key: Path | None = typer.Option(None, "--key", help="The index's site key, to recognize queries that are in the index (default: MEDSEARCH_KEY_FILE)."),
    protocol: str | None = typer.Option(None, "--protocol", "-p", help="mahbod2024 (test vs train, k = 5) or medmnistplus (k-NN, k = 11); npz only."),
    ks: list[str] | None = typer.Option(None, "-k", "--ks", help="Cut-offs, e.g. -k 1,5,10 (added to the protocol's)."),
    gallery_split: str | None = typer.Option(None, "--gallery-split", help="npz split searched (default train)."),
    query_split: str | None = typer.Option(None, "--query-split", help="npz split of the queries (default test; the gallery's split gives leave-one-out)."),
    encoders: list[str] | None = typer.Option(None, "--encoder", "-e", help="NAME or NAME:CHECKPOINT; repeat to compare encoders on the same split (npz only)."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file or preset name (npz only; an index uses its own)."),
    modality: str = typer.Option("OT", "--modality", help="Modality the npz preprocessing assumes (OT: percentile scaling)."),
    json_file: Path | None = typer.Option(None, "--json", help="Write {dataset, protocol, encoder, n_gallery, n_queries, metrics, per_class, ci95, ...} here."),
    csv_file: Path | None = typer.Option(None, "--csv", help="Write one row per metric and scope (all, macro, class=...) here."),
    figure: Path | None = typer.Option(None, "--figure", help="Write a PNG: precision@k per class and the confusion matrix of the vote."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score a seeded random subset of this many queries (a quick run)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --limit and of the bootstrap."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per encoder call (npz; the embeddings do not depend on it)."),
    cache: Path | None = typer.Option(None, "--cache", help="Keep npz embeddings in this folder (keyed by data, encoder and preprocessing)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Measure retrieval against labels: hit@k, precision@k, recall@k, mAP, majority votes, MAP@R, nDCG, MRR.

    Three inputs: DATA.npz (query split against gallery split, through the index's pipeline);
    --index DIR [--label COL] [--exclude-same-patient] (leave-one-out over a labeled index); or
    --queries FOLDER --labels CSV --index DIR. Intervals are 95% bootstrap intervals over queries.
    """
    from medsearch.errors import ConfigError
    from medsearch.evaluate import evaluate_index, evaluate_npz, evaluate_queries

    cutoffs = _evaluate_ks(ks)
    npz_only = {"--protocol": protocol, "--encoder": encoders, "--config": config, "--gallery-split": gallery_split,
                "--query-split": query_split, "--cache": cache}
    if data is not None:
        if index_dir is not None or queries is not None:
            raise ConfigError("give either DATA.npz or --index (with --queries), not both")
        report = evaluate_npz(
            data, protocol=protocol, gallery_split=gallery_split, query_split=query_split, ks=cutoffs,
            config=config, encoders=encoders, modality=modality, limit=limit, seed=seed,
            batch_size=batch_size, cache_dir=cache, progress=not quiet,
        )
    else:
        given = [name for name, value in npz_only.items() if value]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to a DATA.npz evaluation only; an index is scored with its own settings")
        if index_dir is None:
            raise ConfigError("nothing to evaluate: give DATA.npz, or --index DIR (leave-one-out), or --queries FOLDER --labels CSV --index DIR")
        if queries is not None:
            if labels is None:
                raise ConfigError("--queries needs --labels CSV with the label of each query study")
            report = evaluate_queries(
                queries, labels, index_dir, label=label, label_key=label_key, key=key,
                exclude_same_patient=exclude_same_patient, ks=cutoffs, limit=limit, seed=seed, progress=not quiet,
            )
        else:
            if labels is not None:
                raise ConfigError("--labels goes with --queries; a leave-one-out run reads the labels stored in the index")
            report = evaluate_index(index_dir, label=label, exclude_same_patient=exclude_same_patient, ks=cutoffs, limit=limit, seed=seed)
    _print_evaluation(report)
    for path, write in ((json_file, report.save_json), (csv_file, report.save_csv), (figure, report.save_figure)):
        if path is not None:
            write(path)
            _err.print(f"wrote {path}", highlight=False)


def _evaluate_ks(values: list[str] | None) -> list[int] | None:
    """``-k 1,5 -k 10`` -> [1, 5, 10]."""
    from medsearch.errors import ConfigError

    if not values:
        return None
    out = []
    for part in ",".join(values).split(","):
        if part.strip():
            try:
                out.append(int(part))
            except ValueError:
                raise ConfigError(f"-k takes whole numbers separated by commas (e.g. -k 1,5,10), got {part.strip()!r}") from None
    return out


def _print_evaluation(report: Any) -> None:
    """Metrics side by side per encoder (value and 95% interval), then per class, then the paired tests."""
    first = report.results[0]
    _out.print(
        f"[bold]{first.dataset}[/]: {first.n_queries} queries against {first.n_gallery} gallery items; "
        f"protocol {first.protocol}" + (f" ({first.settings['protocol_source']})" if first.settings.get("protocol_source") else ""),
        highlight=False,
    )
    table = Table(title_justify="left", title="retrieval metrics (mean over queries, 95% bootstrap interval)")
    table.add_column("metric", no_wrap=True)
    for result in report.results:
        table.add_column(result.name, justify="right", no_wrap=True)
    if len(report.results) == 1:
        table.add_column("macro", justify="right")
    headline = [m for m in first.headline if m in first.metrics]
    rest = [m for m in first.metrics if m not in headline]
    for i, name in enumerate(headline + rest):
        cells = []
        for result in report.results:
            low, high = result.ci95[name]
            cells.append(f"{result.metrics[name]:.4f} [{low:.3f}, {high:.3f}]")
        if len(report.results) == 1:
            cells.append(f"{first.macro[name]:.4f}")
        label = f"[bold]{name}[/]" if name in headline else name
        table.add_row(label, *cells, end_section=i == len(headline) - 1)
    _out.print(table)
    for result in report.results:
        classes = Table(title=f"per class ({result.name})", title_justify="left")
        classes.add_column("label")
        classes.add_column("queries", justify="right")
        for name in headline:
            classes.add_column(name, justify="right")
        for label_value, values in result.per_class.items():
            classes.add_row(str(label_value), str(result.support[label_value]), *(f"{values[n]:.4f}" for n in headline))
        _out.print(classes)
    for c in report.comparisons:
        low, high = c["ci95"]
        wilcoxon = "" if c.get("p_value_wilcoxon") is None else f", Wilcoxon p = {c['p_value_wilcoxon']:.3g}"
        _out.print(
            f"{c['encoder']} - {c['baseline']} on {c['metric']}: {c['mean_diff']:+.4f} [{low:+.4f}, {high:+.4f}], "
            f"p = {c['p_value']:.3g} ({c['method']}, n = {c['n']}){wilcoxon}",
            highlight=False,
        )
    without = first.settings.get("n_queries_without_relevant", 0)
    if without:
        _out.print(f"note: {without} queries have no item of their label in the gallery; they score 0", highlight=False)


@app.command(cls=_Command)
@_user_errors
def serve(
    index_dir: Path = typer.Argument(..., metavar="INDEX_DIR", help="Index directory built by 'medsearch index'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default answers this machine only."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    config: str | None = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    max_upload_mb: int = typer.Option(512, "--max-upload-mb", min=1, help="Largest DICOM upload accepted, in MB."),
    request_timeout: float = typer.Option(60.0, "--request-timeout", min=1, help="Seconds a query may take to arrive, decode and wait for its turn."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=1, help="Seconds a connection may take to send its request headers."),
    worker_memory_gib: float = typer.Option(2.0, "--worker-memory-gib", min=0.5, help="GiB the upload decoder may allocate beyond its start."),
    auth_file: Path | None = typer.Option(None, "--auth-file", help="NAME:SECRET lines of who may use the service (also: MEDSEARCH_AUTH_TOKEN)."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="JSON-lines file every query is recorded in (default: INDEX_DIR/local/audit.jsonl)."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve a non-loopback --host without credentials (behind a gateway that authenticates)."),
) -> None:
    """Keep an index and its encoder loaded: a page for clinicians at /, and queries over HTTP as JSON.

    Open http://127.0.0.1:8000/ and drop a DICOM file, several files or a series folder. POST
    /query?k=10 with a DICOM file (raw body or multipart form) returns what 'query --json' prints;
    GET /health and GET /info. Cases that 'medsearch index' adds while it runs are served from the
    next request on. Uploads are decoded in a worker process with a memory cap and a time limit. Any
    --host but loopback needs --auth-file; every query goes to the audit log.
    """
    import os

    from medsearch.serve import serve as run_service
    from medsearch.web.auth import TOKEN_VARIABLE, is_loopback

    if insecure_no_auth and auth_file is None and not os.environ.get(TOKEN_VARIABLE) and not is_loopback(host):
        _err.print(f"warning: serving on {host} without authentication; anyone who reaches port {port} can query this index", highlight=False)
    run_service(index_dir, host=host, port=port, config=config, max_upload_mb=max_upload_mb, request_timeout=request_timeout,
                header_timeout=header_timeout, worker_memory_gib=worker_memory_gib, auth_file=auth_file, audit_log=audit_log,
                insecure_no_auth=insecure_no_auth)


@app.command(cls=_Command)
@_user_errors
def train(
    data: Path = typer.Argument(..., metavar="DATA", help="A MedMNIST-format .npz (train trains, val selects; test is never read) or a DICOM archive folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Name of the run's files (OUT or OUT.pt): OUT.toml config, OUT.json record, and OUT.adapter.pt or OUT.pt weights as chosen."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV of labels per file or series (DICOM archive only)."),
    label: str | None = typer.Option(None, "--label", help="Label column of --labels to learn (needed when it has several)."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file or preset name: the preprocessing to train with."),
    size: int | None = typer.Option(None, "--size", help="Encoder input in pixels (default: the --config's, else chosen from the image size)."),
    mode: str = typer.Option("auto", "--mode", help="adapter, supervised (fine-tuning), selfsupervised, or auto (chosen from the data)."),
    loss: str | None = typer.Option(None, "--loss", help="multisimilarity, supcon or classifier (fine-tuning only); default: chosen from the data."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Passes over the training images (default: chosen; an adapter's by cross-validation)."),
    budget_minutes: float = typer.Option(30.0, "--budget-minutes", min=0.1, help="Time the whole run may take; the recipe plans within it."),
    select_metric: str = typer.Option("map_hits@5", "--select-metric", help="Validation metric that compares the candidates: hit@1, map_hits@5, mmv@5, precision@10 or knn_acc@11."),
    batch_size: int = typer.Option(64, "--batch-size", min=4, help="Images per step."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    steps_per_epoch: int | None = typer.Option(None, "--steps-per-epoch", min=1, help="Steps per epoch (default: every training image once)."),
    patience: int = typer.Option(10, "--patience", min=0, help="Stop after this many epochs without a better validation score (0: never)."),
    head_epochs: int | None = typer.Option(None, "--head-epochs", min=0, help="First epochs that train only the new head on the fixed encoder (default: 1 self-supervised, 0 supervised)."),
    freeze_norm: bool | None = typer.Option(None, "--freeze-norm/--train-norm", help="Keep BatchNorm's ImageNet statistics (default: frozen self-supervised, trained supervised)."),
    val_split: float = typer.Option(0.15, "--val-split", help="Fraction held out for validation (by patient) when there is no val split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, sampling, augmentations and heads."),
    flips: bool = typer.Option(False, "--flips", help="Allow horizontal flips (not where laterality matters)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT's .last.pt when it was written with the same settings."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the training report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Adapt the encoder to your images, never leaving it worse than the frozen one; then index, query or evaluate with it.

    With no option but --out, a recipe chosen from the data: an adapter on the frozen encoder's
    embeddings for small labeled sets, fine-tuning where the data and the budget make it worthwhile,
    self-supervised (SimCLR) without labels. The frozen encoder is always a candidate: the run
    writes a trained encoder only when it beats the frozen one beyond the noise, and says which and
    why. Prints the commands that use the chosen encoder.
    """
    from medsearch.train import train_encoder

    report = train_encoder(
        data, out=out, labels=labels, label_column=label, config=config, size=size, mode=mode, loss=loss,
        epochs=epochs, budget_minutes=budget_minutes, select_metric=select_metric, batch_size=batch_size, lr=lr, steps_per_epoch=steps_per_epoch,
        patience=patience, val_split=val_split, seed=seed, flips=flips, head_epochs=head_epochs, freeze_norm=freeze_norm,
        resume=resume, device=device, progress=not quiet and not as_json,
    )
    commands = report.follow_up(labels=labels)
    if as_json:
        _print_json({**report.to_dict(), "next": commands})
        return
    recipe = report.recipe
    _out.print(f"recipe: {recipe['mode']}, {recipe['size']} px, {recipe['loss']}", highlight=False)
    for reason in recipe["reasons"]:
        _out.print(f"  - {reason}", highlight=False)
    resumed = f", resumed after epoch {report.resumed_from_epoch}" if report.resumed_from_epoch else ""
    budget = " (stopped by the budget)" if report.stopped_by_budget else ""
    _out.print(
        f"{report.n_train} training and {report.n_val} validation case(s); {report.seconds / 60:.1f} min on "
        f"{report.device} of the {report.budget_s / 60:.0f} min budget{budget}{resumed}",
        highlight=False,
    )
    _print_candidates(report.candidates, report.select_metric)
    _out.print(report.verdict, highlight=False)
    written = [f"{report.config_path} (config)", f"{report.metadata_path} (record)"]
    for path, what in ((report.adapter, "adapter"), (report.checkpoint, "weights")):
        if path is not None:
            written.insert(0, f"{path} ({what})")
    _out.print(f"wrote {', '.join(written)}", highlight=False)
    _out.print("next:", highlight=False)
    for command in commands:
        _out.print(f"  {command}", highlight=False)


def _print_candidates(candidates: list[dict[str, Any]], metric: str) -> None:
    """One row per candidate: the selection metric with its interval, the gain over frozen with its interval."""
    if not candidates:
        return
    table = Table(title=f"candidates, by validation {metric}", title_justify="left")
    table.add_column("candidate")
    for name in ("px", "epochs", metric, "95% interval", "gain over frozen", "its interval"):
        table.add_column(name, justify="right")
    table.add_column("chosen")
    for c in candidates:
        low, high = c["ci95"]
        g_low, g_high = c["gain_interval"]
        table.add_row(
            c["candidate"], str(c.get("size", "")), str(c.get("epochs", "")), f"{c['metrics'][metric]:.4f}", f"{low:.4f}-{high:.4f}",
            "" if c["candidate"] == "frozen" else f"{c['gain_over_frozen']:+.4f}",
            "" if c["candidate"] == "frozen" else f"{g_low:+.4f} to {g_high:+.4f}",
            "yes" if c["chosen"] else "",
        )
    _out.print(table)


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
    _out.print(table)
    if result.distance:
        _out.print(f"distance = {result.distance}", highlight=False)


def _write_sheet(result: Any, index_dir: Path, png: Path | None, page: Path | None, study: Any) -> None:
    """Write the result sheet (PNG and/or HTML) and say where, on stderr."""
    from medsearch.sheets import render_sheet

    render_sheet(result, index_dir, png, html=page, query_study=study)
    for path in (png, page):
        if path is not None:
            _err.print(f"wrote result sheet {path}", highlight=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover - python -m medsearch.cli
    main()
