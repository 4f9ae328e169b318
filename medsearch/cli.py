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

    return cast(F, wrapper)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (to stderr).")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from medsearch.io.quiet import silence_pydicom

    silence_pydicom()


@app.command()
@_user_errors
def index(
    archive: Path = typer.Argument(..., help="A DICOM file or a folder of studies, at any depth."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory (created when missing)."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file or preset name (default, chest-ct)."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV of labels per file or series."),
    label_key: str | None = typer.Option(None, "--label-key", help="Column of --labels naming the file or SeriesInstanceUID."),
    label_columns: str | None = typer.Option(None, "--label-columns", help="Comma-separated label columns to keep (default: all)."),
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

    Files that are not images (SR, RT, non-DICOM, truncated, duplicates...) are skipped and listed with
    a reason in INDEX/skipped.csv. Running it again on the same archive adds nothing twice, and an
    interrupted run (even kill -9) picks up where its last saved chunk ended.
    """
    from medsearch.indexing import build_index

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
        _out.print(f"skipped {len(report.skipped)} file(s): {reasons}; see {index_dir / 'skipped.csv'}", highlight=False)


@app.command()
@_user_errors
def query(
    study: Path = typer.Argument(..., help="A DICOM file or a folder holding one series."),
    index_dir: Path = typer.Option(..., "--index", "-i", help="Index directory built by 'medsearch index'."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many similar cases to return."),
    config: str | None = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print {query, results: [{rank, case_id, distance, metadata}]} as JSON."),
    resolve: Path | None = typer.Option(None, "--resolve", help="Link table from 'index --links': show where each result's files are."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Also write a result sheet PNG: the query beside its results, captioned."),
    sheet_html: Path | None = typer.Option(None, "--html", help="Also write the result sheet as a self-contained HTML page."),
    where: list[str] | None = typer.Option(None, "--where", help="Keep cases whose metadata match, e.g. --where modality=CT --where age>=60 (= != >= <= > < ~); repeatable."),
) -> None:
    """Show the cases of an index most similar to a study, closest first."""
    from medsearch.io import load_study
    from medsearch.search import query as run_query

    drawn = sheet is not None or sheet_html is not None
    # decoded once, for the search and for the sheet's picture of the query
    volume = load_study(study)[1] if drawn else None
    result = run_query(study, index_dir, k=k, config=config, where=where, volume=volume)
    if resolve is not None:
        result = result.resolve(resolve)
    if drawn:
        _write_sheet(result, index_dir, sheet, sheet_html, volume)
    if as_json:
        _print_json(result.to_dict())
        return
    _print_results(result)


@app.command()
@_user_errors
def info(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Hash every data file and compare it with the manifest (reads the whole index)."
    ),
) -> None:
    """Show what an index holds: case counts, encoder, metric, preprocessing, labels."""
    from medsearch.search import index_info

    data = index_info(index_dir, verify=verify)
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
    if data["verified"]:
        _out.print(f"checksums: all {len(data['verified'])} data file(s) match the manifest", highlight=False)
    if data.get("last_run"):
        run = data["last_run"]
        _out.print(
            f"last run: {run.get('cases_added', 0)} added, {run.get('files_skipped', 0)} file(s) skipped "
            f"{run.get('skipped_by_reason', {})}",
            highlight=False,
        )


@app.command("export-index")
@_user_errors
def export_index(
    index_dir: Path = typer.Argument(..., help="Index directory to share."),
    destination: Path = typer.Argument(..., help="New folder for the copy."),
    with_thumbnails: bool = typer.Option(False, "--with-thumbnails", help="Include case thumbnails (check the source pixels for burned-in text first)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was copied and left out as JSON."),
) -> None:
    """Copy an index for sharing; refuse if anything identifying would go with it.

    The copy has the manifest (local paths removed), the faiss index and the de-identified case table.
    The skip report, lock file and (unless asked) thumbnails stay behind.
    """
    from medsearch.sharing import export_index as run_export

    report = run_export(index_dir, destination, with_thumbnails=with_thumbnails)
    if as_json:
        _print_json(report.to_dict())
        return
    _out.print(f"exported {index_dir} to {destination}: {', '.join(report.files)}", highlight=False)
    for name, why in report.left_out.items():
        _out.print(f"left out {name}: {why}", highlight=False)


@app.command()
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


@app.command()
@_user_errors
def evaluate(
    data: Path | None = typer.Argument(None, help="A MedMNIST-format .npz file (train/val/test images and labels)."),
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


@app.command()
@_user_errors
def serve(
    index_dir: Path = typer.Argument(..., help="Index directory built by 'medsearch index'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default answers this machine only."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    config: str | None = typer.Option(None, "--config", "-c", help="Must match the index's settings (default: the index's own)."),
    max_upload_mb: int = typer.Option(512, "--max-upload-mb", min=1, help="Largest DICOM upload accepted, in MB."),
) -> None:
    """Keep an index and its encoder loaded and answer queries over HTTP, as JSON.

    POST /query?k=10 with a DICOM file (raw body or multipart form) returns what 'query --json'
    prints; GET /health and GET /info. Cases that 'medsearch index' adds while it runs are served from
    the next request on. There is no authentication: keep the default --host unless a gateway of
    yours stands in front.
    """
    from medsearch.serve import serve as run_service

    if host not in ("127.0.0.1", "localhost", "::1"):
        _err.print(f"warning: serving on {host} without authentication; anyone who reaches port {port} can query this index", highlight=False)
    run_service(index_dir, host=host, port=port, config=config, max_upload_mb=max_upload_mb)


@app.command()
@_user_errors
def train(
    data: Path = typer.Argument(..., help="A MedMNIST-format .npz (train trains, val selects; test is never read) or a DICOM archive folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (.pt); its .toml config, .json record and .last.pt resume state go beside it."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV of labels per file or series (DICOM archive only)."),
    label: str | None = typer.Option(None, "--label", help="Label column of --labels to learn (needed when it has several)."),
    config: str | None = typer.Option(None, "--config", "-c", help="TOML config file or preset name: the preprocessing to train with."),
    size: int | None = typer.Option(None, "--size", help="Encoder input in pixels (overrides preprocess.size; 32-64 keeps a CPU run to minutes)."),
    mode: str = typer.Option("auto", "--mode", help="supervised, selfsupervised, or auto (supervised when labels are at hand)."),
    loss: str = typer.Option("multisimilarity", "--loss", help="Supervised loss: multisimilarity, supcon or classifier."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over the training images (at most; see --patience)."),
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
    """Fine-tune the encoder for retrieval on your images, then index, query or evaluate with it.

    With labels, metric learning (or a classification head) on them; without, self-supervised
    contrastive learning (SimCLR) with augmentations fit for medical images. Prints the commands
    that use the trained encoder.
    """
    from medsearch.train import train_encoder

    report = train_encoder(
        data, out=out, labels=labels, label_column=label, config=config, size=size, mode=mode, loss=loss,
        epochs=epochs, batch_size=batch_size, lr=lr, steps_per_epoch=steps_per_epoch, patience=patience,
        val_split=val_split, seed=seed, flips=flips, head_epochs=head_epochs, freeze_norm=freeze_norm, resume=resume, device=device, progress=not quiet and not as_json,
    )
    commands = report.follow_up(labels=labels)
    if as_json:
        _print_json({**report.to_dict(), "next": commands})
        return
    best = report.history[report.best_epoch - 1] if report.best_epoch else {}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k not in ("epoch", "seconds"))
    resumed = f", resumed after epoch {report.resumed_from_epoch}" if report.resumed_from_epoch else ""
    _out.print(
        f"trained {report.mode} ({report.loss}) on {report.n_train} case(s), validated on {report.n_val}: "
        f"{report.epochs_completed} epoch(s) in {report.seconds:.0f} s on {report.device}{resumed}",
        highlight=False,
    )
    _out.print(f"best epoch {report.best_epoch} by {report.select_metric}: {scores}", highlight=False)
    _out.print(f"wrote {report.checkpoint} (weights), {report.config_path} (config), {report.metadata_path} (record)", highlight=False)
    _out.print("next:", highlight=False)
    for command in commands:
        _out.print(f"  {command}", highlight=False)


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
