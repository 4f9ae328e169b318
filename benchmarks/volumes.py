"""Volumes and regions: slab localisation, the cost of re-ranking, and pooled vs re-ranked vs tri-planar.

Four parts, each its own run (``--part``), each well under 15 minutes on a 2-core machine:

``localise``
    Index every series of ``../shared/data/dicom`` (slices every ``--spacing`` mm, slice vectors
    kept; a link table maps each case back to its files). From each series of at least
    ``--min-depth`` slices, cut slabs of ``--slab`` slices at evenly spaced starts, add Gaussian
    noise (``--noise`` times the series' 1st-99th percentile range) and shift them in-plane by
    ``--shift`` of the image width (zero filled), and query the index with each slab. A slab
    succeeds when the first result is its own series (or an exact pixel copy of it, which the
    index counts once) and the match location (``best_slice - query_slice``, in stack slices)
    lands within ``--tolerance`` slices of where the slab was cut. Scored for the case-vector
    ranking (locations computed for its results), for the re-ranked one and, with ``--crop-grid``,
    re-ranked in layout (each slice whole and tile by tile). Exact pixel copies of a series are cut
    once (their slabs would be the same queries again); ``--keep-copies`` cuts every copy.
``roi``
    Index every case of ``../shared/data/dicom`` with ``--crop-grid`` (0: no crop vectors). From
    each series of at least ``--min-depth`` slices (``--per-series`` slices) and every
    ``--single-every``-th single image, cut one slice with noise and a shift, and query the index
    with ``--boxes`` seeded boxes of ``--box`` times the shorter side on it (``--roi``); exact
    copies of a series are cut once, as for ``localise`` (``--keep-copies``: every copy). A box is
    located when its own case comes first with the best slice within ``--tolerance`` of the one cut,
    and in the tile when the matched tile (``best_box``) holds the box's centre.
``cost``
    Median time of the search stage for k = 10 (``Searcher.search_vector``: case-vector search,
    exclusions, metadata) with and without re-ranking 100 candidates, interleaved, on the index of
    ``localise`` (real slices) and on a synthetic index of ``--synthetic-cases`` cases of
    ``--synthetic-slices`` slices (the worst case: every slice kept, dim 1280); and the median
    end-to-end query (decode, encode, search) of a real series, both ways. With ``--crop-grid``
    also a box and a slab in layout (its search stage and whole query against slice vectors alone),
    and the indexing time with and without tiles.
``vessel``
    ``medsearch evaluate`` on ``vesselmnist3d.npz`` (MedMNIST-3D format, 28^3, test vs train,
    ``--protocol mahbod2024``): axial slices pooled, the same re-ranked, and tri-planar pooled;
    ``--mode ct3d``: the native 3D CT encoder of the ``ct3d`` preset on whole volumes resized to
    ``--volume-side``^3 against the 2D default on ``--slices`` axial slices pooled, paired on the
    same queries (needs ``pip install "medsearch[ct3d]"``). ``--resample 64`` first resamples every
    volume to 64^3 (trilinear), the size of the issue's held-out 3D sets; those are made from their
    sources at that size, so they are sharper than a resampled 28^3 volume.

Usage::

    nice -n 10 .venv/bin/python benchmarks/volumes.py --part localise --json localise.json
    nice -n 5 .venv/bin/python benchmarks/volumes.py --part roi --crop-grid 2 --json roi2.json
    nice -n 10 .venv/bin/python benchmarks/volumes.py --part cost --json cost.json
    nice -n 10 .venv/bin/python benchmarks/volumes.py --part vessel --slices 5 --json vessel5.json
    nice -n 10 .venv/bin/python benchmarks/volumes.py --part vessel --mode triplanar --json tri.json
    nice -n 10 .venv/bin/python benchmarks/volumes.py --part vessel --mode ct3d --json ct3d.json
    nice -n 10 .venv/bin/python benchmarks/volumes.py --part vessel --resample 64 --json vessel64.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.config import load_config
from medsearch.embedding import Region, SliceSet, embed_slices, pool_slices, query_slices, study_array
from medsearch.evaluate.regions import degraded
from medsearch.io import Volume, find_files, load_volume, scan
from medsearch.search import Searcher, index_info

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEARCH_SHARED_DATA", ROOT.parent / "shared" / "data"))


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "load_1min": os.getloadavg()[0]}


# -- localise -------------------------------------------------------------------------------------


def build(folder: Path, spacing: float, crop_grid: int = 0) -> tuple[Path, dict[str, str]]:
    """The index of ``../shared/data/dicom`` and a map from each case's first file to its case id."""
    from medsearch.indexing import build_index
    from medsearch.sharing import LinkTable

    index = folder / "index"
    links = folder / "links.csv"
    config = load_config("default").replace(preprocess={"slice_spacing_mm": spacing}, index={"crop_grid": crop_grid})
    started = time.perf_counter()
    report = build_index(SHARED / "dicom", index, config=config, links=links, progress=False)
    print(f"indexed {report.n_cases_total} cases in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    table = LinkTable(links)
    owner: dict[str, str] = {}
    from medsearch.store import IndexStore

    for cid in IndexStore.open(index).cases["case_id"]:
        found = table.resolve(cid)
        for f in (found or {}).get("files", []):
            owner[str(Path(f).resolve())] = cid
    return index, owner


def localise(args: argparse.Namespace) -> dict[str, Any]:
    """``medsearch evaluate --regions`` (:func:`~medsearch.evaluate.evaluate_regions`) on the index of
    ``../shared/data/dicom``, its records then also scored against near copies and siblings."""
    from medsearch.evaluate import evaluate_regions

    with tempfile.TemporaryDirectory() as tmp:
        index, owner = build(Path(tmp), args.spacing, args.crop_grid)
        report = evaluate_regions(index, Path(tmp) / "links.csv", slab=args.slab, per_series=args.per_series,
                                  min_depth=args.min_depth, noise=args.noise, shift=args.shift, tolerance=args.tolerance,
                                  keep_copies=args.keep_copies)
        cases = Searcher(index).store.cases
        # a sibling: another series of the same patient with the same geometry (a time point, a
        # diffusion direction, a repeat): the same anatomy on the same grid
        shape = cases.set_index("case_id")[["patient", "rows", "columns", "spacing_mm"]].astype(str).agg("|".join, axis=1).to_dict()
        volumes = {}
        for case in scan(find_files(SHARED / "dicom")).cases:
            cid = owner.get(str(Path(case.files[0]).resolve()))
            if cid is not None:
                volume, _ = load_volume(case)
                if volume.pixels.shape[0] > 1:
                    volumes[cid] = volume
        near = near_copies(volumes)
        records = []
        for r in report.records:
            cid, first, error = r["case_id"], r["first"], r["error_slices"]
            own = r["found"] or first in near.get(cid, ())
            sibling = own or shape.get(first) == shape.get(cid)
            records.append({"series": cid, "depth": r["depth"], "start": r["start"], "ranking": r["ranking"],
                            "own_series_first": bool(own), "strictly_own_first": r["found"], "first": first,
                            "own_or_sibling_first": bool(sibling),
                            "located_on_own_or_sibling": bool(sibling and error is not None and error <= args.tolerance),
                            "error_slices": error, "located": bool(own and error is not None and error <= args.tolerance),
                            "located_in_series": r["located_in_series"], "query_s": r["query_s"]})
        summary = {}
        for ranking in report.summary:
            rows = [r for r in records if r["ranking"] == ranking]
            summary[ranking] = {
                "slabs": len(rows),
                "own_series_first": sum(r["own_series_first"] for r in rows) / max(len(rows), 1),
                "strictly_own_first": sum(r["strictly_own_first"] for r in rows) / max(len(rows), 1),
                "own_or_sibling_first": sum(r["own_or_sibling_first"] for r in rows) / max(len(rows), 1),
                "located_on_own_or_sibling": sum(r["located_on_own_or_sibling"] for r in rows) / max(len(rows), 1),
                "location_within_tolerance_when_own_first": (
                    sum(r["located"] for r in rows) / max(sum(r["own_series_first"] for r in rows), 1)),
                "located_within_tolerance": sum(r["located"] for r in rows) / max(len(rows), 1),
                "located_in_its_series_uid": sum(r["located_in_series"] for r in rows) / max(len(rows), 1),
                "median_query_s": statistics.median(r["query_s"] for r in rows) if rows else None,
            }
        return {"summary": summary, "series": sorted({r["series"] for r in records}),
                "near_copies": {k: sorted(v) for k, v in near.items() if v}, "records": records}


def roi(args: argparse.Namespace) -> dict[str, Any]:
    """Box queries: a box cut from one slice of a case must find its case first, the slice within
    ``--tolerance`` and (with crop vectors) a tile that holds the box's centre."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index, owner = build(Path(tmp), args.spacing, args.crop_grid)
        build_s = time.perf_counter() - t0
        searcher = Searcher(index)
        cases = searcher.store.cases
        copies = cases.set_index("case_id")["pixel_hash"].to_dict() if "pixel_hash" in cases else {}
        volumes = {}
        for case in scan(find_files(SHARED / "dicom")).cases:
            cid = owner.get(str(Path(case.files[0]).resolve()))
            if cid is not None:
                volumes[cid] = load_volume(case)[0]
        near = near_copies({c: v for c, v in volumes.items() if v.pixels.shape[0] > 1})
        singles = sorted(c for c, v in volumes.items() if v.pixels.shape[0] == 1)[:: args.single_every]
        records = []
        cut: set[str] = set()  # the pixel hashes cut: an exact copy's boxes would be the same queries again
        for cid, volume in sorted(volumes.items()):
            depth, height, width = volume.pixels.shape[:3]
            if depth < args.min_depth and cid not in singles:
                continue
            digest = copies.get(cid)
            if not args.keep_copies and isinstance(digest, str) and digest:
                if digest in cut:
                    continue
                cut.add(digest)
            picks = np.unique(np.linspace(2, depth - 3, args.per_series).round().astype(int)) if depth > 1 else np.array([0])
            for s in picks.tolist():
                rng = np.random.default_rng(1000 + s)
                side = max(8, int(round(args.box * min(height, width))))
                for b in range(args.boxes):
                    x0 = int(rng.integers(int(0.1 * width), int(0.9 * width) - side))
                    y0 = int(rng.integers(int(0.1 * height), int(0.9 * height) - side))
                    query = degraded(volume, s, 1, noise=args.noise, shift=args.shift, seed=s * 10 + b)
                    step = max(1, int(round(args.shift * width))) if args.shift > 0 else 0
                    # the query's content moved down and left by step: its box shows the original's box up and right
                    cx, cy = x0 + side / 2 + step, y0 + side / 2 - step
                    started = time.perf_counter()
                    result = searcher.search("box", volume=query, k=5, roi=(x0, y0, x0 + side, y0 + side))
                    elapsed = time.perf_counter() - started
                    top = result.results[0]
                    own = (top.case_id == cid or top.case_id in near.get(cid, ())
                           or bool(copies.get(top.case_id) and copies.get(top.case_id) == copies.get(cid)))
                    place = top.location or {}
                    error = abs(int(place.get("best_slice", 0)) - s) if depth > 1 else 0
                    box = place.get("best_box")
                    inside = box is not None and box[0] <= cx < box[2] and box[1] <= cy < box[3]
                    records.append({"case": cid, "depth": depth, "slice": s, "box": [x0, y0, x0 + side, y0 + side],
                                    "first": top.case_id, "own_first": bool(own), "slice_error": error,
                                    "best_box": box, "centre_in_box": bool(inside),
                                    "located": bool(own and error <= args.tolerance), "query_s": elapsed})
        def share(key: str, rows: list[dict[str, Any]]) -> float:
            return sum(bool(r[key]) for r in rows) / max(len(rows), 1)
        summary = {}
        for name, rows in (("all", records), ("series", [r for r in records if r["depth"] > 1]),
                           ("single images", [r for r in records if r["depth"] == 1])):
            summary[name] = {"queries": len(rows), "own_first": share("own_first", rows), "located": share("located", rows),
                             "centre_in_matched_tile": share("centre_in_box", rows),
                             "located_and_in_tile": sum(r["located"] and r["centre_in_box"] for r in rows) / max(len(rows), 1)}
        summary["median_query_s"] = statistics.median(r["query_s"] for r in records) if records else None
        summary["build_s"] = build_s
        info = index_info(index)
        summary["crop_vectors"], summary["slice_vectors"] = info["crop_vectors"], info["slice_vectors"]
        return {"summary": summary, "records": records}


def near_copies(volumes: dict[str, Volume], threshold: float = 0.02) -> dict[str, set[str]]:
    """Series whose pixels are another's within ``threshold`` of its 1st-99th percentile range on
    average (the same images stored again, e.g. through a lossy transfer syntax): counted as the
    query's own series, since nothing in the pixels tells them apart."""
    out: dict[str, set[str]] = {cid: set() for cid in volumes}
    items = list(volumes.items())
    for i, (a, va) in enumerate(items):
        low, high = np.percentile(va.pixels, [1, 99])
        for b, vb in items[i + 1:]:
            if va.pixels.shape != vb.pixels.shape:
                continue
            diff = float(np.mean(np.abs(va.pixels - vb.pixels))) / max(float(high - low), 1e-6)
            if diff < threshold:
                out[a].add(b)
                out[b].add(a)
    return out


# -- cost -----------------------------------------------------------------------------------------


def interleaved(a: Any, b: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of ``a()`` and ``b()``, interleaved, alternating which goes first."""
    ta, tb = [], []
    for i in range(repeats):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def synthetic_index(folder: Path, n: int, slices: int, dim: int, seed: int = 0) -> Path:
    """An index of ``n`` cases with ``slices`` slice vectors each (random unit vectors), flat search."""
    import pandas as pd

    from medsearch.store import IndexStore

    rng = np.random.default_rng(seed)
    store = IndexStore.create(folder, dim=dim, encoder={"name": "synthetic", "dim": dim}, preprocess={})
    sets, vectors = [], []
    for _ in range(n):
        v = rng.standard_normal((slices, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        sets.append(SliceSet(v.astype(np.float16), np.arange(slices, dtype=np.int32), 5.0))
        vectors.append(pool_slices(v))
    store.add(np.stack(vectors), pd.DataFrame({"case_id": [f"c{i}" for i in range(n)]}), slices=sets)
    store.commit()
    return folder


def cost(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        index, _ = build(Path(tmp), args.spacing, args.crop_grid)
        searcher = Searcher(index)
        case = next(c for c in scan(find_files(SHARED / "dicom" / "ct-head-ge-gantry-tilt")).cases)
        volume, _ = load_volume(case)
        query = embed_slices(volume, searcher.encoder, searcher.config)
        assert query is not None
        vector = pool_slices(query.vectors)
        pooled, late = interleaved(lambda: searcher.search_vector(vector, k=10, slices=query, rerank=False),
                                   lambda: searcher.search_vector(vector, k=10, slices=query, rerank=True), args.repeats)
        out["real_index_search_stage"] = {"cases": len(searcher.store), "query_slices": len(query),
                                          "stored_slices": searcher.store.slices.n_slices if searcher.store.slices else 0,
                                          "pooled_ms": pooled * 1e3, "reranked_ms": late * 1e3, "ratio": late / pooled}
        if searcher.store.crops is not None:  # a box on the middle slice, against slices and tiles
            box = embed_slices(volume, searcher.encoder, searcher.config, Region.parse(roi=(300, 150, 400, 250)))
            assert box is not None and box.cropped
            box_vector = pool_slices(box.vectors)
            pooled, late = interleaved(lambda: searcher.search_vector(box_vector, k=10, slices=box, rerank=False),
                                       lambda: searcher.search_vector(box_vector, k=10, slices=box, rerank=True), args.repeats)
            out["box_search_stage"] = {"crop_grid": args.crop_grid, "stored_tiles": searcher.store.crops.n_slices,
                                       "pooled_ms": pooled * 1e3, "reranked_ms": late * 1e3, "ratio": late / pooled}
            folder = SHARED / "dicom" / "ct-head-ge-gantry-tilt"
            pooled, late = interleaved(lambda: searcher.search(folder, k=10, roi=(300, 150, 400, 250), rerank=False),
                                       lambda: searcher.search(folder, k=10, roi=(300, 150, 400, 250), rerank=True),
                                       max(3, args.repeats // 10))
            out["box_end_to_end"] = {"pooled_s": pooled, "reranked_s": late, "ratio": late / pooled}
            out["slab_in_layout"] = slab_in_layout(searcher, volume, folder, args.repeats)
            out["tiles_against_none"] = tiles_against_none(Path(tmp), args, searcher, folder)
        folder = SHARED / "dicom" / "ct-head-ge-gantry-tilt"
        pooled, late = interleaved(lambda: searcher.search(folder, k=10, rerank=False),
                                   lambda: searcher.search(folder, k=10, rerank=True), max(3, args.repeats // 10))
        out["real_index_end_to_end"] = {"pooled_s": pooled, "reranked_s": late, "ratio": late / pooled}
        synthetic = synthetic_index(Path(tmp) / "synthetic", args.synthetic_cases, args.synthetic_slices, 1280)
        searcher = Searcher.__new__(Searcher)  # a store without an encoder: the search stage only
        from medsearch.store import IndexStore

        searcher.store = IndexStore.open(synthetic)
        rng = np.random.default_rng(1)
        q = rng.standard_normal((args.synthetic_slices, 1280), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        sq = SliceSet(q, np.arange(len(q), dtype=np.int32), 5.0)
        qv = pool_slices(q)
        pooled, late = interleaved(lambda: searcher.search_vector(qv, k=10, slices=sq, rerank=False),
                                   lambda: searcher.search_vector(qv, k=10, slices=sq, rerank=True), args.repeats)
        out["synthetic_search_stage"] = {"cases": args.synthetic_cases, "slices_per_case": args.synthetic_slices,
                                         "query_slices": len(q), "pooled_ms": pooled * 1e3, "reranked_ms": late * 1e3,
                                         "ratio": late / pooled, "rerank_added_ms": (late - pooled) * 1e3}
    return out


def slab_in_layout(searcher: Searcher, volume: Volume, folder: Path, repeats: int) -> dict[str, Any]:
    """A slab of the head CT (slices 10:18) matched in layout against by slice vectors alone: the
    search stage of each (interleaved, and each against the pooled search in its own pairs), and the
    whole slab query (decode, encode with or without the tiles, search), interleaved."""
    region = Region.parse(slices="10:18")
    sets = {}
    for layout in (False, True):
        seen = study_array(volume, searcher.encoder.info, searcher.config, region, layout)
        pooled_rows, sets[layout] = query_slices(searcher.encoder.embed(seen.images), seen.slice_indices, volume.gap_mm,
                                                 tiles=seen.tiles)
    vector = pool_slices(pooled_rows)
    plain_set, tiled_set = sets[False], sets[True]
    assert plain_set is not None and tiled_set is not None and tiled_set.tiles is not None
    plain, tiled = interleaved(lambda: searcher.search_vector(vector, k=10, slices=plain_set, rerank=True),
                               lambda: searcher.search_vector(vector, k=10, slices=tiled_set, rerank=True), repeats)
    pooled, tiled_again = interleaved(lambda: searcher.search_vector(vector, k=10, slices=plain_set, rerank=False),
                                      lambda: searcher.search_vector(vector, k=10, slices=tiled_set, rerank=True), repeats)
    whole_plain, whole_tiled = interleaved(lambda: searcher.search(folder, k=10, slices="10:18", layout=False),
                                           lambda: searcher.search(folder, k=10, slices="10:18", layout=True), max(3, repeats // 10))
    return {"query_slices": len(tiled_set), "tiles_per_slice": int(tiled_set.tiles.shape[1]),
            "search_stage_ms": {"re-ranked": plain * 1e3, "in layout": tiled * 1e3, "ratio": tiled / plain},
            "search_stage_against_pooled_ms": {"pooled": pooled * 1e3, "in layout": tiled_again * 1e3, "ratio": tiled_again / pooled},
            "whole_query_s": {"re-ranked": whole_plain, "in layout": whole_tiled, "ratio": whole_tiled / whole_plain}}


def tiles_against_none(folder: Path, args: argparse.Namespace, tiled: Searcher, study: Path) -> dict[str, Any]:
    """What crop vectors cost, in one run: whole-index builds with and without tiles, alternating
    (a first pair to warm the file cache, then three), and the whole box query on each index,
    interleaved (re-ranked, as a box query is by default)."""
    builds: dict[int, list[float]] = {0: [], args.crop_grid: []}
    for rep in range(4):
        for grid in builds:
            started = time.perf_counter()
            build(folder / f"build-{grid}-{rep}", args.spacing, grid)
            builds[grid].append(time.perf_counter() - started)
    plain = Searcher(folder / "build-0-0" / "index")
    box = (300, 150, 400, 250)
    without, with_tiles = interleaved(lambda: plain.search(study, k=10, roi=box), lambda: tiled.search(study, k=10, roi=box),
                                      max(3, args.repeats // 4))
    build_without, build_with = statistics.median(builds[0][1:]), statistics.median(builds[args.crop_grid][1:])
    return {"build_s": builds, "build_median_s": [build_without, build_with], "build_ratio": build_with / build_without,
            "box_query_s": [without, with_tiles], "box_query_ratio": with_tiles / without}


# -- vessel ---------------------------------------------------------------------------------------


def vessel(args: argparse.Namespace) -> dict[str, Any]:
    from medsearch.evaluate import evaluate_npz

    encoders = None
    if args.mode == "ct3d":
        # The preset's CT window does not apply to these MRA volumes (percentiles, as for the 2D run).
        shape = [args.volume_side] * 3
        config = load_config("ct3d").replace(encoder={"volume_shape": shape, "batch_size": 8},
                                              preprocess={"slices": args.slices})
        encoders = ["efficientnet-lite0", config.encoder.name]
    else:
        config = load_config("default").replace(preprocess={"slices": args.slices, "slice_mode": args.mode})
    started = time.perf_counter()
    data = SHARED / "medmnist" / "vesselmnist3d.npz"
    with tempfile.TemporaryDirectory() as tmp:
        if args.resample:
            data = resampled(data, args.resample, Path(tmp))
            print(f"resampled to {args.resample}^3 in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        report = evaluate_npz(data, protocol="mahbod2024", config=config, encoders=encoders, limit=args.limit,
                              rerank=args.mode == "axial", n_resamples=1000, batch_size=64)
    runs = []
    for result in report.results:
        runs.append({"name": result.name, "mode": args.mode, "slices": args.slices, "side": args.resample or 28,
                     "volume_shape": list(config.encoder.volume_shape) if result.name.endswith("ct3d") else None,
                     "metrics": {k: result.metrics[k] for k in ("hit@1", "map_hits@5", "mmv@5")},
                     "ci95": {k: result.ci95.get(k) for k in ("hit@1", "map_hits@5", "mmv@5")},
                     "n_queries": result.n_queries, "encode_s": result.timings.get("encode_s")})
    return {"runs": runs, "comparisons": report.comparisons, "wall_s": time.perf_counter() - started}


def resampled(path: Path, side: int, folder: Path) -> Path:
    """The MedMNIST-3D file at ``path`` with every volume resampled to ``side``^3 (trilinear), in ``folder``."""
    from scipy import ndimage

    out: dict[str, np.ndarray] = {}
    with np.load(path) as data:
        for key in data.files:
            values = data[key]
            if key.endswith("_images"):
                values = np.stack([
                    np.clip(ndimage.zoom(v.astype(np.float32), [side / n for n in v.shape], order=1), 0, 255).round().astype(np.uint8)
                    for v in values
                ])
            out[key] = values
    target = folder / f"{path.stem}_{side}.npz"
    np.savez(target, **out)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("localise", "roi", "cost", "vessel"), required=True)
    parser.add_argument("--spacing", type=float, default=5.0, help="slice density of the index, mm")
    parser.add_argument("--slab", type=int, default=8)
    parser.add_argument("--per-series", type=int, default=6, help="slabs cut from each series")
    parser.add_argument("--min-depth", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--shift", type=float, default=0.03)
    parser.add_argument("--tolerance", type=int, default=2)
    parser.add_argument("--keep-copies", action="store_true", help="localise, roi: cut from every exact copy of a series too")
    parser.add_argument("--crop-grid", type=int, default=0, help="localise, roi, cost: the index's crop_grid (0: no crop vectors; localise then scores no layout)")
    parser.add_argument("--box", type=float, default=0.25, help="roi: the box side, a fraction of the image's shorter side")
    parser.add_argument("--boxes", type=int, default=2, help="roi: boxes per query slice")
    parser.add_argument("--single-every", type=int, default=5, help="roi: every Nth single-image case is queried")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--synthetic-cases", type=int, default=1000)
    parser.add_argument("--synthetic-slices", type=int, default=64)
    parser.add_argument("--slices", type=int, default=5, help="vessel: axial slices per volume")
    parser.add_argument("--mode", choices=("axial", "triplanar", "ct3d"), default="axial")
    parser.add_argument("--volume-side", type=int, default=32, help="vessel --mode ct3d: volumes resized to this cube")
    parser.add_argument("--limit", type=int, default=None, help="vessel: a seeded subset of this many test queries")
    parser.add_argument("--resample", type=int, default=0, help="vessel: resample every volume to this cube first (0: as stored, 28^3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.resample and not 8 <= args.resample <= 256:
        parser.error(f"--resample {args.resample}: give a cube side from 8 to 256 (64 for the held-out sets' size), or 0")
    started = time.perf_counter()
    result = {"localise": localise, "roi": roi, "cost": cost, "vessel": vessel}[args.part](args)
    result = {"part": args.part, "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
              "wall_s": time.perf_counter() - started, **result}
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    summary = {k: v for k, v in result.items() if k != "records"}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
