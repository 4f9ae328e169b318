"""``medsearch train``: adapt the encoder, never leaving it worse than the frozen one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from medsearch.cli.base import Command, app, print_json, stdout, user_errors


@app.command(cls=Command)
@user_errors
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
        print_json({**report.to_dict(), "next": commands})
        return
    recipe = report.recipe
    stdout.print(f"recipe: {recipe['mode']}, {recipe['size']} px, {recipe['loss']}", highlight=False)
    for reason in recipe["reasons"]:
        stdout.print(f"  - {reason}", highlight=False)
    resumed = f", resumed after epoch {report.resumed_from_epoch}" if report.resumed_from_epoch else ""
    budget = " (stopped by the budget)" if report.stopped_by_budget else ""
    stdout.print(
        f"{report.n_train} training and {report.n_val} validation case(s); {report.seconds / 60:.1f} min on "
        f"{report.device} of the {report.budget_s / 60:.0f} min budget{budget}{resumed}",
        highlight=False,
    )
    _print_candidates(report.candidates, report.select_metric)
    stdout.print(report.verdict, highlight=False)
    written = [f"{report.config_path} (config)", f"{report.metadata_path} (record)"]
    for path, what in ((report.adapter, "adapter"), (report.checkpoint, "weights")):
        if path is not None:
            written.insert(0, f"{path} ({what})")
    stdout.print(f"wrote {', '.join(written)}", highlight=False)
    stdout.print("next:", highlight=False)
    for command in commands:
        stdout.print(f"  {command}", highlight=False)


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
    stdout.print(table)
