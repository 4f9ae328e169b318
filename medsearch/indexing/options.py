"""How an indexing run goes: :class:`IndexOptions`, the settings handed down through one run.

:func:`~medsearch.indexing.build_index` takes these settings as keyword arguments (as the CLI and
the notebooks call it) and builds one :class:`IndexOptions`; :func:`~medsearch.indexing.index_files`,
its worker pool and the setup each worker process receives read them from that one object.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from medsearch.io import CaseRef, SkippedFile, Volume, load_volume

__all__ = ["Engine", "IndexOptions"]


class Engine(str, enum.Enum):
    """Which engine runs an indexing run: ``local`` (worker processes on this machine) or ``ray``
    (a Ray cluster, :mod:`medsearch.indexing.ray_engine`; ``pip install "medsearch[ray]"``)."""

    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class IndexOptions:
    """The settings of one indexing run (what the index holds is the :class:`~medsearch.config.Config`'s).

    Attributes
    ----------
    workers
        Worker processes that read, decode and preprocess (None:
        :func:`~medsearch.indexing.default_workers`; 0: everything in this process).
    case_timeout
        Seconds a worker may spend on one case (or one chunk of headers) before it is stopped and the
        case skipped with DECODE_ERROR; None: no limit.
    batch_images
        Images per encoder call (the cases' selected slices, several cases per call).
    commit_every, commit_seconds
        Commit once this many new cases are waiting, or this many seconds after the last commit,
        whichever comes first (throttled so that commits take at most ~1/10 of a run).
    file_cache
        Keep and use the file-state cache (unchanged files are not read again).
    retry_skipped
        Decode again the cases whose files were all left out by an earlier run.
    progress
        Show the live bar on stderr.
    worker_memory_gib
        Memory each worker process may allocate beyond what it holds once started (its libraries,
        about 0.4 GB resident): its address space is capped, so a file that needs more is skipped
        (``too_large``, or ``decode_error`` from a decoder) instead of exhausting the machine; None:
        no cap. One file decodes to at most 1 GiB of float32 pixels, which fits in the default. With
        ``engine="ray"``, this cap and ``case_timeout`` apply to the decoding process of each Ray worker.
    load
        The decoder (default :func:`~medsearch.io.load_volume`, which then decodes only the slices
        the encoder and the thumbnail use, see :func:`~medsearch.indexing.prepare_case`); it runs in
        the worker processes, so it must be picklable (a module-level function).
    engine
        ``local`` or ``ray`` (see :class:`Engine`).
    ray_address
        The Ray cluster of the ``ray`` engine: ``"auto"`` (the one ``ray start`` began on this
        machine), ``HOST:PORT``, or None (a Ray started for the run, on this machine only).
    """

    workers: int | None = None
    case_timeout: float | None = 600.0
    batch_images: int = 32
    commit_every: int = 64
    commit_seconds: float = 60.0
    file_cache: bool = True
    retry_skipped: bool = False
    progress: bool = False
    worker_memory_gib: float | None = 2.0
    load: Callable[[CaseRef], tuple[Volume, list[SkippedFile]]] = load_volume
    engine: Engine = Engine.LOCAL
    ray_address: str | None = None
