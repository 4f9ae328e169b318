"""The ``medsearch`` command: a thin layer over the library functions a notebook calls too.

Each command parses its options, calls one function of :mod:`medsearch.search` (or
:mod:`medsearch.demo`), and prints the result as a table or, with ``--json``, as JSON on stdout.
Errors meant for the user (:class:`~medsearch.errors.MedsearchError`) print one line on stderr and
exit with status 2; progress goes to stderr.
"""

from __future__ import annotations

# Each module registers its commands on ``app`` when imported: the order below is the order of --help.
# isort: off
from medsearch.cli import index_commands, query_commands, evaluate_command, serve_command, train_command  # noqa: F401
# isort: on
from medsearch.cli.base import app
from medsearch.cli.query_commands import _check_query_arguments

__all__ = ["app", "main", "_check_query_arguments"]


def main() -> None:  # pragma: no cover - console entry point
    app()
