"""Region localisation: does a slab cut from a series of the index find that series, and where it was cut?

:func:`evaluate_regions` measures what a region query (``medsearch query --slices``) is worth on an
index's own series. Each series of at least ``min_depth`` slices is read back from its files (the
link table ``index --links`` wrote), and ``per_series`` slabs of ``slab`` slices are cut from it at
evenly spaced starts, degraded as a second acquisition would be (:func:`degraded`: Gaussian noise
and an in-plane shift), and searched as studies of their own, ranked by case vector and re-ranked
by slice vectors (:mod:`medsearch.rerank`), and on an index that keeps tiles (``crop_grid``) also
re-ranked in layout (each slice whole and tile by tile, as a slab query is by default). A slab is **found** when the first result is its own
series (or a copy of the same pixels, which the index counts once), and **located** when it is
found and the result's match (``best_slice - query_slice``) lies within ``tolerance`` slices of
where it was cut. **Located in its series** counts a first result of the same Series Instance UID
(the link table's) as found too: the index keeps each time point of a multi-volume series (an fMRI
run, a diffusion series) as a case of its own, and a slab of one time point that lands on the
same place of another has found its series, in DICOM's sense.

A series stored again with the same pixels (another transfer syntax, a second import) is cut once:
its slabs, with the same seeds, would be the same queries again, and would weigh one series as
several (``keep_copies`` cuts every copy). The copies left out are in the report, with the case
cut for them.

The slabs never leave this process and nothing is written but the report; the report names cases
by their pseudonymous case ids only.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # plain text bars, as the other runners

from medsearch.errors import ConfigError
from medsearch.io import Volume, load_volume, scan
from medsearch.search import Searcher
from medsearch.sharing import LinkTable

__all__ = ["RANKINGS", "RegionReport", "degraded", "evaluate_regions"]

#: The rankings scored: the case vector alone, re-ranked by slice vectors, and (on an index that
#: keeps tiles) re-ranked in layout.
RANKINGS = ("case vector", "re-ranked", "re-ranked in layout")
#: How each ranking searches: ``rerank`` and ``layout`` of :meth:`~medsearch.search.Searcher.search`.
_SEARCH = {"case vector": (False, False), "re-ranked": (True, False), "re-ranked in layout": (True, True)}


def degraded(volume: Volume, start: int, length: int, *, noise: float, shift: float, seed: int) -> Volume:
    """Slices ``start:start + length`` of ``volume`` as a new study: Gaussian noise of ``noise`` times
    the slab's 1st-99th percentile range, and its content moved ``shift`` of the width down and to
    the left (the edges filled with the slab's minimum)."""
    rng = np.random.default_rng(seed)
    slab = np.array(volume.pixels[start:start + length], dtype=np.float32)
    low, high = np.percentile(slab, [1, 99])
    slab += rng.normal(0.0, noise * max(float(high - low), 1e-6), slab.shape).astype(np.float32)
    step = max(1, int(round(shift * slab.shape[2]))) if shift > 0 else 0
    slab = np.roll(slab, (step, -step), axis=(1, 2))
    if step:
        fill = float(slab.min())
        slab[:, :step] = fill
        slab[:, :, -step:] = fill
    return Volume(slab, volume.spacing, volume.modality, volume.rgb, window=volume.window, z_known=volume.z_known)


@dataclass
class RegionReport:
    """What :func:`evaluate_regions` found: a summary per ranking, one record per slab and ranking,
    and the series left out (with why)."""

    index: str
    settings: dict[str, Any]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "settings": self.settings, "summary": self.summary, "records": self.records,
                "left_out": self.left_out, "seconds": round(self.seconds, 2)}

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def evaluate_regions(
    index: str | Path,
    links: str | Path,
    *,
    slab: int = 8,
    per_series: int = 6,
    min_depth: int = 16,
    noise: float = 0.03,
    shift: float = 0.03,
    tolerance: int = 2,
    k: int = 5,
    limit: int | None = None,
    seed: int = 0,
    keep_copies: bool = False,
    progress: bool = False,
) -> RegionReport:
    """Slab localisation on the series of ``index`` (see the module docstring).

    Parameters
    ----------
    index, links
        The index, and the link table its ``medsearch index --links`` run wrote (to read each
        series back from its files).
    slab, per_series, min_depth
        Slices per slab, slabs per series, and the fewest slices a series needs to be cut.
    noise, shift
        The degradation (:func:`degraded`).
    tolerance
        How many slices off a location may be and still count.
    limit, seed
        At most ``limit`` series, a seeded sample.
    keep_copies
        Cut every exact copy of a series too (by default each distinct series once).
    progress
        A progress bar over the series (on stderr).

    Raises
    ------
    ConfigError
        Settings out of range, an index without slice vectors, or no series to cut.
    """
    if slab < 1 or per_series < 1 or tolerance < 0 or min_depth < slab:
        raise ConfigError(
            f"slab {slab}, per_series {per_series}, tolerance {tolerance}, min_depth {min_depth}: give a slab and "
            "slabs per series of at least 1, a tolerance of at least 0, and min_depth at least the slab"
        )
    started = time.perf_counter()
    searcher = Searcher(index)
    if searcher.store.slices is None:
        raise ConfigError(f"{index} keeps no slice vectors (built before they were kept); rebuild it to evaluate regions")
    table = LinkTable(links)
    cases = searcher.store.cases
    hashes = cases.set_index("case_id")["pixel_hash"].to_dict() if "pixel_hash" in cases else {}
    depths = cases.set_index("case_id")["n_slices"].to_dict() if "n_slices" in cases else {}
    report = RegionReport(str(index), {"slab": slab, "per_series": per_series, "min_depth": min_depth, "noise": noise,
                                       "shift": shift, "tolerance": tolerance, "k": k, "limit": limit, "seed": seed,
                                       "keep_copies": keep_copies})
    rankings = RANKINGS if searcher.store.crops is not None else RANKINGS[:2]
    candidates = sorted(cid for cid in cases["case_id"] if int(depths.get(cid, 0) or 0) >= min_depth)
    if limit is not None and len(candidates) > limit:
        candidates = sorted(np.random.default_rng(seed).choice(candidates, size=limit, replace=False).tolist())
    cut: dict[str, str] = {}  # pixel hash -> the case whose slabs were cut
    for cid in tqdm(candidates, desc="cutting slabs from series", unit="series", disable=not progress, leave=False):
        digest = hashes.get(cid)
        digest = digest if isinstance(digest, str) and digest and not keep_copies else None
        if digest is not None and digest in cut:
            report.left_out[cid] = f"the same pixels as {cut[digest]}, whose slabs were cut (--keep-copies cuts every copy)"
            continue
        volume, why = _read_back(table, cid)
        if volume is None:
            report.left_out[cid] = why
            continue
        depth = int(volume.pixels.shape[0])
        if depth < min_depth:
            report.left_out[cid] = f"{depth} slices read back, fewer than {min_depth}"
            continue
        if digest is not None:
            cut[digest] = cid
        series = _series_of(table, cid)
        for start in np.unique(np.linspace(0, depth - slab, per_series).round().astype(int)).tolist():
            query = degraded(volume, start, slab, noise=noise, shift=shift, seed=seed * 1000 + start)
            for ranking in rankings:
                t0 = time.perf_counter()
                rerank, layout = _SEARCH[ranking]
                result = searcher.search("slab", volume=query, k=k, rerank=rerank, layout=layout)
                elapsed = time.perf_counter() - t0
                top = result.results[0] if result.results else None
                first = top.case_id if top is not None else None
                found = first == cid or bool(first and hashes.get(first) and hashes.get(first) == hashes.get(cid))
                place = top.location if top is not None else None
                error = None if place is None else abs(place["best_slice"] - place["query_slice"] - start)
                near = error is not None and error <= tolerance
                in_series = found or bool(first and series and _series_of(table, first) == series)
                report.records.append({"case_id": cid, "depth": depth, "start": start, "ranking": ranking, "first": first,
                                       "found": found, "error_slices": error, "located": bool(found and near),
                                       "located_in_series": bool(in_series and near), "query_s": round(elapsed, 4)})
    if not report.records:
        why = f"no series of {min_depth} slices or more could be read back through {links}"
        raise ConfigError(why + (f" ({len(report.left_out)} left out: see the report)" if report.left_out else ""))
    for ranking in rankings:
        rows = [r for r in report.records if r["ranking"] == ranking]
        found = [r for r in rows if r["found"]]
        report.summary[ranking] = {
            "slabs": len(rows),
            "series": len({r["case_id"] for r in rows}),
            "found": _share(len(found), len(rows)),
            "located": _share(sum(r["located"] for r in rows), len(rows)),
            "located_when_found": _share(sum(r["located"] for r in found), len(found)),
            "located_in_series": _share(sum(r["located_in_series"] for r in rows), len(rows)),
            "median_query_s": round(statistics.median(r["query_s"] for r in rows), 4),
        }
    report.seconds = time.perf_counter() - started
    return report


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _series_of(table: LinkTable, case_id: str) -> str:
    """A case's Series Instance UID in the link table ("" when unknown); compared, never reported."""
    return str((table.resolve(case_id) or {}).get("series_instance_uid") or "")


def _read_back(table: LinkTable, case_id: str) -> tuple[Volume | None, str]:
    """A case's volume from its files, or None and why not."""
    source = table.resolve(case_id)
    files = [Path(f) for f in (source or {}).get("files", [])]
    if not files:
        return None, "not in the link table (or indexed from a DICOMweb server)"
    present = [f for f in files if f.is_file()]
    if len(present) < len(files):
        return None, f"{len(files) - len(present)} of its {len(files)} files are gone"
    try:
        found = scan(present)
        if len(found.cases) != 1:
            return None, f"its files hold {len(found.cases)} series, not one"
        volume, _ = load_volume(found.cases[0])
    except Exception as exc:  # noqa: BLE001 - one series that no longer reads costs that series only
        # the type only: a decoder's message may quote a file name, which may name a patient
        return None, f"its files could not be read back ({type(exc).__name__})"
    return volume, ""
