"""Query filters (``--where``): parsing, and which cases of a table each filter keeps."""

from __future__ import annotations

import pandas as pd
import pytest

from medsearch.errors import FilterError
from medsearch.filters import Filter, FilterOp, filter_mask, parse_filters

PARSED = [
    ("modality=CT", ("modality", FilterOp.EQ, "CT")),
    ("modality == CT", ("modality", FilterOp.EQ, "CT")),
    (" age_band >= 60 ", ("age_band", FilterOp.GE, "60")),
    ("age<=69.5", ("age", FilterOp.LE, "69.5")),
    ("n_slices>1", ("n_slices", FilterOp.GT, "1")),
    ("n_slices<3", ("n_slices", FilterOp.LT, "3")),
    ("sex!=F", ("sex", FilterOp.NE, "F")),
    ("model~light speed", ("model", FilterOp.CONTAINS, "light speed")),
    ("manufacturer='GE MEDICAL'", ("manufacturer", FilterOp.EQ, "GE MEDICAL")),
    ("note=a=b", ("note", FilterOp.EQ, "a=b")),
]


@pytest.mark.parametrize("text, expected", PARSED)
def test_filters_parse_into_field_operator_value(text, expected):
    f = Filter.parse(text)
    assert (f.field, f.op, f.value) == expected


BAD_FILTERS = [
    ("modality", "has no operator"),
    ("", "has no operator"),
    ("=CT", "names no field"),
    ("modality=", "has no value"),
    ("age>=sixty", "compares numbers, and 'sixty' is not one"),
    ("age<nan", "is not one"),
]


@pytest.mark.parametrize("text, message", BAD_FILTERS)
def test_bad_filters_say_what_to_write(text, message):
    with pytest.raises(FilterError, match=message):
        parse_filters(text)


def test_filter_objects_and_strings_mix_and_operators_accept_their_text():
    assert parse_filters([Filter("age", ">=", "60"), "modality=CT"]) == (
        Filter("age", FilterOp.GE, "60"), Filter("modality", FilterOp.EQ, "CT"))
    with pytest.raises(FilterError, match="operator '=>' is unknown"):
        Filter("age", "=>", "60")


TABLE = pd.DataFrame({
    "case_id": ["a", "b", "c", "d", "e"],
    "modality": ["CT", "MR", "CT", "ct", None],
    "age_band": ["60-69", "90+", None, "50-59", "70-79"],
    "Contrast": [True, False, True, None, False],
    "n_slices": [1, 3, 2, 1, 40],
    "model": ["LightSpeed Ultra", None, "Discovery STE", "x", "LightSpeed 16"],
})

MASKS = [
    ("modality=CT", "a c d"),  # case-insensitive text
    ("modality!=CT", "b"),  # a missing value matches nothing, not even !=
    ("age>=60", "a b e"),  # an age band counts as its lower bound
    ("age_band>=60", "a b e"),
    ("age<60", "d"),
    ("age>65", "b e"),
    ("age<=60", "a d"),
    ("age=65", "a"),  # a number equals the band holding it
    ("age=95", "b"),
    ("age_band=60-69", "a"),
    ("Contrast=True", "a c"),
    ("contrast=true", "a c"),  # field names fall back to case-insensitive
    ("Contrast=1", "a c"),
    ("Contrast!=True", "b e"),
    ("n_slices>1", "b c e"),
    ("n_slices=1.0", "a d"),
    ("n_slices<=2", "a c d"),
    ("model~light", "a e"),
    ("model~SPEED 16", "e"),
    ("case_id=c", "c"),
]


@pytest.mark.parametrize("where, expected", MASKS)
def test_filter_masks(where, expected):
    mask = filter_mask(TABLE, parse_filters(where))
    assert " ".join(TABLE["case_id"][mask]) == expected


def test_several_filters_must_all_hold():
    mask = filter_mask(TABLE, parse_filters(["modality=CT", "age>=60", "Contrast=True"]))
    assert list(TABLE["case_id"][mask]) == ["a"]


@pytest.mark.parametrize("where, message", [
    ("weight=70", r"no field 'weight' in this index; its fields: age_band, case_id, Contrast, modality, model, n_slices"),
    ("modality>=3", "field 'modality' holds no numbers or age bands; use = != or ~"),
])
def test_unknown_field_or_bad_comparison_is_one_clear_line(where, message):
    with pytest.raises(FilterError, match=message) as info:
        filter_mask(TABLE, parse_filters(where))
    assert "\n" not in str(info.value)
