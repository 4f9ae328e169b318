"""``python -m medsearch.cli``."""

from medsearch.cli import main

main()
