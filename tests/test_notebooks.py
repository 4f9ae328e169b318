"""The notebooks in ``notebooks/`` run top to bottom on the shipped sample data, and are committed clean.

Each notebook runs in a fresh ``python3`` kernel of this interpreter (nbclient), offline, from its
own folder. A notebook that raises fails its test with the cell's error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="install the test extra: pip install -e '.[test]'")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# What each notebook must show once it has run: the MIME types of its outputs, at least one each.
EXPECTED = {
    "01-quickstart.ipynb": {"image/png", "text/html"},  # the result sheet, the DataFrame
    "02-evaluation.ipynb": {"image/png", "text/html"},  # precision@k per class, the metrics table
    "03-embedding-map.ipynb": {"image/png"},  # the maps
    "04-regions.ipynb": {"image/png", "text/html"},  # the sheet with the boxes, the table of where cases matched
}
TIMEOUT_S = 240  # per cell; the whole of one notebook takes seconds to a minute on two CPU cores


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_is_listed():
    assert sorted(p.name for p in _notebooks()) == sorted(EXPECTED)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [
        i for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert dirty == [], f"{path.name}: cells {dirty} keep outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    # The kernel inherits the environment: this interpreter first on PATH, inline figures.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=TIMEOUT_S, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    kinds = {
        kind
        for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        for kind in output.get("data", {})
    }
    missing = EXPECTED[path.name] - kinds
    assert not missing, f"{path.name} ran but showed no {sorted(missing)}"
