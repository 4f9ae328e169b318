"""Metadata filters for a query: ``modality=CT``, ``age>=60``, ``Contrast=True``, ``model~Light``.

A filter is parsed once into a small typed object, :class:`Filter`, and evaluated over the case table
into a boolean mask; :class:`~medsearch.store.IndexStore` turns the mask into a faiss ID selector, so
the nearest cases are searched among the matching ones only.

Operators: ``=`` (``==`` too), ``!=``, ``>=``, ``<=``, ``>``, ``<``, and ``~`` (contains). Several filters
must all hold. How values compare:

* ``=`` and ``!=`` compare text case-insensitively (``modality=ct`` matches ``CT``; ``Contrast=true``
  matches ``True``); when the value is a number they also compare numbers (``n_slices=1`` matches
  ``1.0``, ``Contrast=1`` matches ``True``), and an age band matches a number it contains
  (``age_band=65`` matches ``60-69``).
* ``>=``, ``<=``, ``>``, ``<`` compare numbers. An age band (``60-69``, ``90+``) counts as its lower
  bound, so ``age>=60`` keeps the bands from ``60-69`` up and ``age<60`` those up to ``50-59``; a
  bound inside a band (``age>=65``) keeps the bands that start at or above it.
* ``~`` keeps the cells whose text contains the value, case-insensitively.
* A missing value never matches, not even ``!=``.
* ``age`` names the ``age_band`` column when the index has no ``age`` column; field names are
  matched exactly first, then case-insensitively.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medsearch.errors import FilterError

if TYPE_CHECKING:  # pandas is imported where a table is read, so that checking a filter's syntax stays quick
    import pandas as pd

__all__ = ["Filter", "FilterOp", "filter_mask", "parse_filters"]

# longest operators first, so that ">=" is not read as ">" followed by "=value"
_SYNTAX = re.compile(r"^\s*(?P<field>[^=!<>~]*?)\s*(?P<op>==|!=|>=|<=|=|>|<|~)\s*(?P<value>.*?)\s*$", re.DOTALL)
_BAND = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:-\s*(\d+(?:\.\d+)?)|(\+))\s*$")
_ALIASES = {"age": "age_band"}


class FilterOp(str, enum.Enum):
    """How a filter compares a field with its value."""

    EQ = "="
    NE = "!="
    GE = ">="
    LE = "<="
    GT = ">"
    LT = "<"
    CONTAINS = "~"

    @property
    def is_ordering(self) -> bool:
        return self in (FilterOp.GE, FilterOp.LE, FilterOp.GT, FilterOp.LT)


@dataclass(frozen=True)
class Filter:
    """One condition on a case-table field, e.g. ``Filter("age_band", ">=", "60")``.

    Raises
    ------
    FilterError
        An empty field or value, an unknown operator, or an ordering operator with a value that is
        not a number.
    """

    field: str
    op: FilterOp
    value: str
    number: float | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "op", FilterOp("=" if self.op == "==" else self.op))
        except ValueError:
            ops = " ".join(o.value for o in FilterOp)
            raise FilterError(f"filter operator {self.op!r} is unknown; use one of {ops}") from None
        object.__setattr__(self, "field", str(self.field).strip())
        object.__setattr__(self, "value", _unquote(str(self.value).strip()))
        if not self.field:
            raise FilterError(f"filter {str(self)!r} names no field; write FIELD{self.op.value}VALUE, e.g. modality=CT")
        if not self.value:
            raise FilterError(f"filter {str(self)!r} has no value; write {self.field}{self.op.value}VALUE")
        number = _number(self.value)
        object.__setattr__(self, "number", number)
        if self.op.is_ordering and number is None:
            raise FilterError(
                f"filter {str(self)!r}: {self.op.value} compares numbers, and {self.value!r} is not one; "
                f"use = != or ~ for text"
            )

    def __str__(self) -> str:
        return f"{self.field}{self.op.value}{self.value}"

    @classmethod
    def parse(cls, text: str) -> Filter:
        """``"age_band>=60"`` -> ``Filter("age_band", FilterOp.GE, "60")``.

        Raises
        ------
        FilterError
            The text has no operator, no field or no value.
        """
        match = _SYNTAX.match(str(text))
        if match is None:
            ops = " ".join(o.value for o in FilterOp)
            raise FilterError(
                f"filter {str(text).strip()!r} has no operator; write FIELD<op>VALUE with <op> one of {ops}, "
                "e.g. modality=CT or age>=60"
            )
        return cls(match["field"], FilterOp("=" if match["op"] == "==" else match["op"]), match["value"])

    def mask(self, cases: pd.DataFrame) -> np.ndarray:
        """The rows of ``cases`` that satisfy this filter, as a boolean array.

        Raises
        ------
        FilterError
            The field is not a column of ``cases``, or an ordering filter targets a field that holds
            no numbers.
        """
        column = resolve_field(self.field, cases.columns, shown=str(self))
        values = cases[column]
        present = values.notna().to_numpy()
        if self.op is FilterOp.CONTAINS:
            text = values.astype(str).str.casefold()
            return present & text.str.contains(self.value.casefold(), regex=False).to_numpy()
        low, high = _numeric_view(values)
        if self.op.is_ordering:
            if present.any() and np.isnan(low).all():
                raise FilterError(
                    f"filter {str(self)!r}: field {column!r} holds no numbers or age bands; use = != or ~ to compare it"
                )
            number = self.number
            with np.errstate(invalid="ignore"):
                if self.op is FilterOp.GE:
                    return low >= number
                if self.op is FilterOp.GT:
                    return low > number
                if self.op is FilterOp.LE:
                    return low <= number
                return low < number
        equal = (values.astype(str).str.casefold() == self.value.casefold()).to_numpy()
        if self.number is not None:
            with np.errstate(invalid="ignore"):
                equal = equal | ((low <= self.number) & (self.number <= high))
        equal = equal & present
        return equal if self.op is FilterOp.EQ else present & ~equal


def parse_filters(where: str | Filter | Iterable[str | Filter] | None) -> tuple[Filter, ...]:
    """Filters from text (``"modality=CT"``), :class:`Filter` objects, or a list of either.

    Raises
    ------
    FilterError
        A filter cannot be parsed.
    """
    if where is None:
        return ()
    if isinstance(where, (str, Filter)):
        where = [where]
    return tuple(w if isinstance(w, Filter) else Filter.parse(w) for w in where)


def filter_mask(cases: pd.DataFrame, filters: Sequence[Filter]) -> np.ndarray:
    """Rows of ``cases`` that satisfy every filter (all rows when there are none).

    Raises
    ------
    FilterError
        A filter names a field that ``cases`` lacks, or compares text as a number.
    """
    mask = np.ones(len(cases), dtype=bool)
    for f in filters:
        mask = mask & f.mask(cases)
    return mask


def resolve_field(name: str, columns: Iterable[object], *, shown: str | None = None) -> str:
    """The column a filter's field names: exact, then the ``age`` alias, then case-insensitive.

    Raises
    ------
    FilterError
        No column matches; the message lists the fields there are.
    """
    names = [str(c) for c in columns]
    if name in names:
        return name
    alias = _ALIASES.get(name.casefold())
    if alias in names:
        return str(alias)
    folded = [c for c in names if c.casefold() == name.casefold()]
    if len(folded) == 1:
        return folded[0]
    known = ", ".join(sorted(names, key=str.casefold)) or "none (the index is empty)"
    raise FilterError(f"filter {shown or name!r}: no field {name!r} in this index; its fields: {known}")


def _numeric_view(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each cell as a closed interval of numbers: a number n is [n, n], a band "60-69" is [60, 69],
    "90+" is [90, inf]; anything else is [nan, nan]."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        numbers = values.astype(float).to_numpy()
        return numbers, numbers
    low = np.full(len(values), np.nan)
    high = np.full(len(values), np.nan)
    # the distinct texts are few (codes, bands); parse each once
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    parsed = [_interval(u) for u in uniques]
    if parsed:
        lows = np.array([p[0] for p in parsed] + [np.nan])
        highs = np.array([p[1] for p in parsed] + [np.nan])
        low, high = lows[codes], highs[codes]  # code -1 (missing) picks the trailing nan
    return low, high


def _interval(value: object) -> tuple[float, float]:
    if isinstance(value, (bool, np.bool_)):
        return float(value), float(value)
    number = _number(str(value))
    if number is not None:
        return number, number
    band = _BAND.match(str(value))
    if band:
        low = float(band[1])
        return low, (math.inf if band[3] else float(band[2]))
    return math.nan, math.nan


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
