"""Tests of medsearch.io.dicom.stack: the order of slices in a volume, and the slice geometry a scan records."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medsearch.io.dicom import (
    CaseRef,
    load_volume,
    scan,
)


@pytest.fixture
def series(
    testfile: Callable[[str], Path],
    write_dicom: Callable[[pydicom.Dataset, Path], Path],
) -> Callable[[Path, list[dict[str, object]]], CaseRef]:
    """A series of MR_small copies; each row's pixels are filled with its InstanceNumber."""

    def make(tmp_path: Path, rows: list[dict[str, object]]) -> CaseRef:
        series = generate_uid()
        base = pydicom.dcmread(testfile("MR_small.dcm"))
        for i, row in enumerate(rows):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), series
            for keyword, value in row.items():
                if value is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            ds.PixelData = np.full(
                (64, 64), int(ds.InstanceNumber), dtype=base.pixel_array.dtype
            ).tobytes()
            write_dicom(ds, tmp_path / f"f{i}.dcm")
        (case,) = scan(tmp_path).cases
        return case

    return make


def test_slices_sorted_by_position_not_instance(
    tmp_path: Path,
    series: Callable[[Path, list[dict[str, object]]], CaseRef],
) -> None:
    # positions along z with uneven gaps 2, 3, 5; InstanceNumbers disagree with position order
    zs, instances = [10.0, 0.0, 5.0, 2.0], [1, 2, 3, 4]
    case = series(
        tmp_path,
        [{"ImagePositionPatient": [0, 0, z], "InstanceNumber": n} for z, n in zip(zs, instances)],
    )
    vol, _ = load_volume(case)
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [2, 4, 3, 1]
    assert vol.spacing[0] == pytest.approx(3.0)  # median gap


def test_tilted_orientation_sorts_along_normal(
    tmp_path: Path,
    series: Callable[[Path, list[dict[str, object]]], CaseRef],
) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    orientation = [1, 0, 0, 0, c, s]
    normal = np.cross(orientation[:3], orientation[3:])
    rows = [
        {
            "ImageOrientationPatient": orientation,
            "ImagePositionPatient": list(normal * d + [7 * d, 0, 0]),
            "InstanceNumber": n,
        }
        for n, d in [(1, 6.0), (2, -3.0), (3, 0.0)]
    ]
    vol, _ = load_volume(series(tmp_path, rows))
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [2, 3, 1]


def test_instance_number_orders_without_positions(
    tmp_path: Path,
    series: Callable[[Path, list[dict[str, object]]], CaseRef],
) -> None:
    rows = [{"ImagePositionPatient": None, "InstanceNumber": n} for n in (3, 1, 2)]
    vol, _ = load_volume(series(tmp_path, rows))
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [1, 2, 3]
    assert vol.spacing[0] == pytest.approx(0.8)  # Slice Thickness of MR_small


def test_one_image_per_position_first_by_instance(
    tmp_path: Path,
    series: Callable[[Path, list[dict[str, object]]], CaseRef],
) -> None:
    # two time points at two positions: the volume keeps the lower InstanceNumber per position
    rows = [
        {"ImagePositionPatient": [0, 0, z], "InstanceNumber": n}
        for z, n in [(0, 4), (0, 2), (3, 1), (3, 3)]
    ]
    vol, skipped = load_volume(series(tmp_path, rows))
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [2, 1]
    assert skipped == []


def test_slice_geometry_survives_its_list_form() -> None:
    from medsearch.io import SliceGeometry

    for g in (SliceGeometry(512, 512, (0.0, -1.5, 2.25), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 3.0, math.inf),
              SliceGeometry(10, 20, None, None, math.inf, 7.0)):
        assert SliceGeometry.from_list(json.loads(json.dumps(g.to_list()))) == g
