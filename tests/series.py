"""Synthetic CT series written in tmp_path: a phantom of bright and dark blobs whose slices change
along z, so that each slice of a series looks unlike its neighbours a few slices away and unlike the
slices of another phantom. Written as one file per slice (positions along z) or as one classic
multi-frame file (the slice gap in Slice Thickness)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def phantom(seed: int, *, depth: int = 24, size: int = 64) -> np.ndarray:
    """A ``(depth, size, size)`` int16 volume in HU: a soft-tissue disc with blobs of fat, bone and air."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")
    centre = size / 2
    body = ((y - centre) ** 2 + (x - centre) ** 2) < (0.42 * size) ** 2
    volume = np.where(body, 40.0, -1000.0)
    for _ in range(14):
        cz, cy, cx = rng.uniform(0, depth), rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size
        radius = rng.uniform(0.06, 0.16) * size
        value = rng.choice([-900.0, -100.0, 300.0, 900.0])
        blob = ((z - cz) * 2.0) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        volume = np.where(blob & body, value, volume)
    return volume.astype(np.int16)


def _dataset(path: Path, pixels: np.ndarray, *, study: str, series: str, patient: str, gap: float) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = patient, "SYNTHETIC^PHANTOM"
    ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = gap
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    return ds


def write_series(folder: Path, volume: np.ndarray, *, gap: float = 2.5, seed: int = 0) -> Path:
    """``volume`` as a series of one file per slice in ``folder`` (slice i at z = i * gap mm)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(entropy_srcs=[f"study{seed}"]), generate_uid(entropy_srcs=[f"series{seed}"])
    for i, image in enumerate(volume):
        path = folder / f"slice{i:03d}.dcm"
        ds = _dataset(path, image, study=study, series=series, patient=f"PHANTOM{seed}", gap=gap)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, i * gap]
        ds.save_as(path, enforce_file_format=True)
    return folder


def write_multiframe(path: Path, volume: np.ndarray, *, gap: float = 2.5, seed: int = 0) -> Path:
    """``volume`` as one classic multi-frame file (frames in slice order, ``gap`` as Slice Thickness)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _dataset(path, volume, study=generate_uid(entropy_srcs=[f"study{seed}"]),
                  series=generate_uid(entropy_srcs=[f"mf{seed}"]), patient=f"PHANTOM{seed}", gap=gap)
    ds.NumberOfFrames = len(volume)
    ds.InstanceNumber = 1
    ds.save_as(path, enforce_file_format=True)
    return path


__all__ = ["phantom", "phantom_archive", "write_multiframe", "write_series"]


def phantom_archive(folder: Path, *, n: int = 3, gap: float = 2.5) -> Path:
    """``n`` phantom series (seeds 0 to n - 1), one folder each: ``folder/s0``, ``folder/s1``..."""
    for seed in range(n):
        write_series(folder / f"s{seed}", phantom(seed), gap=gap, seed=seed)
    return folder
