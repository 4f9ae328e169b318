"""DICOM studies for the PACS tests: the shipped sample, copies with new UIDs, the UIDs that must never leak."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

SAMPLE = Path(__file__).resolve().parents[2] / "medsearch" / "data" / "sample" / "tcga-luad-ct"


def sample_files() -> list[Path]:
    return sorted(SAMPLE.glob("*.dcm"))


def uids_of(paths: list[Path]) -> set[str]:
    """Every Study, Series and SOP Instance UID of ``paths`` (what must never leave the site)."""
    found = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return found


def new_studies(folder: Path, count: int, *, seed: str) -> list[Path]:
    """``count`` single-slice CT studies: sample slices with new UIDs, written into ``folder``."""
    out = []
    for n, source in enumerate(sample_files()[:count]):
        ds = copy.deepcopy(pydicom.dcmread(source))
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, str(n), "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, str(n), "series"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(n), "sop"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{seed}-{n}.dcm"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)
        out.append(path)
    return out


def one_series(folder: Path, count: int, *, seed: str, syntax: str = "") -> list[Path]:
    """One CT series of ``count`` slices 2.5 mm apart (sample slices with new UIDs and positions), written
    into ``folder``; ``syntax`` "rle" stores it RLE Lossless (encapsulated)."""
    from pydicom.uid import RLELossless

    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    sources = [pydicom.dcmread(path) for path in sample_files()]
    layout = ("Rows", "Columns", "BitsAllocated", "PixelRepresentation", "RescaleSlope", "RescaleIntercept")
    same = [ds for ds in sources if all(ds.get(k) == sources[0].get(k) for k in layout)]
    for n in range(count):
        # one patient and study (the first slice's header), each slice the pixels of another sample slice
        ds = copy.deepcopy(sources[0])
        ds.PixelData = same[n % len(same)].PixelData
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(n), "sop"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [-170.0, -170.0, -100.0 + 2.5 * n]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if syntax == "rle":
            ds.compress(RLELossless)
        path = folder / f"{seed}-{count - n:03d}.dcm"  # not in slice order: the engine orders them
        ds.save_as(path)
        out.append(path)
    return out
