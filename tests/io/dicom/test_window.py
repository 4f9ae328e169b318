"""Tests of medsearch.io.dicom.window: the window a CT picture is shown in (issue 17)."""

from __future__ import annotations

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from medsearch.io.dicom.window import WINDOWS, display_window


def _ct(body_part: str = "", centers: object = None, widths: object = None, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    if centers is not None:
        ds.WindowCenter, ds.WindowWidth = centers, widths
    return ds


WINDOW_CASES = [
    # body part, the file's window(s), what the picture is shown in
    ("HEAD", None, WINDOWS["brain"]),
    ("HEAD", ([35], [100]), (35.0, 100.0)),  # the file's own brain window
    ("HEAD", ([40], [400]), WINDOWS["brain"]),  # a soft-tissue window is not of the head's kind
    ("CHEST", ([40, -550], [400, 1800]), (-550.0, 1800.0)),  # of two, the lung one
    ("LUNG", ([40], [400]), WINDOWS["lung"]),
    ("LSPINE", None, WINDOWS["bone"]),
    ("ABDOMEN", ([60], [360]), (60.0, 360.0)),  # not in the table: the file's own
    ("ABDOMEN", None, None),  # nothing known: the index's window
    ("", ([50], [350]), (50.0, 350.0)),
    ("HEAD", ([40], [0]), WINDOWS["brain"]),  # a width that is no width
]


@pytest.mark.parametrize(("part", "own", "expected"), WINDOW_CASES)
def test_ct_window_by_body_part_and_own_values(part, own, expected):
    ds = _ct(part, *(own or (None, None)))
    assert display_window(ds) == expected


def test_window_values_that_are_not_numbers_are_ignored():
    ds = _ct("HEAD")
    ds[0x00281050] = RawDataElement(BaseTag(0x00281050), "DS", 4, b"abc ", 0, False, True)
    ds[0x00281051] = RawDataElement(BaseTag(0x00281051), "DS", 4, b"1e9x", 0, False, True)
    assert display_window(ds) == WINDOWS["brain"]
    assert display_window(_ct("", [float("nan")], [400])) is None


def test_only_ct_is_windowed():
    assert display_window(_ct("HEAD", [40], [80], modality="MR")) is None


def test_enhanced_ct_window_comes_from_its_functional_groups():
    ds = _ct("CHEST")
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = -500, 1400
    group = Dataset()
    group.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [group]
    assert display_window(ds) == (-500.0, 1400.0)
