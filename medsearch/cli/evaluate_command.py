"""``medsearch evaluate``: retrieval metrics against labels, with intervals, as tables and files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from medsearch.cli.base import Command, app, stderr, stdout, user_errors


@app.command(cls=Command)
@user_errors
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
    rerank: bool = typer.Option(False, "--rerank", help="Also score late-interaction re-ranking over slice vectors (npz volumes: each encoder pooled, then re-ranked, compared)."),
    regions: Path | None = typer.Option(None, "--regions", metavar="LINKS", help="Region localisation on --index: slabs cut from its series (read back through this link table, from index --links), noisy and shifted, must find their series first and the place they were cut."),
    slab: int = typer.Option(8, "--slab", min=1, help="--regions: slices per slab."),
    tolerance: int = typer.Option(2, "--tolerance", min=0, help="--regions: slices a location may be off and still count."),
    keep_copies: bool = typer.Option(False, "--keep-copies", help="--regions: cut slabs from every exact copy of a series too (by default each distinct series once: a copy's slabs would be the same queries again)."),
) -> None:
    """Measure retrieval against labels: hit@k, precision@k, recall@k, mAP, majority votes, MAP@R, nDCG, MRR.

    Three inputs: DATA.npz (query split against gallery split, through the index's pipeline);
    --index DIR [--label COL] [--exclude-same-patient] (leave-one-out over a labeled index); or
    --queries FOLDER --labels CSV --index DIR. Intervals are 95% bootstrap intervals over queries.

    --index DIR --regions LINKS measures region queries instead: six slabs of --slab slices from each
    series of 16 slices or more (exact copies of a series cut once), with noise and a shift, each
    searched by case vector and re-ranked; found = its own series first, located = found and the
    place within --tolerance slices.
    """
    from medsearch.errors import ConfigError
    from medsearch.evaluate import evaluate_index, evaluate_npz, evaluate_queries, evaluate_regions

    if regions is not None:
        if index_dir is None or data is not None or queries is not None:
            raise ConfigError("--regions LINKS goes with --index DIR alone: the slabs are cut from that index's own series")
        found = evaluate_regions(index_dir, regions, slab=slab, tolerance=tolerance, limit=limit, seed=seed,
                                 keep_copies=keep_copies, progress=not quiet)
        _print_regions(found)
        if json_file is not None:
            found.save_json(json_file)
            stderr.print(f"wrote {json_file}", highlight=False)
        return
    cutoffs = _evaluate_ks(ks)
    npz_only = {"--protocol": protocol, "--encoder": encoders, "--config": config, "--gallery-split": gallery_split,
                "--query-split": query_split, "--cache": cache, "--rerank": rerank}
    if data is not None:
        if index_dir is not None or queries is not None:
            raise ConfigError("give either DATA.npz or --index (with --queries), not both")
        report = evaluate_npz(
            data, protocol=protocol, gallery_split=gallery_split, query_split=query_split, ks=cutoffs,
            config=config, encoders=encoders, modality=modality, limit=limit, seed=seed,
            batch_size=batch_size, cache_dir=cache, progress=not quiet, rerank=rerank,
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
            stderr.print(f"wrote {path}", highlight=False)


def _print_regions(report: Any) -> None:
    """Found and located, per ranking; the series left out, with why."""
    settings = report.settings
    table = Table(title_justify="left", title=(
        f"region localisation on {report.index}: slabs of {settings['slab']} slices, noise {settings['noise']:g}, "
        f"shift {settings['shift']:g}, tolerance {settings['tolerance']} slices"))
    for column in ("ranking", "series", "slabs", "own series first", "located", "located when found", "located in its series UID",
                   "query (median)"):
        table.add_column(column, justify="left" if column == "ranking" else "right", no_wrap=True)
    for ranking, row in report.summary.items():
        table.add_row(ranking, str(row["series"]), str(row["slabs"]), f"{row['found']:.1%}", f"{row['located']:.1%}",
                      f"{row['located_when_found']:.1%}", f"{row['located_in_series']:.1%}", f"{row['median_query_s'] * 1e3:.0f} ms")
    stdout.print(table)
    stdout.print("'located in its series UID' also counts another time point of the same DICOM series (an fMRI run, "
                 "a diffusion series: a case each) landed on at the right place", highlight=False)
    for case_id, why in report.left_out.items():
        stdout.print(f"left out {case_id}: {why}", highlight=False)


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
    stdout.print(
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
    stdout.print(table)
    for result in report.results:
        classes = Table(title=f"per class ({result.name})", title_justify="left")
        classes.add_column("label")
        classes.add_column("queries", justify="right")
        for name in headline:
            classes.add_column(name, justify="right")
        for label_value, values in result.per_class.items():
            classes.add_row(str(label_value), str(result.support[label_value]), *(f"{values[n]:.4f}" for n in headline))
        stdout.print(classes)
    for c in report.comparisons:
        low, high = c["ci95"]
        wilcoxon = "" if c.get("p_value_wilcoxon") is None else f", Wilcoxon p = {c['p_value_wilcoxon']:.3g}"
        stdout.print(
            f"{c['encoder']} - {c['baseline']} on {c['metric']}: {c['mean_diff']:+.4f} [{low:+.4f}, {high:+.4f}], "
            f"p = {c['p_value']:.3g} ({c['method']}, n = {c['n']}){wilcoxon}",
            highlight=False,
        )
    without = first.settings.get("n_queries_without_relevant", 0)
    if without:
        stdout.print(f"note: {without} queries have no item of their label in the gallery; they score 0", highlight=False)
