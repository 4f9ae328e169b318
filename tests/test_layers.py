"""The package's imports flow one way: errors/config -> deid -> io -> transforms -> encoders -> store
-> search/evaluate -> cli. Each module is parsed with ``ast``; a forbidden import fails the test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medsearch"

# The lower the rank, the lower the layer. A module may import medsearch modules of lower or equal
# rank only (equal: inside its own layer).
RANK = {
    "errors": 0,
    "config": 1,
    "deid": 2,
    "io": 3,
    "transforms": 4,
    "encoders": 5,
    "filters": 6,
    "store": 6,
    "metrics": 6,
    "sharing": 7,
    "search": 7,
    "pipeline": 7,
    "evaluate": 8,
    "train": 8,
    "demo": 8,
    "sheets": 8,
    "cli": 9,
    "serve": 9,
    "__main__": 10,
}
# Third-party libraries a layer must not touch.
FORBIDDEN = {
    "errors": {"torch", "monai", "faiss", "pydicom", "pandas"},
    "config": {"torch", "monai", "faiss", "pydicom"},
    "deid": {"torch", "monai", "faiss"},
    "io": {"torch", "monai", "faiss"},
    "transforms": {"faiss", "pydicom"},
    "encoders": {"faiss", "pydicom"},
    "filters": {"torch", "monai", "faiss", "pydicom"},
    "store": {"torch", "monai", "pydicom"},
    "metrics": {"torch", "monai", "faiss", "pydicom"},
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    layer = _layer(path)
    if layer not in RANK:
        pytest.fail(f"{path.relative_to(PACKAGE)} belongs to no layer; add it to RANK in {__file__}")
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN.get(layer, set()), f"{layer} must not import {top}"
        if top == "medsearch" and "." in name:
            target = name.split(".")[1]
            assert RANK.get(target, 99) <= RANK[layer], f"{layer} imports {name}, a higher layer"


def test_no_catch_all_utils_module():
    assert not list(PACKAGE.rglob("utils.py"))
