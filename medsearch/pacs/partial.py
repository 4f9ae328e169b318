"""Fetching only the instances a case needs: every header from WADO-RS metadata, the pixels of a few.

A 2D encoder sees a few slices of a series (and the thumbnail its middle one); the indexing engine
orders the series from the headers its scan read, then reads and decodes only the selected files
(:func:`medsearch.io.load_volume` with ``select``). So a series needs, from the server:

1. every instance's header, to group and order it as the engine will: the series metadata
   (one WADO-RS request, DICOM JSON, bulk data left out), written as **header-only files**:
   the header, then a pixel data element whose value is never fetched (a sparse run of zero bytes
   of the declared length, or an empty encapsulated value), so that the engine's scan sees the
   same instance, image size, slice geometry and transfer syntax as in the stored file;
2. the whole instance (bytes as stored) of each slice the engine will decode, of the first file of
   each case (whose header gives the case's metadata row) and of the middle slice (the thumbnail).

:func:`needed_files` runs the engine's own scan and grouping on the header-only files and orders each
case's stack as the loader does, to tell which files those are; it returns None where the engine
would read every file (a multi-frame or mosaic instance, a file without slice geometry), and the
series is then fetched whole. :func:`fetch_series` in :mod:`medsearch.pacs.fetch` drives this.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from medsearch.io import group_headers, summarize_file
from medsearch.io.dicom.stack import _Image, _stack

__all__ = ["SlicePlan", "header_only_file", "metadata_bytes", "needed_files", "partial_candidate", "sop_uid"]

# DICOM JSON tags (upper-case hex) read here
_SOP_INSTANCE = "00080018"
_IMAGE_TYPE = "00080008"
_FRAMES = "00280008"
_TRANSFER_SYNTAX = "00020010"
_AVAILABLE_SYNTAX = "00083002"
_PIXEL_JSON = ("7FE00008", "7FE00009", "7FE00010")
_PIXEL_DATA = 0x7FE00010
# Fewer instances than this: the series is fetched whole (the metadata request would save nothing).
MIN_INSTANCES = 3


@dataclass(frozen=True)
class SlicePlan:
    """What the engine will read of a case: ``select`` as :func:`medsearch.io.load_volume` takes it
    (given the stack depth, and the slice gap when it has a true ``takes_gap``), and the scan's
    smallest image side (``index.min_image_size``)."""

    select: Callable[..., Iterable[int]]
    min_size: int

    def worth_it(self, n_instances: int) -> bool:
        """Whether a series of ``n_instances`` is better fetched in part: at most half its instances
        would be fetched whole. Each instance is one request, and the metadata one more, which a
        server answers by reading every instance: for a short series one request for it all costs
        less. A selection by millimetres, whose count depends on the slice gap, counts as needing
        16 instances."""
        if n_instances < MIN_INSTANCES:
            return False
        if getattr(self.select, "takes_gap", False):
            return n_instances >= 2 * 16
        chosen = {int(i) for i in self.select(n_instances)} | {n_instances // 2, 0}
        return 2 * len(chosen) <= n_instances


def sop_uid(item: dict[str, Any]) -> str:
    """The SOP Instance UID of a DICOM JSON instance ("" when absent)."""
    values = item.get(_SOP_INSTANCE, {}).get("Value") or [""]
    return str(values[0] or "")


def partial_candidate(items: list[dict[str, Any]]) -> bool:
    """Whether a series' metadata allows fetching a subset: enough instances, each with its own SOP
    Instance UID, all single-frame and none a mosaic (those are decoded whole by the engine)."""
    uids = [sop_uid(item) for item in items]
    if len(items) < MIN_INSTANCES or not all(uids) or len(set(uids)) != len(uids):
        return False
    for item in items:
        frames = (item.get(_FRAMES, {}).get("Value") or [1])[0]
        try:
            if int(frames or 1) > 1:
                return False
        except (TypeError, ValueError):
            return False
        kinds = item.get(_IMAGE_TYPE, {}).get("Value") or []
        if any(str(kind).upper() == "MOSAIC" for kind in kinds):
            return False
    return True


def metadata_bytes(items: list[dict[str, Any]]) -> int:
    """About how many bytes the metadata answer held (its JSON, written compactly)."""
    return len(json.dumps(items, separators=(",", ":")).encode())


def header_only_file(item: dict[str, Any], path: Path, transfer_syntax: UID) -> None:
    """Write the instance ``item`` (DICOM JSON) to ``path`` as a header-only file (see the module).

    ``transfer_syntax`` is the instance's as stored, when the metadata does not give it.

    Raises
    ------
    ValueError
        The header cannot be written in that transfer syntax (big endian, deflated) or does not convert.
    """
    syntax = _syntax_of(item) or transfer_syntax
    if syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        raise ValueError("a header-only file is written little endian and not deflated")
    ds = Dataset.from_json(_without_bulk({k: v for k, v in item.items() if k not in _PIXEL_JSON and not k.startswith("0002")}))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    implicit = syntax == ImplicitVRLittleEndian
    bits = int(ds.get("BitsAllocated") or 16)
    if syntax.is_encapsulated:  # an empty value: its item and delimiter, no fragment
        element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
        element += struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        length = 0
    else:
        samples = int(ds.get("SamplesPerPixel") or 1)
        length = int(ds.Rows) * int(ds.Columns) * samples * ((bits + 7) // 8)
        length += length % 2
        if implicit:
            element = struct.pack("<HHL", 0x7FE0, 0x0010, length)
        else:
            element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", 0, length)
    partial = path.with_name(f".{path.name}.part")
    with partial.open("wb") as fp:
        fp.write(buffer.getbuffer())
        fp.write(element)
        fp.truncate(fp.tell() + length)  # the pixel value: a hole, never written nor fetched
    os.replace(partial, path)


def _without_bulk(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` with each bulk data reference (not fetched) made an empty value, in sequences too.

    Done here rather than with a handler given to pydicom, which inspects the handler once per element.
    """
    out: dict[str, Any] = {}
    for tag, element in item.items():
        if "BulkDataURI" in element:
            out[tag] = {"vr": element.get("vr", "UN")}
        elif element.get("vr") == "SQ" and element.get("Value"):
            out[tag] = {**element, "Value": [_without_bulk(child) for child in element["Value"]]}
        else:
            out[tag] = element
    return out


def _syntax_of(item: dict[str, Any]) -> UID | None:
    for tag in (_TRANSFER_SYNTAX, _AVAILABLE_SYNTAX):
        values = item.get(tag, {}).get("Value")
        if values and len(values) == 1 and values[0]:
            return UID(str(values[0]))
    return None


def needed_files(files: list[Path], plan: SlicePlan) -> set[Path] | None:
    """The files (of one series' header-only and fetched files) whose pixels the engine will read.

    The engine's scan (:func:`~medsearch.io.summarize_file`, :func:`~medsearch.io.group_headers`)
    groups them into cases; each case is ordered by its slice geometry as
    :func:`~medsearch.io.load_volume` orders it, and ``plan.select`` picks the slices. Added: the
    first file of each case and the first of its stack's image size (the headers the case's row and
    spacing come from), and the middle slice (the thumbnail); and each file the scan leaves out, so that
    the stored instance, not its header-only file, is what the engine judges. None: the engine would
    read every file.
    """
    summaries = [summarize_file(path, min_size=plan.min_size) for path in files]
    cases, skipped = group_headers(summaries)
    wanted: set[Path] = {skip.path for skip in skipped}
    for case in cases:
        if len(case.files) == 1:
            wanted.add(case.files[0])
            continue
        if any(g is None for g in case.geometry):
            return None
        wanted |= _case_needs(case.files, case.geometry, plan)
    return wanted


def _case_needs(files: tuple[Path, ...], geometry: tuple[Any, ...], plan: SlicePlan) -> set[Path]:
    """As :func:`medsearch.io.dicom.study._selected_volume` orders and selects, without reading a file."""
    shapes: dict[tuple[int, int], int] = {}
    for g in geometry:
        shapes[(g.rows, g.columns)] = shapes.get((g.rows, g.columns), 0) + 1
    majority = max(shapes.items(), key=lambda pair: pair[1])[0]  # the first of the most common, as Counter
    images = []
    for index, g in enumerate(geometry):
        if (g.rows, g.columns) != majority:
            continue
        position = None if g.position is None else _array(g.position)
        orientation = None if g.orientation is None else _array(g.orientation)
        images.append(_Image(None, position, orientation, (g.instance, g.acquisition, index, 0)))
    stacked, gap = _stack(images)
    depth = len(stacked)
    select = plan.select
    chosen = select(depth, gap_mm=gap) if getattr(select, "takes_gap", False) else select(depth)
    slices = {int(i) for i in chosen if 0 <= int(i) < depth} | {depth // 2}
    indices = {stacked[i].order[2] for i in slices} | {0, images[0].order[2]}
    return {files[int(i)] for i in indices}


def _array(values: tuple[float, ...]) -> np.ndarray:
    return np.array(values, dtype=np.float64)
