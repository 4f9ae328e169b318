"""float16 widened through the table: the same values as NumPy's conversion, for every pattern."""

from __future__ import annotations

import numpy as np

from medsearch.store.half import to_float32


def test_every_float16_pattern_widens_as_numpy_does():
    halves = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(256, 256)
    widened = to_float32(halves)
    assert widened.dtype == np.float32 and widened.shape == (256, 256)
    # bit for bit, NaNs, infinities, signed zeros and subnormals included
    assert np.array_equal(widened.view(np.uint32), halves.astype(np.float32).view(np.uint32))


def test_a_strided_or_float32_input():
    rows = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float16)
    assert np.array_equal(to_float32(rows[::3, 1:5]), rows[::3, 1:5].astype(np.float32))
    same = np.ones((2, 3), np.float32)
    assert to_float32(same).dtype == np.float32 and to_float32(same) is not same
