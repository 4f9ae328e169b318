"""Indexing from a PACS against indexing the same files from disk: what DICOMweb costs.

Builds the synthetic archive of ``benchmarks/ingest.py`` (CT series of 8 slices and radiographs,
real pixels with new UIDs), stores it in a real Orthanc started here on loopback (Debian's
``orthanc`` and ``orthanc-dicomweb``; its own configuration, storage in a temporary folder, the
launcher of ``tests/pacs/orthanc.py``), then, in one run, alternately:

* **disk**: ``build_index(FOLDER)`` into a new index;
* **dicomweb**: ``build_index(URL)`` into a new index: QIDO-RS listing, WADO-RS fetch into the spool
  of what each case needs (every header from the series metadata, the whole instances of the slices
  the engine decodes; single-instance series whole), the same engine;

``--repeats`` times each, with the same workers and site key. Reported: files/s of each (the
median run), the ratio of the medians' seconds (target: DICOMweb at most 1.3x the disk time), and
the ratio within each round (its two runs share the machine's load most closely), and the sync's own figures (listing, fetch seconds summed over the fetching threads, instances fetched whole and
as headers only, megabytes fetched against the megabytes the archive holds).
Storing the archive in Orthanc is timed apart and not part of either.

Usage::

    nice -n 10 .venv/bin/python benchmarks/ingest_dicomweb.py [--files 400] [--series-length 8] [--fetch-slices-only] [--workers N] [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from ingest import build_archive  # noqa: E402  (benchmarks/ingest.py: the same synthetic archive)
from pacs.orthanc import Orthanc  # noqa: E402  (tests/pacs/orthanc.py: the same Orthanc as the tests)

from medsearch.deid import SiteKey  # noqa: E402
from medsearch.indexing import build_index, default_workers  # noqa: E402


def _store(server: Orthanc, archive: Path) -> tuple[int, float]:
    started = time.perf_counter()
    n = 0
    with requests.Session() as session:
        for path in sorted(archive.rglob("*.dcm")):
            session.post(f"{server.url}/instances", data=path.read_bytes(), timeout=60).raise_for_status()
            n += 1
    return n, time.perf_counter() - started


def _run(source: str | Path, index: Path, key: SiteKey, workers: int, **options: bool) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    started = time.perf_counter()
    report = build_index(source, index, key=key, workers=workers, **options)
    seconds = time.perf_counter() - started
    out = {"seconds": round(seconds, 2), "files": report.n_files, "cases": report.n_cases_added,
           "files_per_second": round(report.n_files / seconds, 2), "stage_seconds": report.to_dict()["stage_seconds"]}
    if report.dicomweb is not None:
        out["dicomweb"] = report.dicomweb
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=400, help="archive size in files (default 400)")
    parser.add_argument("--series-length", type=int, default=8, help="slices per CT series (default 8)")
    parser.add_argument("--fetch-slices-only", action="store_true", help="the DICOMweb side fetches only the slices the encoder reads")
    parser.add_argument("--workers", type=int, default=default_workers(), help="pipeline worker processes")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medsearch-bench-dicomweb-"))
    server = None
    try:
        archive = work / "archive"
        made = build_archive(archive, args.files, series_length=args.series_length)
        made["megabytes"] = round(sum(p.stat().st_size for p in archive.rglob("*.dcm")) / 1e6, 2)
        key = SiteKey.load(work / "site.key", create=True)
        server = Orthanc(work / "orthanc").start()
        stored, store_s = _store(server, archive)
        # untimed: the encoder's export cache, the worker processes' start, the page cache of both copies
        build_index(archive, work / "warm", key=key, workers=args.workers)
        build_index(server.dicomweb, work / "warm-pacs", key=key, workers=args.workers)
        runs: dict[str, list[dict]] = {"disk": [], "dicomweb": []}
        for _ in range(args.repeats):
            runs["disk"].append(_run(archive, work / "disk", key, args.workers))
            runs["dicomweb"].append(_run(server.dicomweb, work / "pacs", key, args.workers,
                                         dicomweb_slices_only=args.fetch_slices_only))
        median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
        files = runs["disk"][0]["files"]
        result = {
            "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "python": platform.python_version()},
            "archive": {**made, "files_stored_in_orthanc": stored, "store_seconds": round(store_s, 2)},
            "workers": args.workers,
            "runs": runs,
            "median_seconds": median,
            "files_per_second": {name: round(files / s, 2) for name, s in median.items()},
            "dicomweb_over_disk": round(median["dicomweb"] / median["disk"], 3),
            # each round's ratio: the two runs of a round share the machine's load most closely
            "dicomweb_over_disk_per_round": [round(p["seconds"] / d["seconds"], 3) for d, p in zip(runs["disk"], runs["dicomweb"], strict=True)],
            "target": "dicomweb_over_disk <= 1.3",
            "fetched": {k: runs["dicomweb"][0]["dicomweb"][k] for k in ("instances_fetched", "instances_header_only", "megabytes_fetched")},
        }
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    print(f"disk {result['files_per_second']['disk']} files/s, DICOMweb {result['files_per_second']['dicomweb']} files/s "
          f"(median of {args.repeats}); DICOMweb/disk time {result['dicomweb_over_disk']}x "
          f"(per round: {result['dicomweb_over_disk_per_round']}; target <= 1.3); fetched {result['fetched']['megabytes_fetched']} MB "
          f"of {made['megabytes']} MB ({result['fetched']['instances_fetched']} instances whole, "
          f"{result['fetched']['instances_header_only']} headers only)", file=sys.stderr)


if __name__ == "__main__":
    main()
