"""numpy, enum and path values as plain Python, for JSON and for tables: the one converter.

``plain(value)`` turns one value into what ``json.dumps`` writes (numpy scalars and arrays, enums,
paths; a float NaN becomes ``None``); ``json_default`` is the same for ``json.dumps(default=...)``,
and raises ``TypeError`` for a value it does not know, as ``json`` expects.
"""

from __future__ import annotations

import enum
import math
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["json_default", "plain"]


def plain(value: Any) -> Any:
    """``value`` as plain Python: numpy scalars and arrays, enums and paths converted, NaN as ``None``.

    >>> plain(np.float32(0.5)), plain(float("nan")), plain(np.arange(2))
    (0.5, None, [0, 1])
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    return value


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: what :func:`plain` converts, else ``TypeError``."""
    converted = plain(value)
    if converted is value:
        raise TypeError(f"cannot serialize {type(value).__name__}")
    return converted
