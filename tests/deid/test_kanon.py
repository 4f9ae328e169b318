"""Tests of medsearch.deid.kanon: groups of patients over the quasi-identifiers, and generalization."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from medsearch.deid import QUASI_IDENTIFIERS, measure_groups, plan_generalization
from medsearch.deid.kanon import LADDERS, generalize_column
from medsearch.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Tables of cases
# --------------------------------------------------------------------------------------------

# (column, value, level) -> generalized value
LADDER_CASES = [
    ("age_band", "0", 1, "0-19"),
    ("age_band", "1-9", 1, "0-19"),
    ("age_band", "10-19", 1, "0-19"),
    ("age_band", "40-49", 1, "40-59"),
    ("age_band", "50-59", 1, "40-59"),
    ("age_band", "80-89", 1, "80+"),
    ("age_band", "90+", 1, "80+"),
    ("age_band", "60-69", 2, None),
    ("patient_size_m", "1.80-1.89", 1, "1.80-1.99"),
    ("patient_size_m", "1.70-1.79", 1, "1.60-1.79"),
    ("patient_size_m", "0.50-0.59", 1, "0.40-0.99"),
    ("patient_size_m", "2.20+", 1, "2.00+"),
    ("patient_size_m", 1.8, 1, "1.80-1.99"),  # an index built when sizes were rounded numbers
    ("patient_weight_kg", "80-89", 1, "80-99"),
    ("patient_weight_kg", "2-9", 1, "2-19"),
    ("patient_weight_kg", "250+", 1, "200+"),
    ("patient_weight_kg", 85.0, 1, "80-99"),
    ("patient_weight_kg", "80-89", 2, None),
    ("spacing_mm", "5x0.977x0.977", 1, "5x1x1"),
    ("spacing_mm", "1.25x0.703x0.703", 1, "1x0.7x0.7"),
    ("spacing_mm", "0.625x0.5x0.5", 1, "0.5x0.5x0.5"),
    ("spacing_mm", "5x0.977x0.977", 2, "3-6"),
    ("spacing_mm", "1.25x0.703x0.703", 2, "0-1.5"),
    ("spacing_mm", "8x0.781x0.781", 2, "6+"),
    ("spacing_mm", "2.5x0.7x0.7", 2, "1.5-3"),
    ("spacing_mm", "nonsense", 1, None),
    ("spacing_mm", "5x0.977x0.977", 3, None),
    ("model", "Sensation 16", 1, None),
    ("manufacturer", "Siemens", 1, None),
    ("sex", "F", 1, None),
    ("sex", math.nan, 0, None),  # missing, as pandas writes it
]


def _random_table(seed: int, n_patients: int) -> dict[str, list]:
    rng = random.Random(seed)
    rows: dict[str, list] = {name: [] for name in ("patient", *QUASI_IDENTIFIERS)}
    for p in range(n_patients):
        for _ in range(rng.randint(1, 3)):  # some patients have several studies
            rows["patient"].append(f"p-{p:04x}")
            rows["sex"].append(rng.choice(["M", "F", None]))
            rows["age_band"].append(rng.choice(["40-49", "50-59", "60-69", "70-79", "80-89", "90+"]))
            rows["patient_size_m"].append(rng.choice([None, None, "1.60-1.69", "1.70-1.79", "2.20+"]))
            rows["patient_weight_kg"].append(rng.choice([None, "60-69", "70-79", "80-89", "2-9", "250+"]))
            rows["manufacturer"].append(rng.choice(["GE", "Siemens", "Philips"]))
            rows["model"].append(rng.choice(["Sensation 16", "LightSpeed Ultra", "Discovery STE", "OTHER"]))
            rows["spacing_mm"].append(f"{rng.choice([1.25, 2.5, 5, 8])}x{rng.uniform(0.5, 1):.3f}x0.7")
    return rows


def _smallest_group(columns: dict[str, list], names: list[str]) -> int:
    """An independent count: pandas' groupby over the columns, distinct patients per group."""
    frame = pd.DataFrame(columns).astype(object).fillna("<missing>")
    if not names:
        return frame["patient"].nunique()
    return int(frame.groupby(names)["patient"].nunique().min())


# --------------------------------------------------------------------------------------------
# Ladders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("column", "value", "level", "expected"), LADDER_CASES)
def test_ladder_steps(column, value, level, expected):
    assert generalize_column(column, [value], level) == [expected]


def test_every_ladder_ends_by_dropping_its_column():
    assert set(LADDERS) == set(QUASI_IDENTIFIERS)
    for name, steps in LADDERS.items():
        assert steps[-1][0] == "dropped"
        assert generalize_column(name, ["anything"], len(steps)) == [None]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def test_a_patient_with_several_studies_counts_once():
    table = {
        "patient": ["a", "a", "a", "b", "c", "c"],
        "sex": ["F", "F", "F", "F", "M", "M"],
        "age_band": ["60-69"] * 6,
    }
    m = measure_groups(table, k=2)
    assert (m.patients, m.groups, m.smallest_group, m.patients_below_k, m.unique_patients) == (3, 2, 1, 1, 1)
    assert m.columns == ("age_band", "sex")  # in the order of QUASI_IDENTIFIERS, present ones only


def test_missing_values_form_a_group_and_empty_columns_are_not_quasi_identifiers():
    table = {"patient": ["a", "b", "c"], "sex": ["F", None, math.nan], "model": [None, None, None]}
    m = measure_groups(table, k=2)
    assert m.columns == ("sex",)
    assert m.smallest_group == 1 and m.groups == 2


def test_an_empty_table_has_no_groups():
    m = measure_groups({"patient": [], "sex": []})
    assert (m.patients, m.groups, m.smallest_group, m.patients_below_k) == (0, 0, None, 0)


@pytest.mark.parametrize(("k", "message"), [(0, "at least 1"), (-3, "at least 1"), (2.5, "whole number"), (True, "whole number")])
def test_bad_k(k, message):
    with pytest.raises(ConfigError, match=message):
        measure_groups({"patient": ["a"]}, k=k)
    with pytest.raises(ConfigError, match=message):
        plan_generalization({"patient": ["a"]}, k=k)


def test_patients_are_needed():
    with pytest.raises(ConfigError, match="no 'patient' column"):
        measure_groups({"sex": ["F"]})


# --------------------------------------------------------------------------------------------
# Generalizing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 5, 10])
def test_the_generalized_table_is_k_anonymous(seed, k):
    table = _random_table(seed, n_patients=60)
    plan = plan_generalization(table, k=k)
    assert plan.reached
    out = {"patient": table["patient"], **{c: plan.apply(c, table[c]) for c in QUASI_IDENTIFIERS}}
    kept = [c for c in QUASI_IDENTIFIERS if plan.levels[c] < len(LADDERS[c])]
    assert _smallest_group(out, kept) >= k == plan.k
    assert plan.after.smallest_group == _smallest_group(out, kept)
    assert plan.before.smallest_group == _smallest_group(table, list(QUASI_IDENTIFIERS))
    assert plan.after.columns == tuple(c for c in QUASI_IDENTIFIERS if c in kept)
    # no step can be undone: each generalized column at one level less breaks k-anonymity
    for column, level in plan.levels.items():
        if level:
            back = {**out, column: generalize_column(column, table[column], level - 1)}
            names = [c for c in QUASI_IDENTIFIERS if c in kept or c == column]
            assert _smallest_group(back, names) < k, column


def test_a_table_that_is_already_k_anonymous_is_left_as_it_is():
    table = {"patient": list("abcdef"), "sex": list("FFFMMM"), "age_band": ["60-69"] * 6}
    plan = plan_generalization(table, k=3)
    assert plan.generalized == () and plan.reached
    assert plan.apply("sex", table["sex"]) == table["sex"]
    assert plan.to_dict()["generalized"] == {}


def test_k_of_one_changes_nothing():
    table = _random_table(0, n_patients=20)
    assert plan_generalization(table, k=1).generalized == ()


def test_fewer_patients_than_k_cannot_be_k_anonymous():
    table = {"patient": ["a", "b", "b"], "sex": ["F", "M", "M"], "age_band": ["60-69", "70-79", "70-79"]}
    plan = plan_generalization(table, k=5)
    assert not plan.reached
    assert plan.dropped == ("age_band", "sex")
    assert plan.after.smallest_group == 2 and plan.after.columns == ()


def test_a_rare_spacing_is_coarsened_before_anything_else_is_dropped():
    spacing = ["5x0.7x0.7"] * 4 + ["5x0.703x0.703"]
    table = {"patient": list("abcde"), "spacing_mm": spacing, "sex": ["F"] * 5, "model": ["Sensation 16"] * 5}
    plan = plan_generalization(table, k=5)
    assert plan.generalized == (("spacing_mm", "slice spacing to 1 mm, in-plane to 0.1 mm"),)
    assert plan.apply("spacing_mm", spacing) == ["5x0.7x0.7"] * 5
    assert plan.apply("model", table["model"]) == table["model"]
