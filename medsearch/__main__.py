"""``python -m medsearch``: the same as the ``medsearch`` command."""

from medsearch.cli import main

main()
