"""Archives and helpers the indexing tests share: real files copied or derived with new UIDs, and
comparisons of the vectors two indexes hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLE
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medsearch import Config
from medsearch.store import IndexStore

# The exact encoder input does not matter here: small images, up to three slices per case.
FAST = Config().replace(preprocess={"size": 64, "slices": 3})
CT = sorted((SAMPLE / "tcga-luad-ct").glob("*.dcm"))
DISTINCT_CT = [f for f in CT if not f.name.startswith("ID_0006")]  # ID_0006 duplicates ID_0003
ROOT = Path(__file__).resolve().parents[2]


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


def _derive(src: Path, dest: Path, *, seed: str, study: str | None = None, series: str | None = None,
            z: float | None = None, **changes: object) -> Path:
    """A copy of a real file with new UIDs (seeded, so the same every run) and some header changes."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study or generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = series or generate_uid(entropy_srcs=[seed, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = int(z)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=False)
    return dest


def _vectors(index: Path) -> dict[str, np.ndarray]:
    store = IndexStore.open(index)
    ids = store.cases["case_id"].tolist()
    assert len(ids) == len(set(ids)), "a case is in the index twice"
    return dict(zip(ids, store.vectors()))


def _same_vectors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
