"""The package's imports flow one way (STYLE.md): errors/config -> deid -> io -> transforms -> encoders ->
embedding -> store -> sharing -> search -> indexing -> evaluate/train/sheets/demo -> serve -> cli.

Each module is parsed with ``ast`` (imports inside functions count too); a forbidden import fails.
- A module may import medsearch modules of a lower layer, and modules of its own layer's unit (the same
  subpackage, or itself).
- Two units of equal rank may not import each other at all, so that no cycle can form between them.
- Inside a subpackage, the imports between its modules form no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medsearch"

# A unit is a top-level module or subpackage of medsearch. The lower the rank, the lower the layer.
RANK = {
    "errors": 0,
    "_files": 0,
    "_json": 0,
    "config": 1,
    "deid": 2,
    "io": 3,
    "transforms": 4,
    "encoders": 5,
    "embedding": 6,
    "filters": 6,
    "metrics": 6,
    "store": 7,
    "sharing": 8,
    "pacs": 8.5,  # DICOMweb: above deid/io (pseudonyms, DICOM files), below indexing and the query side that use it
    "rerank": 8.7,  # late interaction over slice vectors: reads the store, used by search
    "search": 9,
    "indexing": 10,
    "evaluate": 11,
    "train": 11,
    "demo": 11,
    "sheets": 11,
    "web": 11.5,  # the page of serve: above search and sheets, below serve
    "serve": 12,
    "cli": 13,
    "__init__": 14,
    "__main__": 14,
}
# Upward imports kept on purpose: an old public name loaded from its new home on first use
# (medsearch.search.build_index and .IndexReport live in medsearch.indexing).
COMPAT = {("search", "indexing")}
# Third-party libraries a unit must not touch.
FORBIDDEN = {
    "errors": {"torch", "monai", "faiss", "pydicom", "pandas", "numpy"},
    "_files": {"torch", "monai", "faiss", "pydicom", "pandas", "numpy"},
    "_json": {"torch", "monai", "faiss", "pydicom", "pandas"},
    "config": {"torch", "monai", "faiss", "pydicom"},
    "deid": {"torch", "monai", "faiss"},
    "io": {"torch", "monai", "faiss"},
    "transforms": {"faiss", "pydicom"},
    "encoders": {"faiss", "pydicom"},
    "embedding": {"faiss", "pydicom"},
    "filters": {"torch", "monai", "faiss", "pydicom"},
    "store": {"torch", "monai", "pydicom"},
    "rerank": {"torch", "monai", "faiss", "pydicom"},
    "metrics": {"torch", "monai", "faiss", "pydicom"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("medsearch", *parts))


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base)
            elif node.module:
                yield node.module


def _medsearch_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    unit = _unit(_module_name(path)) if path != PACKAGE / "__init__.py" else "__init__"
    if unit not in RANK:
        pytest.fail(f"{path.relative_to(PACKAGE)} belongs to no layer; add {unit!r} to RANK in {__file__}")
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN.get(unit, set()), f"{unit} must not import {top}"
        if top != "medsearch" or name == "medsearch":
            continue
        target = _unit(name)
        if target == unit:
            continue
        assert target in RANK, f"{path.relative_to(PACKAGE)} imports {name}, which belongs to no layer"
        if (unit, target) in COMPAT:
            continue
        assert RANK[target] < RANK[unit], (
            f"{unit} (rank {RANK[unit]}) imports {name} (rank {RANK[target]}): only lower layers may be imported"
        )


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` (a list of nodes, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_inside_a_subpackage():
    modules = _medsearch_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue  # a package's __init__ re-exports its modules: that is the way in, not a cycle
        targets = set()
        for imported in _imports(path):
            # `from medsearch.io.dicom import read` names a module; `from medsearch.io.dicom.read import X` too
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and _unit(imported) == _unit(name) and modules[imported].name != "__init__.py":
                targets.add(imported)
        graph[name] = targets
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_catch_all_utils_module():
    assert not list(PACKAGE.rglob("utils.py"))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 750, f"{path.relative_to(PACKAGE)} has {lines} lines: split it into a subpackage (STYLE.md)"


@pytest.mark.parametrize(
    "package", sorted(p.parent for p in PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent))
)
def test_each_subpackage_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"{package / '__init__.py'} needs a docstring that says what lives there"
