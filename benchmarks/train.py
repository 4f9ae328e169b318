"""The default ``medsearch train`` against the frozen default encoder, on the test split of each labeled set.

For each ``.npz`` given, runs, as a user would, one after the other:

1. ``medsearch train DATA --out OUT/NAME --json -q`` (the recipe chooses everything);
2. ``medsearch evaluate DATA --protocol P --config OUT/NAME.toml`` for each protocol;
3. ``medsearch evaluate DATA --protocol P`` (the frozen default encoder, 224 px).

and prints one JSON object: per set, what the run chose and why (recipe, candidates, verdict),
its wall time, and for each protocol the test metrics of both encoders with their 95% bootstrap
intervals, and whether the trained one falls below the frozen one's interval. The load average
before and after each command is recorded: on a shared 2-core machine it changes wall times by a
factor of 2 to 6.

Usage::

    .venv/bin/python benchmarks/train.py [DATA.npz ...] [--out runs/bench] [--protocols mahbod2024,medmnistplus] [--json out.json]

Without DATA, the sets of ../shared/data/medmnist: breastmnist, pneumoniamnist_reduced_train, vesselmnist3d.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
DEFAULT_SETS = ("breastmnist.npz", "pneumoniamnist_reduced_train.npz", "vesselmnist3d.npz")
HEADLINE = {"mahbod2024": ("map_hits@5", "mmv@5", "hit@1"), "medmnistplus": ("knn_acc@11",)}


def _medsearch(*args: str) -> tuple[float, float, float, str]:
    """Run ``medsearch ARGS``; return (wall seconds, load before, load after, stdout)."""
    before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medsearch", *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"medsearch {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds, before, os.getloadavg()[0], done.stdout


def _scores(path: Path, protocol: str) -> dict[str, Any]:
    result = json.loads(path.read_text())
    return {
        name: {"mean": round(100 * result["metrics"][name], 2), "ci95": [round(100 * v, 2) for v in result["ci95"][name]]}
        for name in HEADLINE[protocol]
    }


def bench(data: Path, out: Path, protocols: list[str]) -> dict[str, Any]:
    name = data.stem
    run = out / name
    seconds, load0, load1, stdout = _medsearch("train", str(data), "--out", str(run), "--json", "-q")
    report = json.loads(stdout)
    entry: dict[str, Any] = {
        "data": str(data),
        "train_command": f"medsearch train {data} --out {run}",
        "train_seconds": round(seconds, 1),
        "load_before_after": [round(load0, 2), round(load1, 2)],
        "recipe": report["recipe"],
        "chosen": report["chosen"],
        "verdict": report["verdict"],
        "candidates": report["candidates"],
        "protocols": {},
    }
    for protocol in protocols:
        scored = {}
        for who, config in (("trained", ["--config", f"{run}.toml"]), ("frozen_default", [])):
            target = out / f"{name}-{who}-{protocol}.json"
            secs, l0, l1, _ = _medsearch("evaluate", str(data), "--protocol", protocol, *config, "--json", str(target), "-q")
            scored[who] = {"scores": _scores(target, protocol), "seconds": round(secs, 1), "load_before_after": [round(l0, 2), round(l1, 2)]}
        below = {
            metric: scored["trained"]["scores"][metric]["mean"] < scored["frozen_default"]["scores"][metric]["ci95"][0]
            for metric in HEADLINE[protocol]
        }
        entry["protocols"][protocol] = {**scored, "below_frozen_interval": below}
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--protocols", default="mahbod2024", help="comma-separated: mahbod2024, medmnistplus")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    sets = args.data or [SHARED / s for s in DEFAULT_SETS]
    missing = [str(p) for p in sets if not p.is_file()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}; pass the .npz files to measure")
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(protocols) - set(HEADLINE))
    if unknown:
        raise SystemExit(f"unknown protocol(s) {', '.join(unknown)}; use {', '.join(HEADLINE)}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sets": [bench(p, args.out, protocols) for p in sets],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
