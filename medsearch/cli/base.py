"""What every ``medsearch`` command shares: the typer app, the consoles, and how a user error is told."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import typer
from rich.console import Console
from typer.core import TyperCommand

from medsearch.errors import MedsearchError


class Command(TyperCommand):
    """A command whose usage line names its arguments as its help does: ``query [OPTIONS] STUDY``.

    (typer writes a required argument as ``{study}``, which reads like a literal or a template.)
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # typer's own (vendored) click Context
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="medsearch",
    help="Find the most similar historical cases for a DICOM study, offline and de-identified.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is not wrapped at 80 columns: a table cut into slivers helps nobody.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn a MedsearchError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedsearchError as e:
            stderr.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
            raise typer.Exit(code=2) from None

    return cast(F, wrapper)


@app.callback()
def _main(
    ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (to stderr).")
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand != "query":  # query checks its arguments first (quickly), then silences pydicom
        silence_pydicom()


def silence_pydicom() -> None:
    from medsearch.io.quiet import silence_pydicom

    silence_pydicom()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
