"""Fixtures of the indexing tests: a mixed archive of real files, each kind of skip included, and
its index built in this process (workers=0). Both are built once per session and only read: a test
that changes one works on a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from indexing.archives import CT, FAST, _derive, _testfile
from pydicom.uid import generate_uid

from medsearch import build_index
from medsearch.indexing import IndexReport


@pytest.fixture(scope="session")
def mixed_archive(tmp_path_factory) -> Path:
    """Real files of several kinds, plus files that must be skipped, each for its own reason."""
    root = tmp_path_factory.mktemp("mixed") / "archive"
    (root / "ct").mkdir(parents=True)
    (root / "pydicom").mkdir()
    for f in CT:
        shutil.copy(f, root / "ct" / f.name)
    for name in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"):
        shutil.copy(_testfile(name), root / "pydicom" / name)
    # a series of four CT slices, one at each position
    study, series = generate_uid(entropy_srcs=["series4", "study"]), generate_uid(entropy_srcs=["series4", "series"])
    for i in range(4):
        _derive(_testfile("CT_small.dcm"), root / "series4" / f"slice{i}.dcm", seed=f"s4-{i}", study=study,
                series=series, z=float(i * 5))
    (root / "README.txt").write_text("not an image")
    shutil.copy(_testfile("test-SR.dcm"), root / "report-sr.dcm")
    data = _testfile("MR_small.dcm").read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) - 1000])
    # its header declares far more pixels than any file may hold: the decoder is never asked
    _derive(_testfile("MR_small.dcm"), root / "huge" / "huge.dcm", seed="huge", Rows=60000, Columns=60000)
    return root


@pytest.fixture(scope="session")
def serial_index(mixed_archive, sample_key, tmp_path_factory) -> tuple[Path, IndexReport]:
    path = tmp_path_factory.mktemp("serial") / "index"
    report = build_index(mixed_archive, path, key=sample_key, config=FAST, workers=0)
    return path, report
