"""Indexing from a real Orthanc: the same index as from the files, incremental, resumable after kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from pacs.orthanc import Orthanc
from pacs.proxy import Proxy
from pacs.studies import new_studies, one_series, sample_files

from medsearch.errors import ConfigError
from medsearch.indexing import build_index
from medsearch.store import IndexStore

pytestmark = pytest.mark.slow

# Small real sets of ../shared/data/dicom with what a PACS meets: a mosaic split into parts, multi-frame,
# compressed transfer syntaxes.
SHARED_SETS = ("mr-siemens-mosaic", "mr-enhanced-multiframe", "mr-siemens-transfer-syntaxes")


def _cases(index: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Each case of an index: its vector and its metadata row (NaN as None, so that rows compare)."""
    store = IndexStore.open(index)
    vectors = store.vectors()
    rows = store.cases.astype(object).where(store.cases.notna(), None).to_dict("records")
    return {row["case_id"]: (vectors[i], row) for i, row in enumerate(rows)}


def _same_index(a: Path, b: Path) -> None:
    left, right = _cases(a), _cases(b)
    assert sorted(left) == sorted(right)
    for cid, (vector, row) in left.items():
        other, other_row = right[cid]
        cosine = float(np.dot(vector, other) / (np.linalg.norm(vector) * np.linalg.norm(other)))
        assert cosine >= 0.999, cid
        assert row == other_row, cid


def _stored(server: Orthanc, paths: list[Path], into: Path) -> list[Path]:
    """Upload ``paths``; copy the files the server stored as new into ``into`` (what it now holds)."""
    into.mkdir(parents=True, exist_ok=True)
    kept = []
    with requests.Session() as session:
        for path in paths:
            answer = session.post(f"{server.url}/instances", data=path.read_bytes(), timeout=30)
            if answer.status_code == 200 and answer.json().get("Status") == "Success":
                target = into / f"{len(kept):04d}-{path.name}"
                shutil.copy(path, target)
                kept.append(target)
    return kept


def test_index_from_orthanc_matches_disk(tmp_path, key, shared_dicom_optional):
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        paths = sample_files()
        for name in SHARED_SETS if shared_dicom_optional is not None else ():
            paths += sorted(p for p in (shared_dicom_optional / name).rglob("*") if p.is_file())
        files = _stored(server, paths, tmp_path / "as-stored")
        assert len(files) >= 12
        from_pacs = build_index(server.dicomweb, tmp_path / "pacs", key=key, workers=0)
        from_disk = build_index(tmp_path / "as-stored", tmp_path / "disk", key=key, workers=0)
    finally:
        server.stop(fast=True)
    assert from_pacs.accounted and from_pacs.dicomweb is not None
    assert from_pacs.n_cases_added == from_disk.n_cases_added > 0
    assert from_pacs.dicomweb["series_failed"] == 0
    _same_index(tmp_path / "pacs", tmp_path / "disk")
    assert not (tmp_path / "pacs" / "local" / "spool").exists()


@pytest.mark.parametrize("syntax", ["", "rle"])
def test_only_the_instances_the_case_needs_are_fetched(tmp_path, key, syntax):
    """A 24-slice series: its headers from the metadata, the pixels of the slices the encoder reads (and the
    first and middle ones); the index is the one the files on disk give."""
    files = one_series(tmp_path / "series", 24, seed=f"partial{syntax}", syntax=syntax)
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(files)
        from_pacs = build_index(server.dicomweb, tmp_path / "pacs", key=key, workers=0, dicomweb_slices_only=True)
    finally:
        server.stop(fast=True)
    from_disk = build_index(tmp_path / "series", tmp_path / "disk", key=key, workers=0)
    fetched = from_pacs.dicomweb
    assert fetched["series_fetched"] == 1 and from_pacs.n_cases_added == from_disk.n_cases_added == 1
    # 5 slices of 24 for the encoder, the middle one and the first file: at most 7 whole instances
    assert 0 < fetched["instances_fetched"] <= 7
    assert fetched["instances_fetched"] + fetched["instances_header_only"] == 24
    stored = sum(path.stat().st_size for path in files) / 1e6
    assert fetched["megabytes_fetched"] < 0.5 * stored
    assert from_pacs.n_files == from_disk.n_files == 24 and from_pacs.accounted and not from_pacs.skipped
    _same_index(tmp_path / "pacs", tmp_path / "disk")


def test_second_sync_fetches_only_new_series(tmp_path, key, orthanc):
    first = build_index(orthanc.dicomweb, tmp_path / "index", key=key, workers=0)
    listed = first.dicomweb["series_listed"]
    assert first.dicomweb["series_fetched"] == listed == first.n_cases_added
    again = build_index(orthanc.dicomweb, tmp_path / "index", key=key, workers=0)
    assert again.dicomweb["series_fetched"] == 0 and again.n_cases_added == 0
    assert again.dicomweb["series_already_indexed"] == listed
    orthanc.upload(new_studies(tmp_path / "new", 3, seed="second-sync"))
    third = build_index(orthanc.dicomweb, tmp_path / "index", key=key, workers=0)
    assert third.dicomweb["series_fetched"] == 3 and third.dicomweb["instances_fetched"] == 3
    assert third.n_cases_added == 3 and third.n_cases_total == listed + 3
    assert third.accounted


def test_index_built_from_files_is_not_fetched_again(tmp_path, key, sample_orthanc):
    """Series already indexed from a copy of the files are recognised by their keyed case ids."""
    build_index(sample_files()[0].parent, tmp_path / "index", key=key, workers=0)
    report = build_index(sample_orthanc.dicomweb, tmp_path / "index", key=key, workers=0)
    assert report.dicomweb["series_fetched"] == 0 and report.n_cases_added == 0


def test_modality_and_date_filters(tmp_path, key, sample_orthanc):
    orthanc = sample_orthanc
    report = build_index(orthanc.dicomweb, tmp_path / "mr", key=key, workers=0, modality="MR")
    assert report.dicomweb["series_listed"] == 0 and report.n_cases_total == 0
    report = build_index(orthanc.dicomweb, tmp_path / "future", key=key, workers=0, since="2999-01-01")
    assert report.dicomweb["series_listed"] == 0
    report = build_index(orthanc.dicomweb, tmp_path / "ct", key=key, workers=0, modality="ct", until="29991231")
    assert report.dicomweb["series_listed"] == report.n_cases_added > 0


def _run_cli(url: str, index: Path, key: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEARCH_")}
    return subprocess.Popen(
        [sys.executable, "-m", "medsearch", "index", url, "--index", str(index), "--key", str(key), "--workers", "0",
         "--commit-every", "1", "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


def test_kill_9_mid_sync_then_resume(tmp_path, key, orthanc):
    orthanc.upload(new_studies(tmp_path / "more", 6, seed="kill"))
    build_index(orthanc.dicomweb, tmp_path / "whole", key=key, workers=0)
    with Proxy(orthanc.url, hold_after=10) as proxy:  # the first batch (8 series) is committed, the second held
        run = _run_cli(proxy.url(), tmp_path / "killed", key.path)
        try:
            assert proxy.held.wait(120), run.stderr.read().decode() if run.poll() is not None else "no retrieval was held"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _committed(tmp_path / "killed"):
                time.sleep(0.1)
            assert _committed(tmp_path / "killed"), "the first batch was not committed"
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait()
    assert run.returncode == -signal.SIGKILL
    partial = len(IndexStore.open(tmp_path / "killed"))
    assert 0 < partial < len(IndexStore.open(tmp_path / "whole"))
    resumed = build_index(orthanc.dicomweb, tmp_path / "killed", key=key, workers=0)
    assert resumed.dicomweb["series_already_indexed"] >= partial
    assert resumed.n_cases_added == len(IndexStore.open(tmp_path / "whole")) - partial
    _same_index(tmp_path / "killed", tmp_path / "whole")


def _committed(index: Path) -> bool:
    try:
        return len(IndexStore.open(index)) > 0
    except Exception:  # noqa: BLE001 - not written yet
        return False


@pytest.fixture
def shared_dicom_optional() -> Path | None:
    from conftest import _shared_data_root

    root = _shared_data_root() / "dicom"
    return root if root.is_dir() else None


def test_whole_series_are_fetched_unless_asked_otherwise(tmp_path, key):
    """By default every instance comes whole (the engine may need any of them, e.g. when a selected
    slice fails to decode); --fetch-slices-only is the choice for a slow link."""
    files = one_series(tmp_path / "series", 24, seed="whole", syntax="")
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(files)
        report = build_index(server.dicomweb, tmp_path / "pacs", key=key, workers=0)
    finally:
        server.stop(fast=True)
    assert report.dicomweb["instances_fetched"] == 24 and report.dicomweb["instances_header_only"] == 0
    with pytest.raises(ConfigError, match="apply to a DICOMweb server"):
        build_index(tmp_path / "series", tmp_path / "disk", key=key, workers=0, dicomweb_slices_only=True)
