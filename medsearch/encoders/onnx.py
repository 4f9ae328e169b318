"""The ONNX runtime: :class:`OnnxEncoder` runs an encoder's network with ONNX Runtime on the CPU.

It computes the same embeddings as the torch runtime (cosine >= 0.9999, checked in the tests),
several times faster on a small CPU (see ``benchmarks/encoder.py``). The network is exported from
its torch weights the first time an input shape is seen and cached under
``$XDG_CACHE_HOME/medsearch/onnx`` (``~/.cache/medsearch/onnx``), keyed by the weights' sha256 and
the input shape; a missing or damaged file is exported again. :func:`resolve_runtime` picks the
runtime: ``"auto"`` means ONNX on the CPU when onnxruntime is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch import _files
from medsearch.encoders.encoder import Encoder, EncoderInfo, resolve_device
from medsearch.errors import ConfigError, first_line

if TYPE_CHECKING:  # torch is imported to export or to fall back: a cached export runs without it
    import torch
    from torch import nn

__all__ = ["OnnxEncoder", "cache_dir", "resolve_runtime"]

log = logging.getLogger(__name__)


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
        self.batch_size = batch_size
        self.cache = Path(cache) if cache is not None else cache_dir() / "onnx"
        self.strict = strict
        self._build_net = build_net
        self._torch_net: nn.Module | None = None
        self._fallback: Encoder | None = None
        self._sessions: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:  # type: ignore[override]  # read-only here: always the CPU
        import torch

        return torch.device("cpu")

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
        if not isinstance(batch, np.ndarray):  # a torch tensor
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
        # Its threads sleep between calls instead of spinning: spinning, they kept the cores from what
        # follows an encode (the search of a query, the decoding workers of an index). Measured on the
        # 2-core machine: a 64-slice similarity product right after encoding 22 slices took 15 ms
        # against 8 ms, and the encode itself 185 against 174 ms.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise _ExportError(f"onnxruntime cannot load {path}: {first_line(e)}") from e


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
    import torch

    probe = torch.zeros((1, *shape), dtype=torch.float32)

    def export_to(tmp: str) -> None:
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
                raise _ExportError(first_line(e)) from e

    digest, _ = _files.write_file_with(path, export_to)
    meta = {
        "sha256": digest,
        "encoder": info.name,
        "weights_sha256": info.weights_sha256,
        "input_shape": list(shape),
        "opset": _ONNX_OPSET,
        "torch": torch.__version__,
    }
    _files.write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))


def _have_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


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
