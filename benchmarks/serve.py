"""Warm end-to-end latency of ``medsearch serve`` for one CT slice, against the same query in-process.

Starts ``medsearch serve`` on a free local port (the shipped sample, indexed into a temporary folder,
unless ``--index`` is given), waits for ``/health``, then posts the same DICOM slice ``--n`` times
(after ``--warmup`` posts) and reports the median and 90th percentile of the client-side round trip:
upload, decode, preprocess, encode, search and JSON. For comparison, the same query through an
in-process :class:`medsearch.search.Searcher` in this process (no HTTP), interleaved with the posts.

Usage::

    .venv/bin/python benchmarks/serve.py [--n 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "medsearch" / "data" / "sample" / "tcga-luad-ct"
STUDY = SAMPLE / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="timed queries (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", type=Path)
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from medsearch.deid import SiteKey
    from medsearch.indexing import build_index
    from medsearch.search import Searcher

    with tempfile.TemporaryDirectory() as tmp:
        index = args.index
        if index is None:
            index = Path(tmp) / "index"
            build_index(SAMPLE, index, key=SiteKey.load(Path(tmp) / "site.key", create=True))
        port = _free_port()
        cli = str(Path(sys.executable).with_name("medsearch"))
        started = time.perf_counter()
        log = open(Path(tmp) / "serve.log", "w+")
        server = subprocess.Popen([cli, "serve", str(index), "--port", str(port)], stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=120) as client:
                while True:
                    if server.poll() is not None:
                        log.seek(0)
                        raise SystemExit(f"medsearch serve exited: {log.read()[-500:]}")
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.2)
                ready_s = time.perf_counter() - started
                info = client.get("/info").json()
                body = args.study.read_bytes()
                headers = {"Content-Type": "application/dicom"}
                searcher = Searcher(index)
                for _ in range(args.warmup):
                    client.post(f"/query?k={args.k}", content=body, headers=headers).raise_for_status()
                    searcher.search(args.study, k=args.k)
                http_s, local_s = [], []
                for _ in range(args.n):
                    t = time.perf_counter()
                    response = client.post(f"/query?k={args.k}", content=body, headers=headers)
                    http_s.append(time.perf_counter() - t)
                    response.raise_for_status()
                    t = time.perf_counter()
                    searcher.search(args.study, k=args.k)
                    local_s.append(time.perf_counter() - t)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()

    record = {
        "study_bytes": len(body),
        "n": args.n,
        "k": args.k,
        "runtime": info["encoder_runtime"],
        "ready_s": round(ready_s, 2),
        "http_median_ms": round(1000 * float(np.median(http_s)), 1),
        "http_p90_ms": round(1000 * float(np.percentile(http_s, 90)), 1),
        "in_process_median_ms": round(1000 * float(np.median(local_s)), 1),
        "nproc": os.cpu_count(),
    }
    print(f"medsearch serve ({record['runtime']} runtime), one CT slice of {len(body) / 1e6:.2f} MB, k = {args.k}, "
          f"nproc = {record['nproc']}")
    print(f"  ready after {record['ready_s']} s (process start, imports, index and encoder load, warm-up)")
    print(f"  HTTP round trip: median {record['http_median_ms']} ms, p90 {record['http_p90_ms']} ms over {args.n}")
    print(f"  the same query in-process (Searcher.search): median {record['in_process_median_ms']} ms")
    if args.json:
        args.json.write_text(json.dumps([record], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
