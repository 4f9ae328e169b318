"""Where the time of ``medsearch evaluate`` goes: 1,000 queries against a 5,000-image gallery at 28 px.

Builds the two sets from PneumoniaMNIST (28x28 gray): queries are the first 1,000 of test + val,
the gallery is the train split topped up to 5,000 with horizontally flipped train images (new
pixels, so the encoder does real work for each). Runs :func:`medsearch.evaluate.evaluate_npz` once,
without a cache, and prints the split as JSON: preprocessing, encoder, faiss search, metric code
and bootstrap, in seconds and as shares of the total.

Usage::

    .venv/bin/python benchmarks/evaluate_speed.py [--data PATH] [--queries 1000] [--gallery 5000] [--runtime torch|onnx]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medsearch.config import load_config
from medsearch.evaluate import evaluate_npz

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist_reduced_train.npz"


def _sets(path: Path, n_queries: int, n_gallery: int) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        train_x, train_y = data["train_images"], data["train_labels"].reshape(-1)
        query_x = np.concatenate([data["test_images"], data["val_images"]])[:n_queries]
        query_y = np.concatenate([data["test_labels"].reshape(-1), data["val_labels"].reshape(-1)])[:n_queries]
    extra = n_gallery - len(train_x)
    if extra > len(train_x):
        raise SystemExit(f"cannot make a gallery of {n_gallery} from {len(train_x)} train images")
    gallery_x = np.concatenate([train_x, train_x[:extra, :, ::-1]]) if extra > 0 else train_x[:n_gallery]
    gallery_y = np.concatenate([train_y, train_y[:extra]]) if extra > 0 else train_y[:n_gallery]
    return {"train_images": gallery_x, "train_labels": gallery_y, "test_images": query_x, "test_labels": query_y}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=5000)
    parser.add_argument("--config", default=None, help="config file or preset (default: default)")
    parser.add_argument("--runtime", default=None, help="encoder runtime: torch, onnx or auto (default: the config's)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found; pass --data PATH to pneumoniamnist_reduced_train.npz")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speed.npz"
        np.savez(path, **_sets(args.data, args.queries, args.gallery))
        load_before = os.getloadavg()[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        config = load_config(args.config)
        if args.runtime:
            config = config.replace(encoder={"runtime": args.runtime})
        report = evaluate_npz(path, config=config, ks=(1, 5, 10), progress=sys.stderr.isatty())
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    result = report.result
    t = result.timings
    parts = {
        "preprocess_s": t.get("preprocess_s", 0.0),
        "encode_s": t.get("encode_s", 0.0),
        "search_s": t.get("search_s", 0.0),
        "metrics_s": t.get("metrics_s", 0.0),
        "bootstrap_s": t.get("bootstrap_s", 0.0),
    }
    parts["other_s"] = max(wall - sum(parts.values()), 0.0)
    print(json.dumps({
        "n_queries": result.n_queries,
        "n_gallery": result.n_gallery,
        "image_shape": result.settings["image_shape"],
        "encoder_input_px": result.settings["preprocess"]["size"],
        "encoder": result.encoder["name"],
        "device": result.encoder.get("device"),
        "runtime": result.encoder.get("runtime"),
        "results_per_query": result.settings["results_per_query"],
        "images_embedded": t.get("images"),
        "encoder_images_per_s": round(t.get("images", 0) / max(t.get("encode_s", 1e-9), 1e-9), 2),
        "wall_s": round(wall, 2),
        "process_cpu_s": round(cpu, 2),
        # Other programs on the machine slow every stage alike; the load says how busy it was.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": {k: round(v, 3) for k, v in parts.items()},
        "share": {k.removesuffix("_s"): round(v / wall, 4) for k, v in parts.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
    }, indent=2))


if __name__ == "__main__":
    main()
