"""Images per second of each way to run the default encoder on the CPU, measured in one run.

Paths (EfficientNet-Lite0, 224 px inputs, batch 1 and batch 32):

* ``torch-eager``: eager torch, NCHW (contiguous) tensors and weights;
* ``torch-channels-last``: eager torch, NHWC (what ``runtime="torch"`` runs on the CPU);
* ``torch-compile``: ``torch.compile`` (inductor) of the channels-last network, when it compiles here;
* ``onnxruntime``: the cached ONNX export run by ONNX Runtime (what ``runtime="onnx"`` runs).

The repeats are interleaved (one call of every path, then the next round, in a rotating order) and
each figure is a median, so that the load of a shared machine falls on all paths alike. Compare
numbers only within one run. Peak memory is the maximum resident set of a fresh process that loads
one path and embeds a batch of each size (``--no-memory`` skips these probes).

Each record also says how far the path is from the fastest one measured at that batch size
(``slowdown_vs_fastest``: fastest img/s / this img/s; 1.0 is the fastest) and how close its
embeddings are to eager torch (``min_cosine_vs_eager``).

Usage::

    .venv/bin/python benchmarks/encoder.py [--repeats 7] [--batches 1,32] [--size 224] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medsearch.config import EncoderConfig
from medsearch.encoders import load_encoder, resolve_runtime

PATHS = ("torch-eager", "torch-channels-last", "torch-compile", "onnxruntime")
# The path each runtime setting runs on a CPU.
RUNTIME_PATH = {"torch": "torch-channels-last", "onnx": "onnxruntime"}


def build_path(name: str, max_batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``(B, 3, H, W)`` float32 -> ``(B, 1280)`` features for one path."""
    if name == "onnxruntime":
        onnx = load_encoder(EncoderConfig(device="cpu", runtime="onnx", batch_size=max_batch))
        return onnx.embed
    encoder = load_encoder(EncoderConfig(device="cpu", runtime="torch", batch_size=max_batch))
    if name == "torch-channels-last":
        return encoder.embed
    if name == "torch-eager":
        return _torch_call(copy.deepcopy(encoder.net).to(memory_format=torch.contiguous_format), channels_last=False)
    if name == "torch-compile":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _torch_call(torch.compile(encoder.net), channels_last=True)
    raise ValueError(f"unknown path {name!r}; choose from {', '.join(PATHS)}")


def _torch_call(net: torch.nn.Module, *, channels_last: bool) -> Callable[[np.ndarray], np.ndarray]:
    def run(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            feats = net(x).float().flatten(1)
        return torch.nn.functional.normalize(feats, dim=1).numpy()

    return run


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Inputs in [-1, 1], the range of the default encoder's normalization."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(batch, 3, size, size)).astype(np.float32)


def probe_memory(path: str, batches: list[int], size: int) -> dict[int, float]:
    """Peak RSS (MB) of a fresh process that loads ``path`` and embeds one batch of each size."""
    cmd = [sys.executable, __file__, "--probe", path, "--batches", ",".join(map(str, batches)), "--size", str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"memory probe of {path} failed: {tail}", file=sys.stderr)
        return {}
    return {int(k): float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _probe(path: str, batches: list[int], size: int) -> None:
    run = build_path(path, max(batches))
    peaks = {}
    for batch in sorted(batches):
        run(images(batch, size))
        peaks[batch] = _peak_rss_mb()
    print(json.dumps(peaks))


def _peak_rss_mb() -> float:
    """This process's peak resident set since it started its program.

    VmHWM, not ``getrusage``: after fork and exec, ``ru_maxrss`` keeps the parent's resident set
    at the fork, which here holds every path's model.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per path and batch size (median)")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--paths", default=",".join(PATHS), help="paths to measure, comma-separated")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one process per path)")
    parser.add_argument("--json", type=Path, help="write one record per (path, batch) here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.probe:
        _probe(args.probe, batches, args.size)
        return 0

    default_runtime, _ = resolve_runtime("auto", "cpu")
    default_path = RUNTIME_PATH[default_runtime]
    runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    setup_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in args.paths.split(","):
        started = time.perf_counter()
        try:
            run = build_path(name, max(batches))
            for batch in batches:  # warm-up; for torch.compile this is the compilation
                run(images(batch, args.size))
        except Exception as e:  # noqa: BLE001 - a path that does not work here is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"{name}: not measured ({errors[name]})", file=sys.stderr)
            continue
        runs[name] = run
        setup_s[name] = time.perf_counter() - started

    inputs = {batch: images(batch, args.size, seed=1) for batch in batches}
    reference = {batch: runs["torch-eager"](inputs[batch]) for batch in batches} if "torch-eager" in runs else {}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runs for b in batches}
    cosine: dict[tuple[str, int], float] = {}
    names = list(runs)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for batch in batches:
            for name in order:
                started = time.perf_counter()
                out = runs[name](inputs[batch])
                times[(name, batch)].append(time.perf_counter() - started)
                if r == 0 and batch in reference:
                    cosine[(name, batch)] = float((out * reference[batch]).sum(axis=1).min())

    memory = {} if args.no_memory else {name: probe_memory(name, batches, args.size) for name in runs}
    records = []
    for batch in batches:
        rates = {name: batch / float(np.median(times[(name, batch)])) for name in runs}
        fastest = max(rates.values())
        for name in runs:
            records.append({
                "path": name,
                "batch": batch,
                "size": args.size,
                "img_per_s": round(rates[name], 2),
                "ms_per_batch": round(1000 * float(np.median(times[(name, batch)])), 1),
                "peak_mb": round(memory.get(name, {}).get(batch, float("nan")), 1),
                "slowdown_vs_fastest": round(fastest / rates[name], 3),
                "min_cosine_vs_eager": round(cosine[(name, batch)], 6) if (name, batch) in cosine else None,
                "default": name == default_path,
                "repeats": args.repeats,
                "setup_s": round(setup_s[name], 1),
            })
    for name, error in errors.items():
        records.append({"path": name, "batch": None, "error": error})

    machine = {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    records = [{**rec, **machine} for rec in records]
    print(json.dumps(machine), file=sys.stderr)
    print(f"{'path':<22}{'batch':>6}{'img/s':>9}{'ms/batch':>10}{'peak MB':>9}{'vs fastest':>12}{'cos vs eager':>14}")
    for rec in records:
        if rec.get("error"):
            print(f"{rec['path']:<22}  not measured: {rec['error']}")
            continue
        mark = " (default)" if rec["default"] else ""
        cos = "" if rec["min_cosine_vs_eager"] is None else f"{rec['min_cosine_vs_eager']:.6f}"
        print(f"{rec['path']:<22}{rec['batch']:>6}{rec['img_per_s']:>9.1f}{rec['ms_per_batch']:>10.1f}"
              f"{rec['peak_mb']:>9.0f}{rec['slowdown_vs_fastest']:>11.2f}x{cos:>14}{mark}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
