"""Where the time of a cold ``medsearch query`` goes, per encoder runtime, in fresh processes, and how it
compares with the floor: a bare interpreter that only runs ``import torch, numpy, pydicom, faiss``.

Each repeat starts new Python processes (the disk cache stays warm, as for a user who queries twice):

* ``cli``: the whole ``medsearch query STUDY --index DIR --json`` command, wall time;
* ``floor``: ``python -c "import torch, numpy, pydicom, faiss"``, wall time, interleaved with the
  queries (so that both see the same machine load); ``ratio`` is the median cold query over the
  median floor (at most 1.0 is the target: a query costs no more than importing its libraries);
* ``split``: one process that times the same work stage by stage: interpreter start and exit, ``import
  medsearch.cli`` (what ``medsearch --help`` costs), the imports of the query path (torch, MONAI,
  faiss, pydicom, pandas), opening the index and loading the encoder (an ONNX Runtime session from
  the cache, or the torch network from its weights), reading and decoding the DICOM file,
  preprocessing, encoding, and the faiss search;
* ``imports``: one process per heavy library, to see what each import costs on its own.

Both runtimes are measured in the same run, interleaved, and each figure is a median. The sample
archive shipped with medsearch is indexed into a temporary folder unless ``--index`` is given; the
ONNX export is made (and cached) before timing, so the ``onnx`` figures are those of every start
after the first.

Usage::

    .venv/bin/python benchmarks/startup.py [--repeats 5] [--index DIR --study FILE] [--json [FILE]]

``--json`` alone prints the records as JSON on stdout (the table goes to stderr); with a FILE it
writes them there. The load average before and after the run is recorded: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "medsearch" / "data" / "sample" / "tcga-luad-ct"
STUDY = SAMPLE / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"
RUNTIMES = ("onnx", "torch")
LIBRARIES = ("torch", "monai.transforms", "faiss", "pydicom", "pandas", "onnxruntime", "fastapi")
FLOOR = "import torch, numpy, pydicom, faiss"
STAGES = ("interpreter_and_exit", "import_cli", "import_query_path", "load_index_and_encoder", "decode", "preprocess",
          "encode", "search")

# The child: time each stage of a query from inside one fresh process. Kept as text so that nothing
# is imported before the clock starts.
_CHILD = r"""
import json, sys, time
clock = [time.perf_counter()]
def lap():
    clock.append(time.perf_counter())
    return clock[-1] - clock[-2]
index, study, config, runtime = sys.argv[1:5]
out = {}
import medsearch.cli
out["import_cli"] = lap()
import medsearch.search, medsearch.store, medsearch.io, medsearch.transforms, medsearch.encoders
out["import_query_path"] = lap()
searcher = medsearch.search.Searcher(index, config=config)
out["load_index_and_encoder"] = lap()
case, volume = medsearch.io.load_study(study)
out["decode"] = lap()
info = searcher.encoder.info
batch = medsearch.transforms.encoder_batch(
    volume.pixels, config=searcher.config.preprocess, modality=volume.modality, rgb=volume.rgb,
    spacing=volume.spacing, spatial_dims=info.spatial_dims, channels=info.in_channels, mean=info.mean, std=info.std)
out["preprocess"] = lap()
vectors = searcher.encoder.embed(batch)
vector = vectors.mean(axis=0)
out["encode"] = lap()
result = searcher.search_vector(vector / max(float((vector ** 2).sum()) ** 0.5, 1e-12), k=10)
json.dumps(result.to_dict(), default=str)
out["search"] = lap()
if searcher.encoder.runtime != runtime:
    sys.exit(f"asked for runtime {runtime}, got {searcher.encoder.runtime}")
out["torch_imported"] = "torch" in sys.modules
out["monai_imported"] = "monai" in sys.modules
print(json.dumps(out))
"""


def _toml(config: dict) -> str:
    """A config as TOML (flat sections of strings, numbers, booleans and lists)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in values.items()]
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    return wall, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--index", type=Path, help="an index (default: the shipped sample, indexed into a temp folder)")
    parser.add_argument("--study", type=Path, default=STUDY, help="the study to query (a CT slice of the sample)")
    parser.add_argument("--json", nargs="?", const="-", type=str,
                        help="the records as JSON: on stdout (no FILE, the table then goes to stderr), or into FILE")
    args = parser.parse_args(argv)
    python = sys.executable
    medsearch_cli = str(Path(python).with_name("medsearch"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    show = sys.stderr if args.json == "-" else sys.stdout
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        from medsearch.config import Config
        from medsearch.deid import SiteKey
        from medsearch.indexing import build_index
        from medsearch.search import Searcher

        index = args.index
        if index is None:
            index = Path(tmp) / "index"
            build_index(SAMPLE, index, key=SiteKey.load(Path(tmp) / "site.key", create=True))
        base = Searcher(index).config  # the index's own settings; this also makes the ONNX export
        configs = {}
        for runtime in RUNTIMES:
            path = Path(tmp) / f"{runtime}.toml"
            cfg: Config = base.replace(encoder={"runtime": runtime, "device": "cpu"})
            path.write_text(_toml(cfg.to_dict()))
            configs[runtime] = str(path)

        times: dict[tuple[str, str], list[float]] = {}
        torch_imported: dict[str, bool] = {}
        monai_imported: dict[str, bool] = {}
        floor: list[float] = []
        for r in range(args.repeats):
            floor.append(_run([python, "-c", FLOOR], env)[0])
            for runtime in RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]:
                wall, _ = _run([medsearch_cli, "query", str(args.study), "--index", str(index), "--json",
                                "--config", configs[runtime]], env)
                times.setdefault((runtime, "cli_total"), []).append(wall)
                wall, out = _run([python, "-c", _CHILD, str(index), str(args.study), configs[runtime], runtime], env)
                stages = json.loads(out.strip().splitlines()[-1])
                torch_imported[runtime] = stages.pop("torch_imported")
                monai_imported[runtime] = stages.pop("monai_imported")
                stages["interpreter_and_exit"] = wall - sum(stages.values())
                for name, seconds in stages.items():
                    times.setdefault((runtime, name), []).append(seconds)
                times.setdefault((runtime, "split_total"), []).append(wall)
        lib_times: dict[str, list[float]] = {}
        for _ in range(max(1, args.repeats // 2)):
            for lib in ["pass", *LIBRARIES]:
                code = "pass" if lib == "pass" else f"import {lib}"
                wall, _ = _run([python, "-c", code], env)
                lib_times.setdefault(lib, []).append(wall)

    load_after = os.getloadavg()
    floor_s = float(np.median(floor))
    records = [{"kind": "floor", "command": f'python -c "{FLOOR}"', "median_s": round(floor_s, 3),
                "repeats": args.repeats}]
    for runtime in RUNTIMES:
        total = float(np.median(times[(runtime, "split_total")]))
        for stage in (*STAGES, "split_total", "cli_total"):
            seconds = float(np.median(times[(runtime, stage)]))
            records.append({"kind": "query", "runtime": runtime, "stage": stage, "median_s": round(seconds, 3),
                            "share": round(seconds / total, 3) if stage in STAGES else None,
                            "repeats": args.repeats, "torch_imported": torch_imported[runtime],
                            "monai_imported": monai_imported[runtime]})
        cold = float(np.median(times[(runtime, "cli_total")]))
        records.append({"kind": "ratio", "runtime": runtime, "cold_query_s": round(cold, 3),
                        "floor_s": round(floor_s, 3), "ratio": round(cold / floor_s, 3)})
    interpreter = float(np.median(lib_times["pass"]))
    for lib in LIBRARIES:
        seconds = float(np.median(lib_times[lib]))
        records.append({"kind": "import", "library": lib, "median_s": round(seconds - interpreter, 3),
                        "repeats": len(lib_times[lib])})
    machine = {"nproc": os.cpu_count(), "load_before": [round(v, 2) for v in load_before],
               "load_after": [round(v, 2) for v in load_after]}
    records = [{**rec, **machine} for rec in records]

    def say(*parts: object) -> None:
        print(*parts, file=show)

    say(f"cold `medsearch query` (median of {args.repeats} fresh processes each; nproc = {os.cpu_count()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    say(f"{'stage':<26}" + "".join(f"{rt:>16}" for rt in RUNTIMES))
    for stage in (*STAGES, "split_total", "cli_total"):
        cells = []
        for runtime in RUNTIMES:
            rec = next(r for r in records if r.get("runtime") == runtime and r["stage"] == stage)
            share = f" ({rec['share']:.0%})" if rec["share"] is not None else ""
            cells.append(f"{rec['median_s']:>9.2f} s{share:>6}")
        say(f"{stage:<26}" + "".join(f"{c:>16}" for c in cells))
    say("torch imported:", {rt: torch_imported[rt] for rt in RUNTIMES}, "MONAI imported:", {rt: monai_imported[rt] for rt in RUNTIMES})
    say(f"floor, {FLOOR!r} in a bare interpreter: {floor_s:.2f} s")
    for rec in records:
        if rec["kind"] == "ratio":
            say(f"  cold query / floor ({rec['runtime']}): {rec['cold_query_s']:.2f} s / {rec['floor_s']:.2f} s = {rec['ratio']:.2f}")
    say("import on its own (over a bare interpreter, median):")
    for rec in records:
        if rec["kind"] == "import":
            say(f"  {rec['library']:<18}{rec['median_s']:>7.2f} s")
    if args.json == "-":
        sys.stdout.write(json.dumps(records, indent=1) + "\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
