"""float16 widened through ONNX Runtime or the table: the same values as NumPy's conversion, for every pattern."""

from __future__ import annotations

import numpy as np
import pytest

from medsearch.store import half
from medsearch.store.half import SESSION_FROM, to_float32

EVERY = np.arange(65536, dtype=np.uint16).view(np.float16)


def _same_as_numpy(widened: np.ndarray, halves: np.ndarray) -> None:
    expected = halves.astype(np.float32)
    assert widened.dtype == np.float32 and widened.shape == halves.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(widened), nan)
    # bit for bit, infinities, signed zeros and subnormals included; a NaN stays a NaN
    assert np.array_equal(widened.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def test_every_float16_pattern_widens_as_numpy_does_through_the_session():
    assert EVERY.size >= SESSION_FROM and half._session() is not None
    _same_as_numpy(to_float32(EVERY.reshape(256, 256)), EVERY.reshape(256, 256))


def test_every_float16_pattern_widens_as_numpy_does_through_the_table():
    # in pieces below the session's size: bit for bit, NaN payloads included
    pieces = [to_float32(piece) for piece in EVERY.reshape(-1, 1024)]
    assert all(p.size < SESSION_FROM for p in pieces)
    assert np.array_equal(np.stack(pieces).ravel().view(np.uint32), EVERY.astype(np.float32).view(np.uint32))


def test_without_onnxruntime_the_table_widens_large_arrays(monkeypatch):
    monkeypatch.setattr(half, "_session", lambda: None)
    rows = EVERY.reshape(256, 256)
    assert np.array_equal(to_float32(rows).view(np.uint32), rows.astype(np.float32).view(np.uint32))


def test_the_cast_model_is_the_one_onnx_makes():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["half"], ["single"], to=TensorProto.FLOAT)], "widen",
        [helper.make_tensor_value_info("half", TensorProto.FLOAT16, None)],
        [helper.make_tensor_value_info("single", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="medsearch")
    model.ir_version = 7
    # any rank: the inputs carry no shape (ONNX Runtime runs it; onnx's strict checker would ask for one)
    assert model.SerializeToString() == half._CAST_MODEL


def test_a_strided_or_float32_input():
    rows = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float16)
    assert np.array_equal(to_float32(rows[::3, 1:5]), rows[::3, 1:5].astype(np.float32))
    large = np.random.default_rng(1).standard_normal((400, 300)).astype(np.float16)
    assert np.array_equal(to_float32(large[::2, ::3]), large[::2, ::3].astype(np.float32))
    same = np.ones((2, 3), np.float32)
    assert to_float32(same).dtype == np.float32 and to_float32(same) is not same
