"""float16 to float32, fast: the stored slice, tile and exact vectors are float16, and every query
widens hundreds of thousands of them.

NumPy converts float16 one value at a time (about 5 ns each on the 2-core machine). ONNX Runtime,
which a query process has loaded for the encoder anyway, converts with the CPU's vector
instructions, on the calling thread: 2.9 ms for the 8.2 million values of 6,400 slice vectors,
against 16 ms for NumPy, and 0.09 ms for 640 of them.
Small arrays (below :data:`SESSION_FROM` values, where calling the session costs more than it
saves) and a machine without onnxruntime go through a table of the 65,536 float32 values (256 KiB,
made once), each value read as its 16-bit pattern. Both give NumPy's values (infinities, signed zeros and
subnormals included); ONNX Runtime returns a signalling NaN quiet, as the hardware converts it
(stored vectors hold no NaN).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["SESSION_FROM", "to_float32"]

SESSION_FROM = 32_768
"""Arrays of at least this many values widen through ONNX Runtime (when installed)."""

# The ONNX model of one Cast node, float16 "half" to float32 "single" (opset 13), serialized; made with
# onnx.helper (tests/store/test_half.py makes it again and compares), kept as bytes because importing
# onnx takes about a second and a query process never needs it otherwise.
_CAST_MODEL = (
    b"\x08\x07\x12\tmedsearch:F\n\x1f\n\x04half\x12\x06single\"\x04Cast*\t\n\x02to\x18\x01\xa0\x01\x02\x12"
    b"\x05widenZ\x0c\n\x04half\x12\x04\n\x02\x08\nb\x0e\n\x06single\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


@functools.cache
def _table() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@functools.cache
def _session() -> Any | None:
    """The Cast session, made once a process; None without onnxruntime or where it fails to open."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # one thread, the caller's: a thread pool of its own would spin after each call, taking the
        # cores from the matrix products that follow (measured: every search slower on 2 cores)
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return ort.InferenceSession(_CAST_MODEL, options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure of the optional fast path falls back to the table
        return None


def to_float32(values: np.ndarray) -> np.ndarray:
    """``values`` as a new float32 array (float16 through ONNX Runtime or the table, see the module
    docstring; any other dtype as NumPy converts it).

    >>> to_float32(np.array([1.5, -2.0, 65504.0], np.float16)).tolist()
    [1.5, -2.0, 65504.0]
    """
    values = np.asarray(values)
    if values.dtype != np.float16:
        return values.astype(np.float32)
    session = _session() if values.size >= SESSION_FROM else None
    if session is not None:
        widened: np.ndarray = session.run(None, {"half": np.ascontiguousarray(values)})[0]
        return widened
    return np.take(_table(), np.ascontiguousarray(values).view(np.uint16))
