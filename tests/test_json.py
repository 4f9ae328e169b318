"""medsearch._json: numpy, enum and path values become what json.dumps writes."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import numpy as np
import pytest

from medsearch._json import json_default, plain


class Color(enum.Enum):
    RED = "red"


CASES = [
    (np.float32(0.5), 0.5),
    (np.int64(3), 3),
    (np.bool_(True), True),
    (float("nan"), None),
    (np.float64("nan"), None),
    (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
    (np.array([1.0, np.nan]), [1.0, None]),
    (Color.RED, "red"),
    (Path("a/b.dcm"), "a/b.dcm"),
    ("text", "text"),
    (None, None),
    (7, 7),
]


@pytest.mark.parametrize(("value", "expected"), CASES, ids=lambda v: type(v).__name__)
def test_plain(value, expected):
    assert plain(value) == expected
    assert type(plain(value)) is type(expected)


def test_json_default_serializes_numpy_and_enums():
    text = json.dumps({"n": np.int32(2), "v": np.zeros(2, np.float32), "c": Color.RED}, default=json_default)
    assert json.loads(text) == {"n": 2, "v": [0.0, 0.0], "c": "red"}


def test_json_default_refuses_what_it_does_not_know():
    with pytest.raises(TypeError, match="cannot serialize object"):
        json.dumps({"x": object()}, default=json_default)
