"""Keeping pydicom quiet: its warnings and log lines quote header values, which may identify a patient.

What matters to a user (why a file was skipped, why a study cannot be read) is already in the skip
report and in medsearch's one-line errors, so pydicom's own lines never reach a terminal or a log:

- :func:`silence_pydicom` for good, in a process that only works for medsearch (the CLI, a worker);
- :func:`pydicom_silenced` for a block, in a process that also runs the user's code (a notebook), so
  that their own pydicom configuration is left as it was afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["pydicom_silenced", "silence_pydicom"]


def silence_pydicom() -> None:
    """Silence pydicom in this process for good: no validation warnings, no log lines, even with --verbose."""
    # pydicom sets its logger's level when imported, so import it first
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")


@contextlib.contextmanager
def pydicom_silenced() -> Iterator[None]:
    """No log lines from pydicom inside the block; its logger is restored afterwards."""
    logger = logging.getLogger("pydicom")
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before
