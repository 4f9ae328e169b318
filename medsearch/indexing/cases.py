"""The work done for each case, in a worker process (or in this one with ``workers=0``).

:func:`prepare_case` turns one case's files into what the encoder sees (its preprocessed slices, or
its resampled volume for a 3D encoder), a thumbnail and a metadata row, and never raises: a case
that cannot be decoded or preprocessed comes back as a :class:`FailedCase` whose files carry the
reason. ``_scan_files`` reads the header summaries of a chunk of files, with pydicom kept quiet.
:func:`prepare_study` does for ``medsearch serve`` what :func:`prepare_case` does for an index: it
turns an uploaded query study into its encoder input, in a worker, so that the service's memory and
time stay bounded whatever the upload holds.

No detail carries a header value: library messages go through
:func:`medsearch.io.dicom.read._one_line`, which removes what they quote.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.config import Config, SliceMode
from medsearch.embedding import Region, crop_array, encoder_input, slice_indices, study_array
from medsearch.encoders import EncoderInfo
from medsearch.errors import EncoderMismatchError, InvalidStudyError, MedsearchError
from medsearch.indexing.options import IndexOptions
from medsearch.io import (
    CaseFiles,
    CaseRef,
    HeaderSummary,
    LoadFailure,
    SkippedFile,
    SkipReason,
    Volume,
    load_study,
    load_volume,
    summarize_file,
)
from medsearch.io.dicom.classes import MIN_IMAGE_SIZE
from medsearch.io.dicom.read import _one_line
from medsearch.io.quiet import pydicom_silenced
from medsearch.transforms import axial_indices, chosen_slices, make_thumbnail

__all__ = ["CaseJob", "FailedCase", "PreparedCase", "PreparedStudy", "StudyError", "prepare_case", "prepare_study"]


@dataclass(frozen=True)
class CaseJob:
    """One case to decode: its position in the run, its pseudonymous id and its files."""

    seq: int
    case_id: str
    case: CaseFiles


@dataclass
class PreparedCase:
    """A decoded case, ready for the encoder: ``images`` is the encoder input as float32."""

    case_id: str
    images: np.ndarray
    thumbnail: np.ndarray | None
    row: dict[str, Any]
    skipped: list[SkippedFile]
    n_files: int  # files of the case that went into the volume
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    # which stack slices ``images`` holds, and their gap in mm (None: unknown); None for a 3D encoder
    # or tri-planar images, whose slice vectors are not kept
    slice_indices: list[int] | None = None
    gap_mm: float | None = None
    # with ``crop_grid``: the encoder input of the tiles of those slices, and each tile's slice and
    # box (:func:`~medsearch.embedding.crop_array`); None without
    crops: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class FailedCase:
    """A case none of whose files could be used; ``transient``: a timeout or a crashed worker."""

    case_id: str
    skipped: list[SkippedFile]
    transient: bool = False
    decode_s: float = 0.0


@dataclass(frozen=True)
class _Setup:
    """What a worker needs to turn a case into encoder input (sent once, when it starts): the
    settings, the encoder's input format, the row maker and the run's options (its decoder)."""

    config: Config
    encoder: EncoderInfo
    describe: Callable[[str, CaseRef, Volume], dict[str, Any]] | None
    options: IndexOptions = field(default_factory=IndexOptions)
    log_level: int = logging.WARNING


def prepare_case(job: CaseJob, setup: _Setup) -> PreparedCase | FailedCase:
    """Decode one case and make its encoder input, thumbnail and metadata row; never raises.

    With the default loader, a 2D encoder and axial slices, only the slices the encoder sees and the
    thumbnail's middle slice are read and decoded, chosen from the slice geometry the header scan
    recorded (see :func:`~medsearch.io.load_volume`): the same slices as a full decode would give,
    unless a file that was not selected has pixel data that would not decode, which is then not
    noticed (and the file counts as part of its case; the scan has already checked that its header
    reads, its pixel data is all there and its transfer syntax has a decoder).
    """
    started = time.perf_counter()
    files = job.case.files
    try:
        case = job.case.open()
        if setup.options.load is load_volume:
            volume, bad = load_volume(case, select=_used_slices(setup.config, setup.encoder))
        else:
            volume, bad = setup.options.load(case)
    except LoadFailure as e:
        return FailedCase(job.case_id, _cover(files, list(e.skipped)), decode_s=time.perf_counter() - started)
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError:
        return FailedCase(job.case_id, _cover(files, [], _TOO_LARGE, SkipReason.TOO_LARGE), decode_s=time.perf_counter() - started)
    except BaseException as exc:  # noqa: BLE001 - a decoder bug (or a Rust panic) must cost one case, not the run
        detail = f"decoding the case failed: {_one_line(exc)}"
        return FailedCase(job.case_id, _cover(files, [], detail), decode_s=time.perf_counter() - started)
    decoded = time.perf_counter()
    try:
        images = encoder_input(volume, setup.encoder, setup.config).numpy()
        chosen = slice_indices(volume, setup.encoder, setup.config)
        crops = None
        if chosen is not None and setup.config.index.crop_grid >= 2:
            crops = crop_array(volume, setup.encoder, setup.config, chosen)
        size = setup.config.index.thumbnail_size
        thumb = None
        if size:
            thumb = make_thumbnail(volume.pixels, config=setup.config.preprocess, modality=volume.modality,
                                   rgb=volume.rgb, spacing=volume.spacing, size=size, window=volume.window)
        row = setup.describe(job.case_id, case, volume) if setup.describe is not None else {"case_id": job.case_id}
    except MemoryError:
        return FailedCase(job.case_id, _cover(files, list(bad), _TOO_LARGE, SkipReason.TOO_LARGE), decode_s=decoded - started)
    except Exception as exc:  # noqa: BLE001 - as above: an odd volume is skipped with the reason
        detail = f"preprocessing the case failed: {_one_line(exc)}"
        return FailedCase(job.case_id, _cover(files, list(bad), detail), decode_s=decoded - started)
    return PreparedCase(
        case_id=job.case_id,
        images=np.ascontiguousarray(images, dtype=np.float32),
        thumbnail=thumb,
        row=row,
        skipped=list(bad),
        n_files=len(files) - len(bad),
        decode_s=decoded - started,
        preprocess_s=time.perf_counter() - decoded,
        slice_indices=chosen,
        gap_mm=volume.gap_mm,
        crops=crops,
    )


def _used_slices(config: Config, info: EncoderInfo) -> Callable[..., list[int]] | None:
    """Which slices of a stack of a given depth a case's preprocessing reads; None: all of them."""
    if info.spatial_dims != 2 or config.preprocess.slice_mode is not SliceMode.AXIAL:
        return None  # tri-planar images and 3D encoders see the whole volume
    if config.preprocess.slice_spacing_mm > 0:
        return _DensitySelection(config, middle=bool(config.index.thumbnail_size))
    return functools.partial(_axial_and_middle, count=config.preprocess.slices, middle=bool(config.index.thumbnail_size))


@dataclass(frozen=True)
class _DensitySelection:
    """The slices a selection by millimetres reads, once the ordered stack gives its slice gap.

    Without a gap from the positions, every slice is read: the volume's gap then comes from Spacing
    Between Slices or Slice Thickness, which the loader reads after the selection, and the encoder
    input, chosen from that gap, must find its slices decoded.
    """

    config: Config
    middle: bool
    takes_gap: bool = True

    def __call__(self, depth: int, *, gap_mm: float | None = None) -> list[int]:
        if gap_mm is None or not gap_mm > 0:
            return list(range(depth))
        indices = chosen_slices(depth, self.config.preprocess, gap_mm=gap_mm)
        return sorted({*indices, depth // 2}) if self.middle else indices


def _axial_and_middle(depth: int, *, count: int, middle: bool) -> list[int]:
    """The axial slices an encoder sees, and the middle one the thumbnail shows."""
    indices = axial_indices(depth, count=count)
    return sorted({*indices, depth // 2}) if middle else indices


_TOO_LARGE = "the case needs more memory to decode than a worker process may use (IndexOptions.worker_memory_gib)"


def _cover(
    files: Sequence[Path], skipped: list[SkippedFile], detail: str = "", reason: SkipReason = SkipReason.DECODE_ERROR
) -> list[SkippedFile]:
    """``skipped`` plus ``reason`` (DECODE_ERROR) for each file of the case it does not name."""
    named = {s.path for s in skipped}
    detail = detail or "not decoded: no other file of its case could be decoded"
    return skipped + [SkippedFile(p, reason, detail) for p in files if p not in named]


def _scan_files(paths: list[Path], setup: _Setup) -> tuple[list[HeaderSummary | SkippedFile], float]:
    """The header summaries of ``paths`` and the seconds they took (a worker task, as is :func:`prepare_case`)."""
    started = time.perf_counter()
    with pydicom_silenced():
        min_size = setup.config.index.min_image_size if setup is not None else MIN_IMAGE_SIZE
        found = [summarize_file(p, min_size=min_size) for p in paths]
    return found, time.perf_counter() - started


@dataclass
class PreparedStudy:
    """A query study turned into encoder input (``images``, float32), by :func:`prepare_study`."""

    images: np.ndarray
    modality: str
    n_slices: int
    slice_indices: list[int] | None = None  # the stack slices ``images`` holds (see PreparedCase)
    gap_mm: float | None = None
    region: dict[str, list[int]] | None = None  # what the answer records of a region query (Region.record)
    tiles: int = 0  # the images of each slice's tiles after the slices (matched in layout, StudyInput)


@dataclass(frozen=True)
class StudyError:
    """Why a query study cannot be used: ``kind`` names the error (``InvalidStudyError``,
    ``EncoderMismatchError``, ``MedsearchError``, or ``internal`` for a bug, whose ``message`` is then
    its type only). Exceptions do not all survive pickling; this does."""

    kind: str
    message: str


def prepare_study(path: Path | tuple[Path, Region], setup: _Setup) -> PreparedStudy | StudyError:
    """Load a query study (:func:`~medsearch.io.load_study`, with ``setup.options.load``) and make its
    encoder input, as :meth:`medsearch.search.Searcher.search` does; never raises. ``path`` may
    come with a :class:`~medsearch.embedding.Region`: then the input is that region's."""
    region = None
    if isinstance(path, tuple):
        path, region = path
    try:
        _, volume = load_study(path, load=setup.options.load)
        seen = study_array(volume, setup.encoder, setup.config, region)
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError:
        return StudyError("InvalidStudyError", f"{path} needs more memory to decode than the service may use; give a smaller study")
    except EncoderMismatchError as e:
        return StudyError("EncoderMismatchError", str(e))
    except InvalidStudyError as e:
        return StudyError("InvalidStudyError", str(e))
    except MedsearchError as e:
        return StudyError("MedsearchError", str(e))
    except BaseException as exc:  # noqa: BLE001 - a decoder bug: its message may quote the upload, so its type only
        return StudyError("internal", type(exc).__name__)
    return PreparedStudy(np.ascontiguousarray(seen.images, dtype=np.float32), volume.modality, int(volume.pixels.shape[0]),
                         seen.slice_indices, volume.gap_mm, seen.region, seen.tiles)
