"""Fixtures shared by every test folder: where the real DICOM and MedMNIST sets of ../shared/data live,
and an index of the sample archive shipped with medsearch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _shared_data_root() -> Path:
    env = os.environ.get("MEDSEARCH_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_dicom() -> Path:
    """``shared/data/dicom`` beside the repository (or under $MEDSEARCH_SHARED_DATA); skip if absent."""
    root = _shared_data_root() / "dicom"
    if not root.is_dir():
        pytest.skip(
            f"shared DICOM sets not found at {root}; set MEDSEARCH_SHARED_DATA to the shared/data folder"
        )
    return root


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    """``shared/data/medmnist`` beside the repository (or under $MEDSEARCH_SHARED_DATA); skip if absent."""
    root = _shared_data_root() / "medmnist"
    if not root.is_dir():
        pytest.skip(f"MedMNIST files not found at {root}; set MEDSEARCH_SHARED_DATA to the shared/data folder")
    return root


# -- an index of the sample archive shipped with medsearch, built once per test session ----------

SAMPLE = Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample"


@pytest.fixture(scope="session")
def sample_key(tmp_path_factory):
    from medsearch.deid import SiteKey

    return SiteKey.load(tmp_path_factory.mktemp("key") / "site.key", create=True)


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, sample_key) -> Path:
    """The shipped sample archive, indexed with its labels (read-only for tests: copy to change it)."""
    from medsearch.indexing import build_index

    path = tmp_path_factory.mktemp("sample") / "index"
    build_index(SAMPLE / "tcga-luad-ct", path, labels=SAMPLE / "labels.csv", key=sample_key)
    return path


@pytest.fixture(scope="session")
def phantom_index(tmp_path_factory) -> tuple[Path, Path]:
    """Three synthetic CT series (tests/series.py) indexed with a slice every 2.5 mm: (archive, index);
    the index's link table is ``index.parent / "links.csv"``."""
    from series import phantom_archive

    from medsearch.config import load_config
    from medsearch.indexing import build_index

    root = tmp_path_factory.mktemp("phantoms")
    archive = phantom_archive(root / "archive")
    config = load_config("default").replace(preprocess={"slice_spacing_mm": 2.5})
    build_index(archive, root / "index", config=config, links=root / "links.csv")
    return archive, root / "index"
