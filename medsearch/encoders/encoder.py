"""The torch runtime: an encoder's identity (:class:`EncoderInfo`) and :class:`Encoder`, which runs a
feature network with eager PyTorch.

:class:`Encoder` turns preprocessed image batches into L2-normalized float32 embeddings:
channels-last on the CPU; batched autocast (float16 by default), pinned memory and non-blocking
copies on CUDA. :func:`resolve_device` says which device ``"auto"`` means here.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a network runs: a query through ONNX Runtime never loads it
    import torch
    from torch import nn

__all__ = ["Encoder", "EncoderInfo", "resolve_device"]


@dataclass(frozen=True)
class EncoderInfo:
    """What identifies an encoder's embedding space; recorded in every index manifest."""

    name: str
    dim: int
    weights_sha256: str
    spatial_dims: int = 2
    in_channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # The sha256 of the adapter file applied after the network ("" for none); ``weights_sha256``
    # then hashes network and adapter together (see medsearch.encoders.adapter).
    adapter_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.adapter_sha256:
            out["adapter_sha256"] = self.adapter_sha256
        return out


class Encoder:
    """A frozen feature extractor: ``embed(batch)`` -> ``(B, dim)`` float32, rows of unit length.

    This class runs the network with torch (``runtime == "torch"``); :class:`OnnxEncoder` runs the
    same network with ONNX Runtime. Both take the same batches and give the same embeddings.

    Parameters
    ----------
    net
        The feature network, ``(B, C, H, W)`` -> ``(B, dim)`` (or ``(B, C, D, H, W)`` for 3D).
    info
        The encoder's identity (name, dimension, weights hash, expected input).
    device
        ``"cpu"`` or ``"cuda"``.
    batch_size
        Images per forward pass.
    cuda_precision
        Autocast dtype on CUDA: ``"float16"``, ``"bfloat16"`` or ``"float32"`` (no autocast).
    """

    runtime = "torch"

    def __init__(
        self,
        net: nn.Module,
        info: EncoderInfo,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        cuda_precision: str = "float16",
    ) -> None:
        import torch

        self.info = info
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._amp_dtype = None if cuda_precision == "float32" else getattr(torch, cuda_precision)
        self._net = net.eval().to(self.device)
        if self.device.type == "cpu" and info.spatial_dims == 2:
            # NHWC is measurably faster for these convnets on CPU (see benchmarks/encoder.py).
            self._net = self._net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def net(self) -> nn.Module:
        """The torch feature network (for fine-tuning or export)."""
        return self._net

    @property
    def dim(self) -> int:
        return self.info.dim

    def embed(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """Embed a ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) batch; returns L2-normalized float32 rows."""
        import torch

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        cuda = self.device.type == "cuda"
        if cuda and batch.device.type == "cpu" and batch.shape[0] > 0:
            # Page-locked memory lets the copies below run asynchronously with the GPU.
            batch = batch.pin_memory()
        out = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                chunk = batch[start : start + self.batch_size].to(self.device, non_blocking=True)
                if chunk.ndim == 4 and not cuda:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                if cuda and self._amp_dtype is not None:
                    with torch.autocast("cuda", dtype=self._amp_dtype):
                        feats = self._net(chunk)
                else:
                    feats = self._net(chunk)
                feats = torch.nn.functional.normalize(feats.float().flatten(1), dim=1)
                out.append(feats.cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, dim={self.dim}, device={self.device.type!r})"


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``.

    Raises
    ------
    ConfigError
        ``cuda`` is asked for and no CUDA device is available.
    """
    if device == "auto":
        if "torch" not in sys.modules and not _gpu_driver():
            return "cpu"  # no GPU driver on this machine: torch would say the same, after seconds of importing
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoder.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def _gpu_driver() -> bool:
    """Whether this machine has a GPU driver torch could use (NVIDIA, ROCm, or WSL's GPU bridge)."""
    return (
        os.path.exists("/proc/driver/nvidia/version")
        or bool(glob.glob("/dev/nvidia[0-9]*"))
        or os.path.exists("/dev/kfd")
        or os.path.exists("/dev/dxg")
    )
