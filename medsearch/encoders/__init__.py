"""Encoders: turn preprocessed image batches into L2-normalized embeddings (torch, or ONNX Runtime).

    registry.py   which encoders exist (EfficientNet-Lite0, MONAI DenseNets and ResNets), load_encoder
    encoder.py    EncoderInfo (an embedding space's identity) and Encoder, the torch runtime
    onnx.py       OnnxEncoder, the ONNX Runtime on the CPU with its export cache, resolve_runtime

Two runtimes compute the same embeddings (cosine >= 0.9999, checked in the tests), so the runtime is
not part of an encoder's identity: ``torch`` runs the network eagerly (CPU or CUDA), ``onnx`` runs
its export with ONNX Runtime on the CPU. ``runtime = "auto"`` (the default) picks ONNX on the CPU
when onnxruntime is installed.

    from medsearch.encoders import load_encoder
    encoder = load_encoder()                 # EfficientNet-Lite0, the default
    vectors = encoder.embed(batch)           # (B, 1280) float32, rows of unit length
"""

from __future__ import annotations

from medsearch.encoders.encoder import Encoder, EncoderInfo, resolve_device
from medsearch.encoders.onnx import OnnxEncoder, cache_dir, resolve_runtime
from medsearch.encoders.registry import DEFAULT_ENCODER, load_encoder

__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderInfo",
    "OnnxEncoder",
    "cache_dir",
    "load_encoder",
    "resolve_device",
    "resolve_runtime",
]
