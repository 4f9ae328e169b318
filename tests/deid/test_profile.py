"""Tests of medsearch.deid.profile: the PS3.15 policy table against the standard's."""

from __future__ import annotations

import csv
from dataclasses import fields, replace
from pathlib import Path

import pytest
from deid.headers import _NONE
from pydicom.datadict import tag_for_keyword

from medsearch.deid import (
    ATTRIBUTE_ACTIONS,
    OPTION_ACTIONS,
    STRICTER_THAN_PROFILE,
    DeidOptions,
    profile_action,
)

DATA = Path(__file__).parents[1] / "data"

# --------------------------------------------------------------------------------------------
# Tables of cases
# --------------------------------------------------------------------------------------------

# Each option column of the transcribed table, and the options that turn on just that option.
OPTION_COLUMNS = {
    "basic_action": _NONE,
    "retain_patient_chars_action": replace(_NONE, retain_patient_characteristics=True),
    "retain_device_action": replace(_NONE, retain_device_identity=True),
    "retain_long_modif_dates_action": replace(_NONE, longitudinal_dates=True),
    "clean_desc_action": replace(_NONE, clean_descriptors=True),
}

# How much each action removes: an action may differ from the profile's only by removing more.
STRICTNESS = {"K": 0, "C": 1, "U": 1, "D": 2, "Z": 2, "X": 2}


def _read_profile_table() -> list[dict[str, str]]:
    with open(DATA / "ps3_15_annex_e_subset.csv", newline="", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


PROFILE_ROWS = _read_profile_table()
PROFILE_CASES = [(row, column) for row in PROFILE_ROWS for column in OPTION_COLUMNS]
PROFILE_IDS = [f"{row['keyword']}-{column}" for row, column in PROFILE_CASES]

# --------------------------------------------------------------------------------------------
# The policy against PS3.15 Table E.1-1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "column"), PROFILE_CASES, ids=PROFILE_IDS)
def test_profile_action_agrees_with_annex_e(row, column):
    standard = row[column].split("/")[0]  # of "X/Z/D" medsearch takes the strictest, the first
    ours = profile_action(row["keyword"], OPTION_COLUMNS[column])
    if ours != standard:
        assert row["keyword"] in STRICTER_THAN_PROFILE, f"{row['keyword']}: {ours} vs {row[column]}"
        assert STRICTNESS[ours] > STRICTNESS[standard]


@pytest.mark.parametrize("row", PROFILE_ROWS, ids=[r["keyword"] for r in PROFILE_ROWS])
def test_transcribed_row_is_consistent(row):
    group, element = (int(x, 16) for x in row["tag"].strip("()").split(","))
    assert tag_for_keyword(row["keyword"]) == (group << 16) | element
    assert ATTRIBUTE_ACTIONS[row["keyword"]] == ATTRIBUTE_ACTIONS[(group, element)]
    assert profile_action((group, element), _NONE) == profile_action(row["keyword"], _NONE)
    if row["in_table_e1_1"] == "no":
        assert {row[c] for c in OPTION_COLUMNS} == {"K"}


def test_every_listed_attribute_is_in_the_transcribed_table():
    transcribed = {row["keyword"] for row in PROFILE_ROWS}
    listed = {k for k in ATTRIBUTE_ACTIONS if isinstance(k, str)}
    listed |= {k for table in OPTION_ACTIONS.values() for k in table}
    assert listed <= transcribed


@pytest.mark.parametrize("keyword", sorted(STRICTER_THAN_PROFILE))
def test_each_stated_deviation_is_used(keyword):
    row = next(r for r in PROFILE_ROWS if r["keyword"] == keyword)
    assert any(
        profile_action(keyword, options) != row[column].split("/")[0]
        for column, options in OPTION_COLUMNS.items()
    )


def test_option_tables_match_option_fields():
    assert set(OPTION_ACTIONS) == {f.name for f in fields(DeidOptions)}


@pytest.mark.parametrize(
    ("keyword", "options", "expected"),
    [
        ("PatientName", DeidOptions(True, True, True, True), "Z"),
        ("PatientSex", DeidOptions(), "K"),
        ("PatientSex", _NONE, "Z"),
        ("ManufacturerModelName", DeidOptions(), "C"),  # kept only as a term of the model vocabulary
        ("ManufacturerModelName", _NONE, "X"),
        ("DeviceSerialNumber", DeidOptions(), "X"),
        ("StationName", DeidOptions(), "X"),
        ("StudyDate", DeidOptions(longitudinal_dates=True), "C"),
        ("SeriesDate", DeidOptions(longitudinal_dates=True), "X"),
        ("StudyDescription", DeidOptions(clean_descriptors=True), "C"),
        ("StudyInstanceUID", DeidOptions(), "U"),
        ("PixelSpacing", DeidOptions(), "X"),  # not listed: removed
        ((0x0009, 0x1010), DeidOptions(), "X"),  # private
        ((0x0010, 0x0010), _NONE, "Z"),
    ],
)
def test_profile_action_examples(keyword, options, expected):
    assert profile_action(keyword, options) == expected


@pytest.mark.parametrize(
    ("keyword", "message"),
    [
        ("PatientNmae", "not a DICOM keyword"),
        ("", "not a DICOM keyword"),
        ((0x0010,), "not a \\(group, element\\) pair"),
        (("0010", "0010"), "not a \\(group, element\\) pair"),
    ],
)
def test_profile_action_rejects_unknown_names(keyword, message):
    with pytest.raises(ValueError, match=message):
        profile_action(keyword, DeidOptions())
