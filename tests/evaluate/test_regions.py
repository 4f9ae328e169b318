"""medsearch.evaluate.regions: slabs cut from an index's own series, found and located, through the
API and ``medsearch evaluate --regions``; what cannot be read back is left out with why."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.errors import ConfigError
from medsearch.evaluate import evaluate_regions
from medsearch.evaluate.regions import degraded
from medsearch.io import Volume


def test_slabs_of_the_phantom_series_are_found_and_located(phantom_index):
    _, index = phantom_index
    # the slabs as stored (no noise, no shift): every one is its own series' exact slices
    report = evaluate_regions(index, index.parent / "links.csv", slab=8, per_series=3, noise=0.0, shift=0.0)
    reranked = report.summary["re-ranked"]
    assert reranked["series"] == 3 and reranked["slabs"] == 9  # three 24-slice series, three slabs each
    assert reranked["found"] == 1.0 and reranked["located"] == 1.0
    assert {r["start"] for r in report.records} == {0, 8, 16}
    assert all(r["error_slices"] == 0 for r in report.records if r["ranking"] == "re-ranked")
    assert set(report.summary) == {"case vector", "re-ranked"} and not report.left_out
    # degraded, the three phantoms are alike: the counts stay consistent with the records
    noisy = evaluate_regions(index, index.parent / "links.csv", slab=8, per_series=3)
    rows = [r for r in noisy.records if r["ranking"] == "re-ranked"]
    assert noisy.summary["re-ranked"]["found"] == pytest.approx(sum(r["found"] for r in rows) / 9, abs=1e-4)
    assert all(r["found"] or not r["located"] for r in noisy.records)


def test_a_series_whose_files_are_gone_is_left_out_with_why(phantom_index, tmp_path):
    _, index = phantom_index
    with open(index.parent / "links.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows[0]["files"] = str(tmp_path / "gone.dcm")
    links = tmp_path / "links.csv"
    with open(links, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = evaluate_regions(index, links, per_series=2)
    assert report.left_out == {rows[0]["case_id"]: "1 of its 1 files are gone"}
    assert report.summary["re-ranked"]["series"] == 2


def test_settings_out_of_range_and_nothing_to_cut_are_one_line(phantom_index, tmp_path):
    _, index = phantom_index
    with pytest.raises(ConfigError, match="min_depth at least the slab"):
        evaluate_regions(index, index.parent / "links.csv", slab=30)
    empty = tmp_path / "links.csv"
    empty.write_text((index.parent / "links.csv").read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no series of 16 slices or more could be read back"):
        evaluate_regions(index, empty)


def test_a_degraded_slab_is_noisy_and_shifted():
    pixels = np.zeros((10, 40, 40), np.float32)
    pixels[:, 10:20, 10:20] = 100.0
    volume = Volume(pixels, (2.0, 1.0, 1.0), "CT", False, z_known=True)
    slab = degraded(volume, 2, 4, noise=0.0, shift=0.05, seed=0)
    assert slab.pixels.shape == (4, 40, 40) and slab.spacing == volume.spacing
    assert slab.pixels[0, 12, 8] == 100.0 and slab.pixels[0, 10, 18] == 0.0  # moved 2 px down and 2 px left
    noisy = degraded(volume, 0, 2, noise=0.03, shift=0.0, seed=1)
    assert 0 < float(np.abs(noisy.pixels - pixels[:2]).mean()) < 3.0


def test_the_cli_prints_the_table_and_writes_the_report(phantom_index, tmp_path):
    _, index = phantom_index
    out = tmp_path / "regions.json"
    run = CliRunner().invoke(app, ["evaluate", "--index", str(index), "--regions", str(index.parent / "links.csv"),
                                   "--slab", "6", "--limit", "2", "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "region localisation" in run.stdout and "re-ranked" in run.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["slab"] == 6 and data["summary"]["re-ranked"]["series"] == 2
    assert "/" not in json.dumps(data["records"])  # case ids, never file paths
    bad = CliRunner().invoke(app, ["evaluate", "--regions", str(index.parent / "links.csv")])
    assert bad.exit_code == 2 and "--regions LINKS goes with --index DIR alone" in bad.output


def test_an_exact_copy_of_a_series_is_cut_once(tmp_path):
    """A series stored again with the same pixels gives the same slabs again: cut once, the copy left
    out with the case cut for it; keep_copies cuts both, each finding either copy."""
    from series import phantom, write_series

    from medsearch.config import load_config
    from medsearch.indexing import build_index

    archive = tmp_path / "archive"
    write_series(archive / "s0", phantom(0), seed=0)
    write_series(archive / "s1", phantom(1), seed=1)
    write_series(archive / "again", phantom(0), seed=7)  # s0's pixels under other UIDs
    index, links = tmp_path / "index", tmp_path / "links.csv"
    build_index(archive, index, config=load_config("default").replace(preprocess={"slice_spacing_mm": 2.5}), links=links)
    report = evaluate_regions(index, links, per_series=2, noise=0.0, shift=0.0)
    assert report.summary["re-ranked"]["series"] == 2 and len(report.left_out) == 1
    (copy, why), = report.left_out.items()
    kept = {r["case_id"] for r in report.records}
    assert copy not in kept and len(kept) == 2
    assert why.startswith("the same pixels as ") and why.split(" as ")[1].split(",")[0] in kept
    every = evaluate_regions(index, links, per_series=2, noise=0.0, shift=0.0, keep_copies=True)
    assert every.summary["re-ranked"]["series"] == 3 and not every.left_out and every.summary["re-ranked"]["found"] == 1.0
    result = CliRunner().invoke(app, ["evaluate", "--index", str(index), "--regions", str(links), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"left out {copy}: the same pixels as" in result.output


def test_slabs_in_layout_tell_apart_the_epi_series_of_one_head(shared_dicom, tmp_path):
    """The real Siemens EPI series of one head (``mr-siemens-mosaic`` and a 35-slice volume of
    ``mr-siemens-transfer-syntaxes``), indexed with tiles: slice vectors alone confuse them; matched
    in layout, a slab finds its own series far more often (docs/benchmarks/volumes.md)."""
    from medsearch.config import load_config
    from medsearch.indexing import build_index

    config = load_config("default").replace(preprocess={"slice_spacing_mm": 5.0}, index={"crop_grid": 2})
    for part in ("mr-siemens-mosaic", "mr-siemens-transfer-syntaxes/In/7.dcm"):
        build_index(shared_dicom / part, tmp_path / "index", config=config, links=tmp_path / "links.csv", progress=False)
    report = evaluate_regions(tmp_path / "index", tmp_path / "links.csv")
    plain, layout = report.summary["re-ranked"], report.summary["re-ranked in layout"]
    assert plain["series"] == layout["series"] == 7 and plain["slabs"] == layout["slabs"] == 42
    assert plain["found"] < 0.7 and layout["found"] >= plain["found"] + 0.2 and layout["located"] >= 0.8
