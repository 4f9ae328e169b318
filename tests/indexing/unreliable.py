"""A decoder that hangs on one case and crashes its process on another, for the tests of engines
that must skip such a case and go on. It lives apart from the test modules so that any process can
import it cheaply: a local worker, a Ray worker, or the decoding process a Ray worker starts."""

from __future__ import annotations

import os
import signal
import time

from medsearch.io import CaseRef, SkippedFile, Volume, load_volume

HANGS = "ID_0002"  # the sample case the decoder never finishes
CRASHES = "ID_0008"  # the sample case whose decoding ends its process with SIGSEGV
ATTEMPTS = "attempts.log"  # beside the archive's folder: a line per attempt at one of those two cases


def hang_or_crash(case: CaseRef) -> tuple[Volume, list[SkippedFile]]:
    """:func:`~medsearch.io.load_volume`, except on the two cases above."""
    name = case.files[0].name
    if name.startswith((HANGS, CRASHES)):
        with open(case.files[0].parent.parent / ATTEMPTS, "a") as log:
            log.write(name[:7] + "\n")
    if name.startswith(HANGS):
        time.sleep(3600)
    if name.startswith(CRASHES):
        os.kill(os.getpid(), signal.SIGSEGV)
    return load_volume(case)
