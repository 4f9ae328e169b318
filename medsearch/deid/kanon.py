"""k-anonymity of a case table: how small its groups of patients are, and how to make none smaller than k.

A quasi-identifier is a kept value that someone could know about a patient from elsewhere: sex, an
age band, size and weight bands, the scanner (maker and model), and the image spacing, which tells
scanners and protocols apart. Cases that share every quasi-identifier form a group; what counts is
the number of distinct *patients* (patient pseudonyms) in a group, since one patient's several
studies do not hide one another. A table is k-anonymous when every group holds at least k patients.

:func:`measure_groups` measures a table; :func:`plan_generalization` finds how far to coarsen each
quasi-identifier (:data:`LADDERS`: coarser bands, then the column dropped) until every group holds
at least k patients, and :func:`generalize_column` applies a plan's level to a column. Everything
works on plain columns (sequences of values, ``None`` or NaN for missing), so that any table
library can hand them in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsearch.errors import ConfigError

__all__ = [
    "LADDERS",
    "QUASI_IDENTIFIERS",
    "GroupMeasure",
    "KAnonymityPlan",
    "generalize_column",
    "measure_groups",
    "plan_generalization",
]

#: The case-table columns treated as quasi-identifiers, in the order they are generalized on a tie.
QUASI_IDENTIFIERS: tuple[str, ...] = (
    "spacing_mm",
    "patient_weight_kg",
    "patient_size_m",
    "age_band",
    "model",
    "manufacturer",
    "sex",
)

_BAND = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:-\s*\d+(?:\.\d+)?|\+)\s*$")


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _low(value: object) -> float | None:
    """The lower bound of a band (``"60-69"``, ``"90+"``) or a number; ``None`` for anything else."""
    if isinstance(value, bool) or _missing(value):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value)
    match = _BAND.match(text)
    if match:
        return float(match.group(1))
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _age_20(value: object) -> object:
    low = _low(value)
    if low is None:
        return None
    if low < 20:
        return "0-19"
    if low >= 80:
        return "80+"
    start = int(low // 20 * 20)
    return f"{start}-{start + 19}"


def _size_20(value: object) -> object:
    low = _low(value)
    if low is None:
        return None
    if low < 1.0:
        return "0.40-0.99"
    if low >= 2.0:
        return "2.00+"
    start = math.floor(low * 5 + 1e-9) / 5
    return f"{start:.2f}-{start + 0.19:.2f}"


def _weight_20(value: object) -> object:
    low = _low(value)
    if low is None:
        return None
    if low < 20:
        return "2-19"
    if low >= 200:
        return "200+"
    start = int(low // 20 * 20)
    return f"{start}-{start + 19}"


def _spacing(value: object) -> list[float] | None:
    if _missing(value):
        return None
    try:
        numbers = [float(part) for part in str(value).split("x")]
    except ValueError:
        return None
    return numbers if numbers and all(math.isfinite(n) and n > 0 for n in numbers) else None


def _spacing_rounded(value: object) -> object:
    """Slice spacing to the whole millimetre (half a millimetre under 1 mm), in-plane to 0.1 mm."""
    numbers = _spacing(value)
    if numbers is None:
        return None
    first, rest = numbers[0], numbers[1:]
    step = 1.0 if first >= 1 else 0.5
    slice_mm = max(step, math.floor(first / step + 0.5) * step)
    plane = [max(0.1, math.floor(n * 10 + 0.5) / 10) for n in rest]
    return "x".join(f"{n:g}" for n in (slice_mm, *plane))


def _spacing_class(value: object) -> object:
    """Slice spacing as one of four classes (mm): thin, standard, thick, very thick."""
    numbers = _spacing(value)
    if numbers is None:
        return None
    first = numbers[0]
    if first <= 1.5:
        return "0-1.5"
    if first <= 3:
        return "1.5-3"
    if first <= 6:
        return "3-6"
    return "6+"


def _dropped(value: object) -> object:
    return None


Step = tuple[str, Callable[[object], object]]

#: For each quasi-identifier, its generalization steps in order: what the step does, and how it
#: maps a stored value. The last step of each drops the column.
LADDERS: dict[str, tuple[Step, ...]] = {
    "spacing_mm": (
        ("slice spacing to 1 mm, in-plane to 0.1 mm", _spacing_rounded),
        ("slice spacing in classes 0-1.5, 1.5-3, 3-6, 6+ mm; in-plane dropped", _spacing_class),
        ("dropped", _dropped),
    ),
    "patient_weight_kg": (("20 kg bands", _weight_20), ("dropped", _dropped)),
    "patient_size_m": (("20 cm bands", _size_20), ("dropped", _dropped)),
    "age_band": (("20-year bands", _age_20), ("dropped", _dropped)),
    "model": (("dropped", _dropped),),
    "manufacturer": (("dropped", _dropped),),
    "sex": (("dropped", _dropped),),
}


def generalize_column(name: str, values: Sequence[object], level: int) -> list[object]:
    """``values`` of the quasi-identifier ``name`` at ``level`` of its ladder (0: as they are).

    Examples
    --------
    >>> generalize_column("age_band", ["60-69", "70-79", "90+", None], 1)
    ['60-79', '60-79', '80+', None]
    >>> generalize_column("spacing_mm", ["5x0.977x0.977", "1.25x0.703x0.703"], 1)
    ['5x1x1', '1x0.7x0.7']
    """
    if level == 0:
        return [None if _missing(v) else v for v in values]
    mapping = LADDERS[name][level - 1][1]
    cache: dict[object, object] = {}
    out: list[object] = []
    for value in values:
        if _missing(value):
            out.append(None)
            continue
        if value not in cache:
            cache[value] = mapping(value)
        out.append(cache[value])
    return out


@dataclass(frozen=True)
class GroupMeasure:
    """How small the groups of patients sharing every quasi-identifier are.

    Attributes
    ----------
    columns
        The quasi-identifiers measured (those the table has, not all empty).
    patients
        Distinct patients in the table.
    groups
        Distinct combinations of the quasi-identifiers.
    smallest_group
        Patients in the smallest group (``None`` for an empty table).
    patients_below_k
        Patients who are in at least one group of fewer than ``k``.
    unique_patients
        Patients who are alone in at least one group.
    """

    k: int
    columns: tuple[str, ...]
    patients: int
    groups: int
    smallest_group: int | None
    patients_below_k: int
    unique_patients: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "quasi_identifiers": list(self.columns),
            "patients": self.patients,
            "groups": self.groups,
            "smallest_group": self.smallest_group,
            "patients_below_k": self.patients_below_k,
            "unique_patients": self.unique_patients,
        }


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k-anonymity must be a whole number of at least 1, got {k!r}")


def _present(columns: Mapping[str, Sequence[object]]) -> tuple[str, ...]:
    return tuple(c for c in QUASI_IDENTIFIERS if c in columns and any(not _missing(v) for v in columns[c]))


class _Rows:
    """A case table reduced to what k-anonymity depends on: patients and the values of each
    quasi-identifier at each level, as integer codes (numpy arrays), each computed once.

    A table of a million cases is measured in about a second: the grouping runs in numpy, and a
    level's codes come from the level below through a table over its few distinct values.
    """

    def __init__(self, columns: Mapping[str, Sequence[object]], names: tuple[str, ...], patient: str) -> None:
        patient_codes, self.n_patients = _codes(_patients(columns, patient))
        self.patients = patient_codes
        self.n_rows = len(patient_codes)
        self.names = names
        self._codes: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        self._values: dict[str, list[object]] = {}
        for name in names:
            # codes of the values as given (each NaN object may get its own), then one code for all
            # missing values, through a table over the distinct values
            raw, _ = _codes(columns[name])
            distinct = _distinct(columns[name])
            index: dict[object, int] = {}
            table = np.fromiter(
                (index.setdefault(None if _missing(v) else v, len(index)) for v in distinct), dtype=np.int64, count=len(distinct)
            )
            self._values[name] = list(index)
            self._codes[name, 0] = (table[raw], len(index))

    def codes(self, name: str, level: int) -> tuple[np.ndarray, int]:
        """The codes of ``name`` at ``level`` and how many distinct values there are."""
        if (name, level) not in self._codes:
            generalized = generalize_column(name, self._values[name], level)
            table, count = _codes(generalized)
            self._codes[name, level] = (table[self._codes[name, 0][0]], count)
        return self._codes[name, level]

    def measure(self, levels: Mapping[str, int], k: int) -> GroupMeasure:
        key = np.zeros(self.n_rows, dtype=np.int64)
        size = 1
        for name in self.names:
            codes, count = self.codes(name, levels[name])
            if size * count > _MAX_KEYS:  # renumber the groups so far, so that keys stay small
                distinct, key = np.unique(key, return_inverse=True)
                size = len(distinct)
            key = key * count + codes
            size *= count
        if size * max(self.n_patients, 1) > 2**62:
            distinct, key = np.unique(key, return_inverse=True)
            size = len(distinct)
        patients = max(self.n_patients, 1)
        pairs = np.unique(key * patients + self.patients)  # each (group, patient) once
        group_of, patient_of = np.divmod(pairs, patients)
        sizes = np.bincount(group_of, minlength=size)
        per_pair = sizes[group_of]
        present = sizes[sizes > 0]
        return GroupMeasure(
            k=k,
            columns=self.names,
            patients=self.n_patients,
            groups=len(present),
            smallest_group=int(present.min()) if len(present) else None,
            patients_below_k=int(np.count_nonzero(np.bincount(patient_of[per_pair < k], minlength=1))),
            unique_patients=int(np.count_nonzero(np.bincount(patient_of[per_pair == 1], minlength=1))),
        )


# The most group keys counted with np.bincount before they are renumbered.
_MAX_KEYS = 1 << 24


def _distinct(values: Sequence[object]) -> list[object]:
    """The distinct values, in order of first appearance (the order :func:`_codes` numbers them in)."""
    return list(dict.fromkeys(values))


def _codes(values: Sequence[object]) -> tuple[np.ndarray, int]:
    """Integer codes of ``values`` (equal values, equal codes) and how many distinct values there are."""
    index: dict[object, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return codes, len(index)


def _patients(columns: Mapping[str, Sequence[object]], patient: str) -> list[str]:
    if patient not in columns:
        raise ConfigError(f"the case table has no {patient!r} column; k-anonymity counts patients by it")
    return [str(p) for p in columns[patient]]


def measure_groups(columns: Mapping[str, Sequence[object]], *, k: int = 5, patient: str = "patient") -> GroupMeasure:
    """Measure the groups of patients over the quasi-identifiers ``columns`` holds.

    ``columns`` maps column names to equally long sequences of values (a case table by column);
    missing values (``None``, NaN) form a value of their own.

    Raises
    ------
    ConfigError
        ``k`` is below 1, or there is no ``patient`` column.

    Examples
    --------
    >>> table = {"patient": ["a", "b", "c", "c"], "sex": ["F", "F", "M", "M"], "age_band": ["60-69"] * 4}
    >>> m = measure_groups(table, k=2)
    >>> m.smallest_group, m.patients_below_k, m.unique_patients
    (1, 1, 1)
    """
    _check_k(k)
    names = _present(columns)
    return _Rows(columns, names, patient).measure(dict.fromkeys(names, 0), k)


@dataclass(frozen=True)
class KAnonymityPlan:
    """How far to generalize each quasi-identifier so that every group holds at least ``k`` patients.

    Attributes
    ----------
    levels
        Each quasi-identifier's level on its ladder (0: as stored).
    before, after
        The measure of the table as stored and as generalized.
    """

    k: int
    levels: dict[str, int]
    before: GroupMeasure
    after: GroupMeasure

    @property
    def generalized(self) -> tuple[tuple[str, str], ...]:
        """Each generalized column and what was done to it: ``("age_band", "20-year bands")``."""
        return tuple((c, LADDERS[c][level - 1][0]) for c, level in self.levels.items() if level > 0)

    @property
    def dropped(self) -> tuple[str, ...]:
        """The quasi-identifiers left out altogether."""
        return tuple(c for c, level in self.levels.items() if level == len(LADDERS[c]))

    @property
    def reached(self) -> bool:
        """Whether every group of the generalized table holds at least ``k`` patients."""
        return self.after.smallest_group is None or self.after.smallest_group >= self.k

    def apply(self, name: str, values: Sequence[object]) -> list[object]:
        """The column ``name`` as the plan generalizes it (other columns are returned as they are)."""
        return generalize_column(name, values, self.levels[name]) if name in self.levels else list(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "reached": self.reached,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "generalized": {c: what for c, what in self.generalized},
            "dropped": list(self.dropped),
        }


def plan_generalization(
    columns: Mapping[str, Sequence[object]], *, k: int = 5, patient: str = "patient"
) -> KAnonymityPlan:
    """Coarsen the quasi-identifiers, one step at a time, until every group holds ``k`` patients.

    Each round takes the one step (of each column's next one on :data:`LADDERS`) that leaves the
    fewest patients in groups below ``k``; on a tie, the column earliest in
    :data:`QUASI_IDENTIFIERS` (the spacing before the weight... before sex). Once the table is
    k-anonymous, each step that is no longer needed is undone (sex first, the spacing last), so that
    no column is coarser than it must be for this greedy order. A table of fewer than ``k`` patients
    cannot be k-anonymous: every column ends dropped and :attr:`KAnonymityPlan.reached` is false.

    Raises
    ------
    ConfigError
        ``k`` is below 1, or there is no ``patient`` column.

    Examples
    --------
    >>> table = {"patient": list("abcdef"), "age_band": ["60-69", "70-79"] * 3, "sex": list("FFFMMM")}
    >>> plan = plan_generalization(table, k=3)
    >>> plan.generalized, plan.after.smallest_group
    ((('age_band', '20-year bands'),), 3)
    """
    _check_k(k)
    names = _present(columns)
    rows = _Rows(columns, names, patient)

    def measure(levels: Mapping[str, int]) -> GroupMeasure:
        return rows.measure(levels, k)

    levels = dict.fromkeys(names, 0)
    before = current = measure(levels)
    while current.smallest_group is not None and current.smallest_group < k:
        candidates = [c for c in names if levels[c] < len(LADDERS[c])]
        if not candidates:
            break
        trials = {c: measure({**levels, c: levels[c] + 1}) for c in candidates}
        best = min(candidates, key=lambda c: (trials[c].patients_below_k, names.index(c)))
        levels[best] += 1
        current = trials[best]
    if current.smallest_group is not None and current.smallest_group >= k:
        # A greedy step taken early may prove unneeded once later ones are taken: undo what can be
        # undone, sex first and the spacing last (the reverse of the order of generalization).
        undone = True
        while undone:
            undone = False
            for name in reversed(names):
                if levels[name] > 0:
                    trial = measure({**levels, name: levels[name] - 1})
                    if trial.smallest_group is not None and trial.smallest_group >= k:
                        levels[name] -= 1
                        current, undone = trial, True
    # The generalized table no longer has the dropped columns: measure it over those it keeps.
    kept = tuple(c for c in names if levels[c] < len(LADDERS[c]))
    return KAnonymityPlan(k=k, levels=levels, before=before, after=dataclasses.replace(current, columns=kept))
