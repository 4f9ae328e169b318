"""Indexing throughput: the medsearch pipeline against a naive loop and against the encoder alone.

Builds a synthetic archive of real-looking DICOMs derived from real samples, with new UIDs and a
little noise added to the pixels:

* CT series of ``--series-length`` slices (default 8; positions 2.5 mm apart), from the TCGA-LUAD
  slices shipped in ``medsearch/data/sample/tcga-luad-ct`` (512 x 512) and pydicom's ``CT_small.dcm``;
* computed radiographs, from pydicom-data's ``RG1_UNCI.dcm`` and ``RG3_UNCI.dcm`` (CR, MONOCHROME1),
  halved to about 900 x 900 to keep the archive small (pixel spacing doubled to match).

Then, in one run (so that all figures share the machine's load):

1. **encoder alone**: images/s of ``Encoder.embed`` on pre-decoded, preprocessed tensors, in batches
   of ``--batch-images`` (the pipeline's encoder call), median of ``--repeats``; measured before and
   after the pipeline, and the median of all those runs is the reference;
2. **naive loop**: one process, one case at a time: read, decode, preprocess, embed, thumbnail
   (the loop ``build_index`` ran before the pipeline), over about ``--naive-files`` files: every
   k-th whole CT series or radiograph, so that the sample has the archive's mix;
3. **pipeline**: ``build_index`` with ``--workers`` worker processes, on the whole archive, with the
   seconds per stage from its report;
4. **re-run** on the unchanged archive, with the file-state cache and without it;
5. **commit cost** of ``IndexStore.commit`` at a few index sizes, and what it adds up to over a large
   archive with fixed 64-case chunks and with the pipeline's spaced-out commits.

Usage::

    nice -n 10 .venv/bin/python benchmarks/ingest.py [--files 5000] [--workers N] [--json FILE]
    nice -n 10 .venv/bin/python benchmarks/ingest.py --engine ray ...   # also the Ray engine, ray/local

With ``--engine ray`` the same archive is indexed again by the Ray engine (``pip install
"medsearch[ray]"``) on a local Ray started before the timing, as a running cluster would be;
``ray_engine.ray_over_local`` is its time over the local pipeline's (target <= 1.3).

Compare figures only within one run; on a shared machine, compare the ratios. The JSON goes to stdout
(and ``--json``); a summary in a few lines ends stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsearch.config import Config
from medsearch.deid import SiteKey
from medsearch.embedding import embed_volume, encoder_input
from medsearch.encoders import load_encoder
from medsearch.indexing import build_index, default_workers
from medsearch.io import load_volume, scan
from medsearch.store import IndexStore
from medsearch.transforms import make_thumbnail

SAMPLE = Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample" / "tcga-luad-ct"
SLICES_PER_SERIES = 8
XRAY_FRACTION = 0.2


# -- the archive --------------------------------------------------------------------------------------


def _sources() -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    ct = [pydicom.dcmread(p) for p in sorted(SAMPLE.glob("*.dcm"))]
    small = get_testdata_file("CT_small.dcm")
    if small:
        ct.append(pydicom.dcmread(small))
    xray = []
    for name in ("RG1_UNCI.dcm", "RG3_UNCI.dcm"):
        path = get_testdata_file(name)
        if path:
            ds = pydicom.dcmread(path)
            half = ds.pixel_array[::2, ::2].copy()
            ds.PixelData = half.tobytes()
            ds.Rows, ds.Columns = half.shape
            for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
                if keyword in ds:
                    setattr(ds, keyword, [float(v) * 2 for v in ds[keyword].value])
            xray.append(ds)
    if not xray:
        print("pydicom-data is not installed: the archive holds CT only", file=sys.stderr)
    return ct, xray


def _write(ds: pydicom.Dataset, path: Path, rng: np.random.Generator, *, study: str, series: str) -> None:
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pixels = ds.pixel_array
    noise = rng.integers(-2, 3, size=pixels.shape)
    info = np.iinfo(pixels.dtype)
    ds.PixelData = np.clip(pixels.astype(np.int64) + noise, info.min, info.max).astype(pixels.dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def build_archive(root: Path, n_files: int, *, xray_fraction: float = XRAY_FRACTION,
                  series_length: int = SLICES_PER_SERIES, seed: int = 0) -> dict[str, int]:
    """Write about ``n_files`` files under ``root``: CT series of ``series_length`` slices and single radiographs."""
    rng = np.random.default_rng(seed)
    ct, xray = _sources()
    n_xray = round(n_files * xray_fraction) if xray else 0
    n_series = max(1, (n_files - n_xray) // series_length)
    for s in range(n_series):
        src = ct[s % len(ct)]
        study, series = generate_uid(), generate_uid()
        for z in range(series_length):
            ds = copy.deepcopy(src)
            ds.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * z]
            ds.InstanceNumber = z + 1
            _write(ds, root / f"ct{s:05d}" / f"slice{z:03d}.dcm", rng, study=study, series=series)
    for i in range(n_xray):
        _write(xray[i % len(xray)], root / "xray" / f"cr{i:05d}.dcm", rng, study=generate_uid(), series=generate_uid())
    return {"ct_series": n_series, "ct_files": n_series * series_length, "xray_files": n_xray}


# -- measurements -------------------------------------------------------------------------------------


def encoder_only(encoder, config: Config, archive: Path, *, batch: int, repeats: int) -> tuple[list[float], float]:
    """Images/s of the encoder on tensors decoded and preprocessed beforehand (one value per repeat),
    and the core-seconds it spends per image (all its threads)."""
    found = scan(sorted(p for p in archive.rglob("*.dcm"))[:200])
    images = []
    for case in found.cases[:40]:
        volume, _ = load_volume(case)
        images.append(encoder_input(volume, encoder.info, config).numpy())
    pool = np.concatenate(images)
    tensor = np.ascontiguousarray(np.resize(pool, (batch, *pool.shape[1:])), dtype=np.float32)
    encoder.embed(tensor)  # warm up
    rates = []
    cpu_before = _cpu_seconds()["this_process"]
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.embed(tensor)
        rates.append(batch / (time.perf_counter() - started))
    return rates, (_cpu_seconds()["this_process"] - cpu_before) / (batch * repeats)


def _sample(archive: Path, n_files: int) -> list[Path]:
    """About ``n_files`` files of the archive in its own mix: every k-th whole CT series or radiograph.

    (The first ``n_files`` in path order would be CT series only, which cost less per file.)
    """
    units = [sorted(d.glob("*.dcm")) for d in sorted(archive.glob("ct*")) if d.is_dir()]
    units += [[p] for p in sorted((archive / "xray").glob("*.dcm"))]
    total = sum(len(u) for u in units)
    step = max(1, round(total / max(1, n_files)))
    return [p for unit in units[::step] for p in unit]


def naive_loop(encoder, config: Config, archive: Path, n_files: int) -> dict[str, float]:
    """One process, one case at a time: read, decode, preprocess, embed, thumbnail."""
    files = _sample(archive, n_files)
    started = time.perf_counter()
    found = scan(files)
    images = 0
    for case in found.cases:
        volume, _ = load_volume(case)
        embed_volume(volume, encoder, config)
        make_thumbnail(volume.pixels, config=config.preprocess, modality=volume.modality, rgb=volume.rgb,
                       spacing=volume.spacing, size=config.index.thumbnail_size)
        images += min(config.preprocess.slices, volume.pixels.shape[0])
    seconds = time.perf_counter() - started
    return {"files": len(files), "cases": len(found.cases), "images": images, "seconds": round(seconds, 2),
            "files_per_s": round(len(files) / seconds, 2), "images_per_s": round(images / seconds, 2)}


def commit_costs(sizes: list[int], dim: int = 1280, thumb: int = 96) -> dict[str, object]:
    """Seconds of one ``IndexStore.commit`` at each size, and the total over a large archive."""
    rng = np.random.default_rng(0)
    seconds = {}
    for n in sizes:
        folder = Path(tempfile.mkdtemp(prefix="medsearch-commit-"))
        try:
            store = IndexStore.create(folder / "index", dim=dim, encoder={"name": "bench", "dim": dim},
                                      preprocess={}, key_check="bench")
            rows = pd.DataFrame({"case_id": [f"c-{i:016x}" for i in range(n)], "modality": "CT", "n_slices": 8})
            store.add(rng.standard_normal((n, dim)).astype(np.float32), rows,
                      rng.integers(0, 255, (n, thumb, thumb), dtype=np.uint8))
            started = time.perf_counter()
            store.commit()
            seconds[n] = time.perf_counter() - started
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    # commit cost ~ a + b * n; over an archive of N cases at r cases/s:
    n_arr, s_arr = np.array(list(seconds)), np.array(list(seconds.values()))
    b, a = np.polyfit(n_arr, s_arr, 1)
    total, rate = 100_000, 50.0  # cases, cases/s (a GPU keeps the encoder at this pace)

    def fixed(chunk: int) -> float:
        return float(sum(a + b * n for n in range(chunk, total + chunk, chunk)))

    def spaced() -> float:  # the pipeline's rule: 64 cases, or 60 s; then at least 10x the last commit
        t, n, spent, cost = 0.0, 0, 0.0, 0.0
        while n < total:
            gap = max(64 / rate, 10 * cost if cost > 0.5 else 0.0)
            n = min(total, n + int(np.ceil(gap * rate)))
            cost = a + b * n
            spent += cost
            t += gap
        return spent

    return {
        "seconds_per_commit": {str(k): round(v, 3) for k, v in seconds.items()},
        "model": f"{a:.3f} s + {b * 1e3:.4f} ms per case in the index" if b > 0 else "n/a",
        "archive_100k_cases_at_50_per_s": {
            "encode_seconds": total / rate,
            "commit_seconds_fixed_64_case_chunks": round(fixed(64), 1),
            "commit_seconds_spaced_out": round(spaced(), 1),
        },
    }


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process and (on Linux) busy on the whole machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"this_process": usage.ru_utime + usage.ru_stime}
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        out["machine_busy"] = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    except (OSError, ValueError, IndexError):
        pass
    return out


def _bound(report: dict, cpu: dict[str, float], encoder_images_per_s: float, encoder_core_s: float) -> dict | None:
    """The best ratio this machine allows for this archive, whatever the pipeline's scheduling.

    All cores busy, the encoder costing what it costs alone, and the files costing the pipeline what
    they cost it in this run: the run can take no less than the larger of (a) its images at the
    encoder's own rate and (b) all that CPU work spread over the cores. The workers' cost is the
    machine's busy time less this process's, so it holds only on an otherwise idle machine.
    """
    if "machine_busy" not in cpu or not report["files_found"]:
        return None
    cores = os.cpu_count() or 1
    images, files = report["images_encoded"], report["files_found"]
    workers_core_s = max(0.0, cpu["machine_busy"] - cpu["this_process"])
    encode_core_s = images * encoder_core_s
    other_here = max(0.0, cpu["this_process"] - encode_core_s)  # encoder threads' extra cost, bookkeeping
    fastest = max(images / encoder_images_per_s, (encode_core_s + workers_core_s) / cores)
    return {
        "cores": cores,
        "worker_core_ms_per_file": round(1e3 * workers_core_s / files, 2),
        "encoder_core_s_at_its_own_cost": round(encode_core_s, 1),
        "this_process_core_s_beyond_that": round(other_here, 1),
        "fastest_possible_seconds": round(fastest, 1),
        "best_possible_ratio": round(encoder_images_per_s / (files / fastest), 3),
        "note": "no lower ratio is possible on this machine without less CPU per file; valid on an otherwise idle machine",
    }


def ray_engine_run(archive: Path, work: Path, key: SiteKey, config: Config, args: argparse.Namespace,
                   local: dict) -> dict[str, object]:
    """The same archive indexed by the Ray engine (``build_index(engine="ray")``) on a local Ray of all
    cores, started first (as a running cluster would be); its time over the local pipeline's."""
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - started
    try:
        report = build_index(archive, work / "index-ray", key=key, config=config, engine="ray",
                             batch_images=args.batch_images).to_dict()
    finally:
        ray.shutdown()
        shutil.rmtree(work / "index-ray", ignore_errors=True)
    return {"seconds": report["seconds"], "files_per_second": report["files_per_second"],
            "cases_added": report["cases_added"], "images_encoded": report["images_encoded"],
            "stage_seconds": report["stage_seconds"], "ray_start_seconds": round(startup, 2),
            "same_cases_as_local": report["cases_added"] == local["cases_added"],
            "ray_over_local": round(report["seconds"] / local["seconds"], 3), "target": "ray_over_local <= 1.3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000, help="archive size in files (default 5000)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="pipeline worker processes")
    parser.add_argument("--batch-images", type=int, default=32, help="images per encoder call")
    parser.add_argument("--xray-fraction", type=float, default=XRAY_FRACTION, help="share of radiographs among the files")
    parser.add_argument("--series-length", type=int, default=SLICES_PER_SERIES,
                        help=f"slices per CT series (default {SLICES_PER_SERIES}; clinical series have 100s)")
    parser.add_argument("--naive-files", type=int, default=None,
                        help="about this many files timed in the naive loop, in the archive's mix (default: min(files, 400))")
    parser.add_argument("--repeats", type=int, default=5, help="encoder-alone repeats, before and after the pipeline")
    parser.add_argument("--archive", type=Path, default=None, help="keep (or reuse) the synthetic archive here")
    parser.add_argument("--commit-sizes", default="1000,4000,16000", help="index sizes for the commit cost")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: also index the same archive with the Ray engine (a local Ray of this machine's "
                             "cores, started before the timing) and report its time over the local pipeline's")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medsearch-ingest-"))
    archive = args.archive or work / "archive"
    config = Config()
    result: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"files": args.files, "workers": args.workers, "batch_images": args.batch_images,
                     "xray_fraction": args.xray_fraction, "series_length": args.series_length,
                     "preprocess": config.to_dict()["preprocess"], "encoder": config.encoder.name},
    }
    try:
        started = time.perf_counter()
        if not archive.exists() or not any(archive.rglob("*.dcm")):
            result["archive"] = build_archive(archive, args.files, xray_fraction=args.xray_fraction,
                                              series_length=args.series_length)
        n_files = sum(1 for _ in archive.rglob("*.dcm"))
        result["archive_files"] = n_files
        print(f"archive: {n_files} files in {archive} ({time.perf_counter() - started:.0f} s to write)", file=sys.stderr)

        encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
        result["encoder_runtime"] = f"{encoder.runtime} on {encoder.device.type}"
        before, core_s_before = encoder_only(encoder, config, archive, batch=args.batch_images, repeats=args.repeats)
        print(f"encoder alone: {statistics.median(before):.1f} images/s", file=sys.stderr)

        naive = naive_loop(encoder, config, archive, args.naive_files or min(n_files, 400))
        result["naive_loop"] = naive
        print(f"naive loop: {naive['files_per_s']} files/s", file=sys.stderr)

        key = SiteKey.load(work / "bench.key", create=True)
        index = work / "index"
        cpu_before = _cpu_seconds()
        report = build_index(archive, index, key=key, config=config, workers=args.workers,
                             batch_images=args.batch_images, progress=True).to_dict()
        cpu = {k: round(v - cpu_before[k], 1) for k, v in _cpu_seconds().items()}
        pipeline_images_per_s = report["images_encoded"] / report["seconds"]
        # once the workers run (starting them is a fixed cost, a few seconds, paid once per run)
        running = report["seconds"] - report["stage_seconds"]["startup"]
        result["pipeline"] = {**report, "images_per_second": round(pipeline_images_per_s, 2),
                              "files_per_second_after_startup": round(report["files_found"] / running, 2),
                              # share of the time after startup this process spent inside the encoder
                              "encoder_busy_fraction": round(report["stage_seconds"]["encode"] / running, 3),
                              # core-seconds: this process (the encoder and the run's bookkeeping) and the
                              # whole machine (so the workers and the fork server are the difference)
                              "cpu_seconds": cpu}

        if args.engine == "ray":
            result["ray_engine"] = ray_engine_run(archive, work, key, config, args, report)
            print(f"ray engine: {result['ray_engine']['seconds']} s, {result['ray_engine']['ray_over_local']}x the "
                  "local pipeline's time", file=sys.stderr)

        after, core_s_after = encoder_only(encoder, config, archive, batch=args.batch_images, repeats=args.repeats)
        reference = statistics.median(before + after)
        encoder_core_s = (core_s_before + core_s_after) / 2
        result["encoder_only"] = {"images_per_s_before": [round(r, 2) for r in before],
                                  "images_per_s_after": [round(r, 2) for r in after],
                                  "images_per_s_median": round(reference, 2),
                                  "core_ms_per_image": round(1e3 * encoder_core_s, 2)}
        result["bound"] = _bound(report, cpu, reference, encoder_core_s)

        timed = {}
        for cached in (True, False):
            t0 = time.perf_counter()
            again = build_index(archive, index, key=key, workers=args.workers, file_cache=cached)
            timed["with_file_cache" if cached else "without_file_cache"] = {
                "seconds": round(time.perf_counter() - t0, 2), "cases_added": again.n_cases_added,
                "headers_read": again.n_files - again.n_headers_cached}
        result["rerun_unchanged_archive"] = timed
        sizes = [int(s) for s in args.commit_sizes.split(",") if s]
        result["commit_cost"] = commit_costs(sizes) if sizes else None

        result["ratios"] = {
            "encoder_images_per_s_over_pipeline_files_per_s": round(reference / report["files_per_second"], 3),
            "same_after_worker_startup": round(reference / result["pipeline"]["files_per_second_after_startup"], 3),
            "encoder_images_per_s_over_pipeline_images_per_s": round(reference / pipeline_images_per_s, 3),
            "pipeline_over_naive_files_per_s": round(report["files_per_second"] / naive["files_per_s"], 3),
            "target": "encoder_images_per_s_over_pipeline_files_per_s <= 1.3",
        }
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # type: ignore[index]
    finally:
        if args.archive is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "index", ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if "ratios" in result:
        print("\n".join(summary_lines(result)), file=sys.stderr)


def summary_lines(result: dict) -> list[str]:
    """The run in a few lines, for a person (the JSON on stdout has everything)."""
    machine, pipe, enc, naive = result["machine"], result["pipeline"], result["encoder_only"], result["naive_loop"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in pipe["stage_seconds"].items())
    lines = [
        (f"machine: {machine['cpus']} cores; load average {machine['load_average_at_start'][0]} at the start, "
         f"{machine['load_average_at_end'][0]} at the end"),
        f"archive: {pipe['files_found']} files, {pipe['cases_found']} cases, {pipe['images_encoded']} encoder images",
        (f"encoder alone (img/s): before {enc['images_per_s_before']}, after {enc['images_per_s_after']}; "
         f"median {enc['images_per_s_median']}; {enc['core_ms_per_image']} core-ms per image"),
        f"naive loop: {naive['files']} files, {naive['files_per_s']} files/s",
        (f"pipeline: {pipe['seconds']:.2f} s, {pipe['files_per_second']} files/s; stages: {stages}; "
         f"encoder busy {pipe['encoder_busy_fraction']:.0%}"),
        (f"cpu_seconds: this process {pipe['cpu_seconds']['this_process']}, machine busy "
         f"{pipe['cpu_seconds'].get('machine_busy', '?')}"),
    ]
    ratios = result["ratios"]
    lines.append(f"ratios: {ratios['encoder_images_per_s_over_pipeline_files_per_s']} (target <= 1.3); "
                 f"{ratios['same_after_worker_startup']} after worker start-up; "
                 f"pipeline over naive {ratios['pipeline_over_naive_files_per_s']}")
    bound = result.get("bound")
    if bound:
        lines.append(f"bound: cores {bound['cores']}, fastest possible {bound['fastest_possible_seconds']} s, "
                     f"best possible ratio {bound['best_possible_ratio']}; workers {bound['worker_core_ms_per_file']} "
                     "core-ms per file")
    rerun = result["rerun_unchanged_archive"]
    lines.append(f"rerun of the unchanged archive: {rerun['with_file_cache']['seconds']} s with the file-state "
                 f"cache, {rerun['without_file_cache']['seconds']} s without; every file accounted for: "
                 f"{pipe['files_accounted']}")
    return lines


if __name__ == "__main__":
    main()
