"""How fast this machine fine-tunes and validates, against the time model the training recipe plans with.

``medsearch train`` without settings picks its mode, input size and number of epochs from an
estimate of how long each takes here (:class:`medsearch.train.recipe.Machine`). This script measures
the two terms of that estimate at each input size, with the trainer itself:

* ``finetune_s_per_image``: one epoch of supervised fine-tuning (augmentations, forward, backward,
  the optimizer step), in seconds per training image;
* ``validate_s_per_input``: the validation that follows each epoch (embedding the training gallery
  and the val queries with the network in training), in seconds per embedded image.

Each size runs ``train_encoder(..., mode="supervised", epochs=1)`` on a subset of a labeled npz
(``--train`` training and ``--val`` val images). Epoch 0 of its history is the validation alone;
epoch 1 is an epoch of training plus the same validation, so the training part is their difference.
The model's figures (``Machine()``, the defaults the recipe uses on a 2-core CPU) are printed beside
each measurement with their ratio: a ratio above 1 means the model plans more time than the machine
needs. The load average before and after each size is recorded; on a shared machine the ratios
move with it, so run it alone.

Usage::

    .venv/bin/python benchmarks/train_speed.py [DATA.npz] [--sizes 64,128,224] [--train 1024] [--val 256] [--json out.json]

Without DATA: ``../shared/data/medmnist/pneumoniamnist_reduced_train.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.train import train_encoder
from medsearch.train.recipe import Machine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist_reduced_train.npz"


def subset(data: Path, out: Path, *, n_train: int, n_val: int, seed: int = 0) -> None:
    """A random draw of ``n_train`` training and ``n_val`` val images of ``data``, written to ``out``."""
    rng = np.random.default_rng(seed)
    with np.load(data) as npz:
        arrays = {name: npz[name] for name in npz.files}
    picked: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", 1)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        rows = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
        picked[f"{split}_images"], picked[f"{split}_labels"] = images[rows], labels[rows]
    np.savez(out, **picked)


def measure(data: Path, size: int, *, work: Path) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    report = train_encoder(
        data, work / f"speed{size}", mode="supervised", size=size, epochs=1, patience=0, progress=False, budget_minutes=600
    )
    load_after = os.getloadavg()[0]
    history = report.history
    validate_s = float(history[0]["seconds"])
    epoch_s = float(history[1]["seconds"])
    n_train_used = int(report.n_train)
    n_embedded = n_train_used + int(report.n_val)
    machine = Machine(cores=2)
    model_finetune = machine.finetune_epoch_seconds(1, size)
    model_validate = machine.embed_seconds(1, size)
    measured_finetune = max(epoch_s - validate_s, 0.0) / n_train_used
    measured_validate = validate_s / n_embedded
    return {
        "size": size,
        "n_train": n_train_used,
        "n_embedded": n_embedded,
        "validate_s": round(validate_s, 2),
        "epoch_s": round(epoch_s, 2),
        "finetune_s_per_image": round(measured_finetune, 5),
        "model_finetune_s_per_image": round(model_finetune, 5),
        "finetune_model_over_measured": round(model_finetune / max(measured_finetune, 1e-9), 2),
        "validate_s_per_input": round(measured_validate, 5),
        "model_validate_s_per_input": round(model_validate, 5),
        "validate_model_over_measured": round(model_validate / max(measured_validate, 1e-9), 2),
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--train", type=int, default=1024, help="training images in the subset")
    parser.add_argument("--val", type=int, default=256, help="val images in the subset")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medsearch-train-speed-") as tmp:
        work = Path(tmp)
        small = work / "subset.npz"
        subset(args.data, small, n_train=args.train, n_val=args.val)
        rows = [measure(small, int(s), work=work) for s in args.sizes.split(",")]
    result = {
        "data": args.data.name,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "sizes": rows,
        "wall_s": round(time.time() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
