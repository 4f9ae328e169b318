"""Encoders: turn preprocessed image batches into L2-normalized embeddings (torch, or ONNX Runtime).

    registry.py   which encoders exist (EfficientNet-Lite0, MONAI DenseNets and ResNets, the 3D CT
                  I3ResNets), load_encoder
    i3resnet.py   the native 3D CT encoder: an Inflated 3D ResNet-152 and its packaged weights
    encoder.py    EncoderInfo (an embedding space's identity) and Encoder, the torch runtime
    onnx.py       OnnxEncoder, the ONNX Runtime on the CPU with its export cache, resolve_runtime
    adapter.py    Adapter (a small projection trained on frozen embeddings), its file, AdaptedEncoder
    networks.py   the feature networks built around a model (the layers up to the embedding)

Two runtimes compute the same embeddings (cosine >= 0.9999, checked in the tests), so the runtime is
not part of an encoder's identity: ``torch`` runs the network eagerly (CPU or CUDA), ``onnx`` runs
its export with ONNX Runtime on the CPU. ``runtime = "auto"`` (the default) picks ONNX on the CPU
when onnxruntime is installed. torch is imported only where a network is built or run by torch, so a
query through a cached ONNX export does not load it.

    from medsearch.encoders import load_encoder
    encoder = load_encoder()                 # EfficientNet-Lite0, the default
    vectors = encoder.embed(batch)           # (B, 1280) float32, rows of unit length
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time, __getattr__ (below) imports each name's module on first use
    from medsearch.encoders.adapter import ADAPTER_KINDS, AdaptedEncoder, Adapter, load_adapter, save_adapter
    from medsearch.encoders.encoder import Encoder, EncoderInfo, resolve_device
    from medsearch.encoders.onnx import OnnxEncoder, cache_dir, resolve_runtime
    from medsearch.encoders.registry import DEFAULT_ENCODER, load_encoder

__all__ = [
    "ADAPTER_KINDS",
    "DEFAULT_ENCODER",
    "AdaptedEncoder",
    "Adapter",
    "Encoder",
    "EncoderInfo",
    "OnnxEncoder",
    "cache_dir",
    "load_adapter",
    "load_encoder",
    "resolve_device",
    "resolve_runtime",
    "save_adapter",
]

# Where each name lives. A query through ONNX Runtime imports neither the adapter module nor torch.
_HOME = {
    "ADAPTER_KINDS": "adapter", "AdaptedEncoder": "adapter", "Adapter": "adapter", "load_adapter": "adapter",
    "save_adapter": "adapter", "Encoder": "encoder", "EncoderInfo": "encoder", "resolve_device": "encoder",
    "OnnxEncoder": "onnx", "cache_dir": "onnx", "resolve_runtime": "onnx", "DEFAULT_ENCODER": "registry",
    "load_encoder": "registry",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"medsearch.encoders.{home}"), name)
