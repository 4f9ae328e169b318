"""Warm end-to-end latency of ``medsearch serve`` for one CT slice: the JSON API, the web page, in-process.

Starts ``medsearch serve`` on a free local port (the shipped sample, indexed into a temporary folder,
unless ``--index`` is given), waits for ``/health``, then posts the same DICOM slice ``--n`` times
(after ``--warmup`` posts) and reports the median and 90th percentile of the client-side round trip:
upload, decode, preprocess, encode, search and JSON. For comparison, the same query through an
in-process :class:`medsearch.search.Searcher` in this process (no HTTP), interleaved with the posts.

The page (``GET /``) is measured in the same run, interleaved too: headless Chromium, driven by
Playwright, gets the slice in the page's file input, and the clock stops when the ``k`` result cards
are in the page with their thumbnails loaded and the query image drawn (upload, the same query, the
preview's first slice, the thumbnails, rendering). Also measured: a window preset change, drawn in
the browser from the 16-bit pixels it holds, against what the other design would cost the service
(windowing a slice and encoding it as a PNG, per preset). ``--no-page`` leaves the page out (no
browser needed). As root, the script runs itself in a loopback-only network namespace (``unshare``),
as the tests do, so that the browser reaches nothing but the service.

Usage::

    .venv/bin/python benchmarks/serve.py [--n 30] [--no-page] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
CHROMIUM = os.environ.get("MEDSEARCH_CHROMIUM", "/usr/bin/chromium")
# Wait for: a new study (its token in the address), k cards, every thumbnail loaded, the query image drawn.
_RENDERED = """([k, before]) => {
  const study = new URL(location).searchParams.get('study');
  const cards = document.querySelectorAll('[data-testid=result]');
  const images = [...document.querySelectorAll('[data-testid=result] img')];
  return study && study !== before && cards.length === k && images.length === k
    && images.every(i => i.complete && i.naturalWidth > 0) && document.querySelector('#image').dataset.drawn === 'true';
}"""


def _isolated() -> bool:
    try:
        return {name for _, name in socket.if_nameindex()} == {"lo"}
    except OSError:
        return False


def _in_private_network(argv: list[str]) -> None:
    """As root, run this script again in a loopback-only network namespace (the browser reaches nothing else)."""
    if os.geteuid() == 0 and shutil.which("unshare") and not _isolated() and "--no-page" not in argv:
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                              sys.executable, __file__, *argv])


class _Page:
    """The service's page in headless Chromium: one upload at a time, timed until the results are drawn."""

    def __init__(self, url: str, k: int) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking", "--no-first-run"]
        )
        self.page = self._browser.new_page(viewport={"width": 1280, "height": 800})
        self.page.goto(f"{url}/?k={k}")
        self.page.wait_for_selector("body[data-ready=true]")
        self.k = k

    def upload(self, study: Path) -> float:
        page = self.page
        before = page.evaluate("() => { document.querySelector('#image').dataset.drawn = ''; "
                               "return new URL(location).searchParams.get('study') || ''; }")
        started = time.perf_counter()
        page.set_input_files("#files", str(study))
        page.wait_for_function(_RENDERED, arg=[self.k, before], polling="raf", timeout=120_000)
        return time.perf_counter() - started

    def preset_ms(self) -> float:
        """One window preset change, drawn in the browser (median of 20, alternating two presets)."""
        times = self.page.evaluate("""() => {
          const out = [];
          for (let i = 0; i < 20; i++) {
            const input = document.querySelector(i % 2 ? '#preset-lung' : '#preset-bone');
            const t = performance.now(); input.click(); out.push(performance.now() - t);
          }
          return out.sort((a, b) => a - b)[10];
        }""")
        return float(times)

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()


def _png_per_preset_ms(study: Path) -> tuple[float, int]:
    """What rendering on the service would cost per preset: window one slice, encode it as a PNG (median of 20)."""
    from medsearch.io import load_study
    from medsearch.web.pictures import png

    image = load_study(study)[1].pixels[0]
    times, size = [], 0
    for _ in range(20):
        t = time.perf_counter()
        gray = np.clip((image - (-600 - 750)) / 1500 * 255, 0, 255).astype(np.uint8)
        size = len(png(gray))
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)), size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    _in_private_network(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="timed queries (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", type=Path)
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--page", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the web page in headless Chromium (needs playwright and chromium)")
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
                page = _Page(url, args.k) if args.page else None
                for _ in range(args.warmup):
                    client.post(f"/query?k={args.k}", content=body, headers=headers).raise_for_status()
                    searcher.search(args.study, k=args.k)
                    if page is not None:
                        page.upload(args.study)
                http_s, local_s, page_s = [], [], []
                for _ in range(args.n):
                    t = time.perf_counter()
                    response = client.post(f"/query?k={args.k}", content=body, headers=headers)
                    http_s.append(time.perf_counter() - t)
                    response.raise_for_status()
                    t = time.perf_counter()
                    searcher.search(args.study, k=args.k)
                    local_s.append(time.perf_counter() - t)
                    if page is not None:
                        page_s.append(page.upload(args.study))
                preset_ms = page.preset_ms() if page is not None else None
                if page is not None:
                    page.close()
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
    if page_s:
        png_ms, png_bytes = _png_per_preset_ms(args.study)
        record.update({
            "page_median_ms": round(1000 * float(np.median(page_s)), 1),
            "page_p90_ms": round(1000 * float(np.percentile(page_s, 90)), 1),
            "preset_in_browser_ms": round(float(preset_ms or 0.0), 2),
            "preset_png_on_service_ms": round(png_ms, 2),
            "preset_png_bytes": png_bytes,
        })
    print(f"medsearch serve ({record['runtime']} runtime), one CT slice of {len(body) / 1e6:.2f} MB, k = {args.k}, "
          f"nproc = {record['nproc']}")
    print(f"  ready after {record['ready_s']} s (process start, imports, index and encoder load, warm-up)")
    print(f"  HTTP round trip: median {record['http_median_ms']} ms, p90 {record['http_p90_ms']} ms over {args.n}")
    print(f"  the same query in-process (Searcher.search): median {record['in_process_median_ms']} ms")
    if page_s:
        print(f"  the web page, upload to results drawn (Chromium): median {record['page_median_ms']} ms, "
              f"p90 {record['page_p90_ms']} ms over {args.n}")
        print(f"  a window preset, drawn in the browser: {record['preset_in_browser_ms']} ms; "
              f"rendered on the service instead: {record['preset_png_on_service_ms']} ms and a "
              f"{record['preset_png_bytes'] / 1e3:.0f} kB PNG per preset, plus a round trip")
    if args.json:
        args.json.write_text(json.dumps([record], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
