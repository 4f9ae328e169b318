"""Decoding a case into one float32 volume, and loading one query study.

:func:`load_volume` reads and decodes the files of a :class:`~medsearch.io.dicom.scan.CaseRef`
(or only the slices a caller will use) and stacks them into a :class:`Volume`. :func:`load_study`
scans a file or a series folder, loads its one case, and turns every problem into one
:class:`~medsearch.errors.InvalidStudyError` line that says what to do.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medsearch.deid.vocabulary import modality_term
from medsearch.errors import InvalidStudyError
from medsearch.io.dicom.classes import MIN_IMAGE_SIZE
from medsearch.io.dicom.decode import _decode
from medsearch.io.dicom.mosaic import mosaic_count, split_mosaic
from medsearch.io.dicom.read import (
    _PIXEL_TAGS,
    LoadFailure,
    SkippedFile,
    SkipReason,
    _get,
    _group_item,
    _is_enhanced,
    _one_line,
    _read_full,
    _read_header,
    _Skip,
    _str,
)
from medsearch.io.dicom.scan import CaseRef, find_files, scan
from medsearch.io.dicom.stack import SliceGeometry, _geometry, _Image, _images, _stack
from medsearch.io.dicom.window import display_window

__all__ = ["Volume", "load_study", "load_volume"]

logger = logging.getLogger(__name__)


@dataclass
class Volume:
    """Decoded pixels of one case: float32, (Z, H, W) gray or (Z, H, W, 3) RGB.

    ``decoded`` is None when every slice was decoded. A volume loaded with ``load_volume(case,
    select=...)`` has the full shape, but only the slices listed in ``decoded`` hold pixels; the
    others are zero. ``window``: the (center, width) in HU a CT is shown in (the file's own, or its
    body part's: :func:`~medsearch.io.dicom.window.display_window`), None where not known; pictures
    only, the encoder's input does not depend on it. ``z_known``: whether ``spacing[0]`` comes from
    the headers (positions, Spacing Between Slices or Slice Thickness) rather than standing in as 1.0.
    """

    pixels: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    rgb: bool
    decoded: tuple[int, ...] | None = None
    window: tuple[float, float] | None = None
    z_known: bool = True

    @property
    def gap_mm(self) -> float | None:
        """The distance between neighbouring slices in mm, from the headers; None where they do not say."""
        gap = float(self.spacing[0])
        return gap if self.z_known and math.isfinite(gap) else None


def load_volume(
    case: CaseRef, *, select: Callable[[int], Iterable[int]] | None = None
) -> tuple[Volume, list[SkippedFile]]:
    """Decode the pixels of every file of ``case`` (or of the slices ``select`` picks) into one volume.

    Each image is decoded with pydicom (YBR becomes RGB), the modality LUT or rescale is applied
    (per frame for Enhanced objects, from the Pixel Value Transformation functional group),
    PALETTE COLOR becomes RGB, and MONOCHROME1 is inverted so that higher is brighter.
    A multi-frame object gives one image per frame, a Siemens mosaic one image per tile
    (:mod:`medsearch.io.dicom.mosaic`). Images are stacked along Z as described in
    :func:`_stack`: sorted by position on the slice normal, one image kept per position (the first
    by InstanceNumber, AcquisitionNumber) so the volume is one spatial stack.

    Parameters
    ----------
    case : CaseRef
        A case from :func:`scan`.
    select : callable, optional
        Given the depth of the stack, the indices of the slices that will be used (a 2D encoder
        sees a few of a CT series). A callable with a true ``takes_gap`` attribute is called as
        ``select(depth, gap_mm=...)`` with the median gap between the ordered positions (None where
        the positions do not give one), for a selection by millimetres. The stack is ordered from the headers, and only those slices
        are decoded; the volume lists them in ``decoded``. When the case carries the slice
        geometry its scan recorded (``case.geometry``), only the selected files are read again;
        otherwise every file is read. This applies to series of single-frame grayscale files;
        other cases are decoded whole, as is a case where a selected slice fails to decode or its
        file changed since the scan (so that the skip report names that file and the stack is the
        one a full decode gives).

    Returns
    -------
    Volume
        ``pixels`` (Z, H, W) or (Z, H, W, 3) float32; ``spacing`` (z, y, x) in mm: z is the median
        gap between positions, else Spacing Between Slices, else Slice Thickness; y and x are
        Pixel Spacing (else Imager Pixel Spacing); 1.0 where unknown.
    list of SkippedFile
        Files left out: TRUNCATED, DECODE_ERROR, or INCONSISTENT_SERIES for files whose image
        shape or channel count differs from that of most files of the case.

    Raises
    ------
    LoadFailure
        If no file of the case decodes.
    """
    if select is not None:
        fast = _load_by_geometry(case, select)
        if fast is not None:
            return fast
    failed: list[tuple[int, SkippedFile]] = []
    read: list[tuple[int, Path, Dataset]] = []
    for index, path in enumerate(case.files):
        try:
            read.append((index, path, _read_full(path)))
        except _Skip as skip:
            logger.info("skip %s: %s (%s)", path, skip.reason.value, skip.detail)
            failed.append((index, SkippedFile(path, skip.reason, skip.detail)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop its series
            detail = _one_line(exc)
            logger.info("skip %s: %s (%s)", path, SkipReason.DECODE_ERROR.value, detail)
            failed.append((index, SkippedFile(path, SkipReason.DECODE_ERROR, detail)))
    if select is not None and read:
        # A file whose header reads but whose pixels would not decode is found only if its slice
        # is selected (then everything is decoded, below). Otherwise it stays part of the case,
        # as it is part of the series and its geometry was used to order the stack; its pixels,
        # which nothing uses, are not checked. Files that cannot be read at all, are cut short,
        # have no pixel data or an unsupported transfer syntax are still caught, by the header
        # scan and by reading every file here.
        partial = _load_selected(case, read, select)
        if partial is not None:
            volume, inconsistent = partial
            return volume, sorted([s for _, s in failed] + inconsistent, key=lambda s: s.path)
    decoded: list[tuple[Path, Dataset, np.ndarray, list[_Image]]] = []
    for index, path, ds in read:
        try:
            pixels = _decode(ds)
            tiles = mosaic_count(ds)
            if tiles:  # a Siemens mosaic: its tiles are the slices of a volume, in order
                pixels = split_mosaic(pixels, tiles)
            decoded.append((path, ds, pixels, _images(ds, pixels, index)))
            for tag in _PIXEL_TAGS & set(ds.keys()):  # the stored pixels are not needed any more
                del ds[tag]
        except _Skip as skip:
            logger.info("skip %s: %s (%s)", path, skip.reason.value, skip.detail)
            failed.append((index, SkippedFile(path, skip.reason, skip.detail)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop its series
            detail = _one_line(exc, ds)
            logger.info("skip %s: %s (%s)", path, SkipReason.DECODE_ERROR.value, detail)
            failed.append((index, SkippedFile(path, SkipReason.DECODE_ERROR, detail)))
    skipped = [s for _, s in sorted(failed, key=lambda pair: pair[0])]
    if not decoded:
        first = skipped[0]
        raise LoadFailure(
            f"no file of the case at {case.files[0]} could be decoded ({len(skipped)} tried); "
            f"{first.path}: {first.reason.value}: {first.detail}",
            skipped,
        )
    shapes = Counter(pixels.shape[1:] for _, _, pixels, _ in decoded)
    majority = shapes.most_common(1)[0][0]
    images: list[_Image] = []
    kept_ds: list[Dataset] = []
    for path, ds, pixels, file_images in decoded:
        if pixels.shape[1:] != majority:
            skipped.append(_inconsistent(path, pixels.shape[1:], majority))
            continue
        images.extend(file_images)
        kept_ds.append(ds)
    stacked, gap = _stack(images)
    if len(kept_ds) == 1:  # one file (a multi-frame volume): its frames are put in order in place
        pixels = _in_order(next(p for _, d, p, _ in decoded if d is kept_ds[0]), [im.order[3] for im in stacked])
    else:
        pixels = np.stack([im.pixels for im in stacked]).astype(np.float32, copy=False)  # type: ignore[misc]
    volume = _volume(case, pixels, kept_ds[0], gap)
    skipped.sort(key=lambda s: s.path)
    return volume, skipped


def _in_order(frames: np.ndarray, order: list[int]) -> np.ndarray:
    """``frames[order]``, reordered in place rather than copied (a multi-frame volume may be 1 GiB).

    ``order`` lists distinct frame indices; frames it leaves out end up past ``len(order)``.
    """
    listed = set(order)
    target = order + [i for i in range(frames.shape[0]) if i not in listed]
    done = [False] * len(target)
    for start, source in enumerate(target):
        if done[start] or source == start:
            continue
        first = frames[start].copy()
        here = start
        while target[here] != start:  # follow the cycle: each slot takes the frame it wants
            frames[here] = frames[target[here]]
            done[here] = True
            here = target[here]
        frames[here] = first
        done[here] = True
    return frames[: len(order)]


def _load_selected(
    case: CaseRef, read: list[tuple[int, Path, Dataset]], select: Callable[[int], Iterable[int]]
) -> tuple[Volume, list[SkippedFile]] | None:
    """The volume of single-frame grayscale files read in full, with only the selected slices decoded.

    The stack is built as :func:`load_volume` builds it from decoded files, from the same headers
    (shape from Rows and Columns). Returns None where a full decode must decide: a file that is not
    one grayscale image, geometry that does not parse, or a selected slice that does not decode to
    its header's shape.
    """
    if any(mosaic_count(ds) for _, _, ds in read):
        return None  # a mosaic is one file of many slices: decoded whole
    geometry = {index: _geometry(ds) for index, _, ds in read}
    known = {index: g for index, g in geometry.items() if g is not None}
    if len(known) < len(geometry):
        return None
    return _selected_volume(case, known, select, {index: ds for index, _, ds in read})


def _load_by_geometry(case: CaseRef, select: Callable[[int], Iterable[int]]) -> tuple[Volume, list[SkippedFile]] | None:
    """As :func:`_load_selected`, from the geometry the scan recorded: only the selected files are read."""
    if len(case.geometry) != len(case.files) or any(g is None for g in case.geometry):
        return None
    return _selected_volume(case, dict(enumerate(case.geometry)), select, {})  # type: ignore[arg-type]


def _selected_volume(
    case: CaseRef,
    geometry: dict[int, SliceGeometry],
    select: Callable[[int], Iterable[int]],
    read: dict[int, Dataset],
) -> tuple[Volume, list[SkippedFile]] | None:
    """Order files by ``geometry`` (file index -> geometry), then read and decode the selected slices.

    ``read`` holds the datasets already read in full, by file index; a file not in it is read now,
    and must still have the geometry it was scanned with. None: a full decode must decide.
    """
    shapes = Counter((g.rows, g.columns) for g in geometry.values())
    majority = shapes.most_common(1)[0][0]
    inconsistent: list[SkippedFile] = []
    images: list[_Image] = []
    kept: list[int] = []
    for index, g in geometry.items():
        if (g.rows, g.columns) != majority:
            inconsistent.append(_inconsistent(case.files[index], (g.rows, g.columns), majority))
            continue
        position = None if g.position is None else np.array(g.position, dtype=np.float64)
        orientation = None if g.orientation is None else np.array(g.orientation, dtype=np.float64)
        images.append(_Image(None, position, orientation, (g.instance, g.acquisition, index, 0)))
        kept.append(index)
    stacked, gap = _stack(images)
    depth = len(stacked)
    # a selection by millimetres (it says so with ``takes_gap``) is given the gap of the ordered stack
    chosen = select(depth, gap_mm=gap) if getattr(select, "takes_gap", False) else select(depth)  # type: ignore[call-arg]
    wanted = sorted({int(i) for i in chosen})
    if any(not 0 <= i < depth for i in wanted):
        raise ValueError(f"select gave slice indices {wanted} for a stack of {depth}")
    pixels = np.zeros((depth, *majority), dtype=np.float32)  # untouched pages cost no memory
    for i in wanted:
        index = stacked[i].order[2]
        try:
            ds = read.get(index)
            if ds is None:
                ds = _read_full(case.files[index])
                if _geometry(ds) != geometry[index]:  # the file changed since it was scanned
                    return None
                read[index] = ds
            decoded = _decode(ds)
        except Exception:  # noqa: BLE001 - decode everything: the full path skips the file with the reason
            return None
        if decoded.shape != (1, *majority):
            return None
        pixels[i] = decoded[0]
    ref = read.get(kept[0])
    if ref is None and kept[0] == case.header_index:
        ref = case.header
    if ref is None:
        try:
            ref = _read_header(case.files[kept[0]]).ds
        except Exception:  # noqa: BLE001 - as above
            return None
    volume = _volume(case, pixels, ref, gap, decoded=tuple(wanted))
    return volume, inconsistent


def _inconsistent(path: Path, shape: tuple[int, ...], majority: tuple[int, ...]) -> SkippedFile:
    detail = f"image shape {shape} differs from the case's {majority}"
    logger.info("skip %s: %s", path, detail)
    return SkippedFile(path, SkipReason.INCONSISTENT_SERIES, detail)


def _volume(
    case: CaseRef, pixels: np.ndarray, ref: Dataset, gap: float | None, decoded: tuple[int, ...] | None = None
) -> Volume:
    """The volume of stacked ``pixels``, its spacing from the stack's ``gap`` and the header ``ref``."""
    z = gap if gap is not None and gap > 0 else None
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        z = z or _positive(_spacing_attr(ref, keyword))
    in_plane = _spacing_attr(ref, "PixelSpacing") or _get(ref, "ImagerPixelSpacing")
    y = x = None
    if isinstance(in_plane, (list, tuple, pydicom.multival.MultiValue)) and len(in_plane) == 2:
        y, x = _positive(in_plane[0]), _positive(in_plane[1])
    return Volume(
        pixels=pixels,
        spacing=(z or 1.0, y or 1.0, x or 1.0),
        # a defined term only: a free-text Modality could carry a name into a query's answer
        modality=modality_term(_str(case.header, "Modality")) or "OT",
        rgb=pixels.ndim == 4,
        decoded=decoded,
        window=display_window(case.header),
        z_known=z is not None,
    )


def _spacing_attr(ds: Dataset, keyword: str) -> Any:
    """A spacing attribute at top level, else in the Pixel Measures functional group."""
    value = _get(ds, keyword)
    if value in (None, "") and _is_enhanced(ds):
        item = _group_item(ds, 0, "PixelMeasuresSequence")
        value = _get(item, keyword) if item is not None else None
    return value


def _positive(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


# --------------------------------------------------------------------------------------------
# A query study

_ADVICE = {
    SkipReason.NOT_DICOM: "give a DICOM file or a series folder",
    SkipReason.NO_PIXEL_DATA: "give a DICOM image (CT, MR, CR, US...), not a report or RT object",
    SkipReason.TRUNCATED: "copy the file again from its archive or PACS",
    SkipReason.UNREADABLE: "check that the file is readable and is DICOM",
    SkipReason.UNSUPPORTED_TRANSFER_SYNTAX: (
        "install the decoder plugin or convert the file to Explicit VR Little Endian"
    ),
    SkipReason.DECODE_ERROR: "convert the file to Explicit VR Little Endian or give another study",
    SkipReason.DUPLICATE: "remove the copy",
    SkipReason.INCONSISTENT_SERIES: "give one series folder",
    SkipReason.TOO_LARGE: "give a smaller study, or check that the file is not damaged",
    SkipReason.CODESTREAM_MISMATCH: "copy the file again from its archive or PACS; it is damaged",
    SkipReason.NOT_AN_IMAGE: "give a DICOM image (CT, MR, CR, US...), not a report, segmentation or RT object",
    SkipReason.NOT_A_FILE: "give a regular file or a folder of them",
    SkipReason.BROKEN_LINK: "repair the link or give the file it should point to",
    SkipReason.SYMLINK_LOOP: "give the folder itself, not a link that leads back into it",
}


def _skip_message(skip: SkippedFile) -> str:
    if skip.reason is SkipReason.NOT_DICOM:
        return (
            f"{skip.path} is not a DICOM file (no 'DICM' marker and no readable header); "
            f"{_ADVICE[skip.reason]}"
        )
    what = {
        SkipReason.NO_PIXEL_DATA: "holds no image",
        SkipReason.NOT_AN_IMAGE: "holds no image",
        SkipReason.TRUNCATED: "is truncated",
        SkipReason.UNREADABLE: "cannot be read",
        SkipReason.UNSUPPORTED_TRANSFER_SYNTAX: "cannot be decoded here",
        SkipReason.TOO_LARGE: "is too large",
    }.get(skip.reason, f"was skipped ({skip.reason.value})")
    advice = _ADVICE.get(skip.reason, "give a DICOM file or a series folder")
    return f"{skip.path} {what}: {skip.detail}; {advice}"


def load_study(
    path: Path | str,
    *,
    load: Callable[[CaseRef], tuple[Volume, list[SkippedFile]]] | None = None,
    min_size: int = MIN_IMAGE_SIZE,
) -> tuple[CaseRef, Volume]:
    """Load one query study: a DICOM file or a folder that holds one series.

    Parameters
    ----------
    path : Path or str
        A DICOM file, or a folder with the files of one series (other files, such as a
        LICENSE or a report, are skipped).
    load : callable, optional
        The decoder of the study's case (default :func:`load_volume`), as ``build_index`` takes one.
    min_size : int
        The smallest image side kept (an index's ``index.min_image_size``; see :func:`scan`).

    Returns
    -------
    CaseRef
        The case found by :func:`scan`.
    Volume
        Its pixels, from :func:`load_volume`.

    Raises
    ------
    InvalidStudyError
        If the path does not exist, holds no file, holds no DICOM image (the message gives the
        reason for the first file: not DICOM, no pixel data with its SOP class, truncated,
        unsupported transfer syntax), or holds several series, or several volumes of one series
        (multi-frame objects, mosaics).
    LoadFailure
        If no file of the series decodes (a subclass of InvalidStudyError).
    """
    path = Path(path)
    files = list(find_files(path))
    if not files:
        raise InvalidStudyError(f"{path} holds no files; give a DICOM file or a series folder")
    result = scan(files, min_size=min_size)
    if not result.cases:
        if len(result.skipped) == 1:
            raise InvalidStudyError(_skip_message(result.skipped[0]))
        counts = Counter(s.reason.value for s in result.skipped)
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        raise InvalidStudyError(
            f"{path} holds no loadable DICOM image ({len(files)} files: {summary}); "
            f"first: {_skip_message(result.skipped[0])}"
        )
    if len(result.cases) > 1:
        series = {(c.study_uid, c.series_uid) for c in result.cases}
        if len(series) == 1:  # one series of several multi-frame objects or mosaics, each a volume
            raise InvalidStudyError(
                f"{path} holds one series of {len(result.cases)} multi-frame or mosaic files, each a volume of "
                "its own; give one of its files"
            )
        raise InvalidStudyError(
            f"{path} holds {len(series)} series; give one series folder or one file"
        )
    case = result.cases[0]
    volume, skipped = (load or load_volume)(case)
    for skip in result.skipped + skipped:
        logger.info("%s left out of the study: %s (%s)", skip.path, skip.reason.value, skip.detail)
    return case, volume
