"""Tests of medsearch.deid as a whole: its docstring examples run, and it imports only lower layers."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

from medsearch import deid

FORBIDDEN_IMPORTS = {"torch", "monai", "faiss", "pandas", "numpy"}


def test_docstring_examples_run():
    modules = [deid] + [importlib.import_module(f"{deid.__name__}.{m.name}") for m in pkgutil.iter_modules(deid.__path__)]
    results = [doctest.testmod(module) for module in modules]
    assert all(r.failed == 0 for r in results)
    assert sum(r.attempted for r in results) > 0, "no docstring example was found"


# kanon.py counts groups of patients over whole case tables (millions of rows): numpy, not a loop.
ALLOWED_HERE = {"kanon.py": {"numpy"}}


def test_module_imports_only_lower_layers():
    imported = set()
    for path in sorted(Path(deid.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        here = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                here |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                here.add(node.module)
        roots = {name.split(".")[0] for name in here}
        assert not roots & (FORBIDDEN_IMPORTS - ALLOWED_HERE.get(path.name, set())), path.name
        imported |= here
    outside = {name for name in imported if name.startswith("medsearch") and not name.startswith("medsearch.deid.")}
    assert outside <= {"medsearch.errors"}
