"""Adapters: a small projection trained on a frozen encoder's embeddings, stored beside the config.

An adapter maps the L2-normalized embedding of the encoder (``in_dim``, 1280 for EfficientNet-Lite0)
to a new L2-normalized embedding (``out_dim``). It is either ``linear`` (one matrix) or ``mlp`` (two
layers with a ReLU between). Several *members* of the same shape, trained with different seeds, may
be kept: the output is their normalized outputs side by side, scaled so that the whole is of unit
length, so the cosine of two outputs is the mean of the members' cosines (an ensemble that lowers
the variance of a single small-data fit).

:class:`AdaptedEncoder` runs a loaded encoder, then its adapter, and reports its own identity: the
output dimension, and a ``weights_sha256`` that hashes the network's weights together with the
adapter file's, so that an index built through an adapter refuses a query without it (and the
reverse). ``medsearch train --mode adapter`` writes the file; ``encoder.adapter`` in a config names
it, with its ``adapter_sha256``::

    adapter = load_adapter("runs/breast.adapter.pt", sha256="...")
    encoder = AdaptedEncoder(load_encoder(), adapter, adapter_sha256="...")

The file is a torch archive of plain tensors and numbers (read with ``weights_only=True``): the
format version, the shape (kind, dimensions, members) and the state dict.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsearch import _files
from medsearch.encoders.encoder import Encoder, EncoderInfo
from medsearch.errors import ConfigError, WriteError, first_line

__all__ = ["ADAPTER_FORMAT", "ADAPTER_KINDS", "AdaptedEncoder", "Adapter", "load_adapter", "save_adapter"]

#: Version of the adapter file.
ADAPTER_FORMAT = 1
#: The shapes an adapter may take, simplest first.
ADAPTER_KINDS = ("linear", "mlp")


class Adapter(nn.Module):
    """``members`` projections of one shape; ``forward`` gives unit-length rows of ``members * out_dim``.

    Parameters
    ----------
    kind : str
        ``linear`` (``in_dim -> out_dim``) or ``mlp`` (``in_dim -> hidden -> ReLU -> out_dim``).
    in_dim, out_dim, hidden : int
        The input (the encoder's) dimension, each member's output dimension, the MLP's hidden width.
    members : int, default 1
        How many projections; their normalized outputs are concatenated and scaled by
        ``1 / sqrt(members)``.

    Raises
    ------
    ConfigError
        An unknown kind, or a dimension below 1.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, *, hidden: int = 512, members: int = 1) -> None:
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ConfigError(f"adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}")
        if min(in_dim, out_dim, hidden, members) < 1:
            raise ConfigError(
                f"adapter dimensions must be at least 1, got in {in_dim}, out {out_dim}, hidden {hidden}, members {members}"
            )
        self.kind, self.in_dim, self.out_dim = kind, int(in_dim), int(out_dim)
        self.hidden, self.members = int(hidden), int(members)
        self.heads = nn.ModuleList(self._member() for _ in range(self.members))

    def _member(self) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(self.in_dim, self.out_dim, bias=False)
        return nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.out_dim))

    @property
    def dim(self) -> int:
        """The output dimension (all members side by side)."""
        return self.out_dim * self.members

    def spec(self) -> dict[str, Any]:
        """The shape, as recorded in the file."""
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden, "members": self.members}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [nn.functional.normalize(head(x), dim=1) for head in self.heads]
        return torch.cat(outs, dim=1) / math.sqrt(self.members)

    @torch.no_grad()
    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Adapt ``(n, in_dim)`` float32 rows (the encoder's output); returns unit-length float32 rows."""
        if vectors.ndim != 2 or vectors.shape[1] != self.in_dim:
            raise ConfigError(
                f"the adapter takes {self.in_dim}-d embeddings, got shape {tuple(vectors.shape)}; "
                "use it with the encoder it was trained on"
            )
        self.eval()
        out = self(torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)))
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def save_adapter(adapter: Adapter, path: str | Path, *, record: dict[str, Any] | None = None) -> str:
    """Write ``adapter`` to ``path`` atomically; returns the file's sha256.

    ``record`` (JSON-ready: what it was trained on, how) is kept in the file as text.

    Raises
    ------
    WriteError
        The file cannot be written.
    """
    path = Path(path)
    payload = {
        "format": ADAPTER_FORMAT,
        **adapter.spec(),
        "state": {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()},
        "record": json.dumps(record or {}, sort_keys=True),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _files.write_with(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or first_line(e)}); give --out a writable folder") from e
    return _files.sha256_file(path)


def load_adapter(path: str | Path, *, sha256: str = "") -> Adapter:
    """Read an adapter file; with ``sha256``, refuse a file that is not the one recorded.

    Raises
    ------
    ConfigError
        The file is missing, unreadable, not an adapter, of another format, or not the recorded one.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"adapter file {path} does not exist; give encoder.adapter the file medsearch train wrote")
    if sha256 and _files.sha256_file(path) != sha256:
        raise ConfigError(
            f"adapter file {path} is not the one this config records (sha256 differs); "
            "use the config written beside it, or train again"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise ConfigError(f"cannot read adapter file {path} ({first_line(e)}); train it again") from e
    if not isinstance(data, dict) or "state" not in data or "kind" not in data:
        raise ConfigError(f"{path} is not a medsearch adapter file; give the .adapter.pt that medsearch train wrote")
    if data.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"adapter file {path} has format {data.get('format')!r}, not {ADAPTER_FORMAT}; train it again")
    try:
        adapter = Adapter(
            str(data["kind"]), int(data["in_dim"]), int(data["out_dim"]),
            hidden=int(data["hidden"]), members=int(data["members"]),
        )
        adapter.load_state_dict(data["state"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"adapter file {path} is damaged ({first_line(e)}); train it again") from e
    return adapter.eval()


def adapted_sha256(weights_sha256: str, adapter_sha256: str) -> str:
    """The identity of network + adapter: one hash of both (what an index compares)."""
    return hashlib.sha256(f"{weights_sha256}+adapter:{adapter_sha256}".encode()).hexdigest()


class AdaptedEncoder(Encoder):
    """A loaded encoder followed by an adapter: ``embed`` gives the adapter's unit-length output.

    Its :class:`EncoderInfo` keeps the network's name and input, and takes the adapter's output
    dimension and a ``weights_sha256`` of network and adapter together (with ``adapter_sha256``
    beside it), so a store built through it refuses vectors made without it.
    """

    def __init__(self, base: Encoder, adapter: Adapter, *, adapter_sha256: str) -> None:
        if adapter.in_dim != base.dim:
            raise ConfigError(
                f"the adapter takes {adapter.in_dim}-d embeddings but encoder {base.info.name} gives {base.dim}-d; "
                "use it with the encoder it was trained on"
            )
        self.base = base
        self.adapter = adapter.eval()
        b = base.info
        self.info = EncoderInfo(
            name=b.name,
            dim=adapter.dim,
            weights_sha256=adapted_sha256(b.weights_sha256, adapter_sha256),
            spatial_dims=b.spatial_dims,
            in_channels=b.in_channels,
            mean=b.mean,
            std=b.std,
            adapter_sha256=adapter_sha256,
        )
        self.device = base.device
        self.batch_size = base.batch_size
        self.runtime = base.runtime

    @property
    def net(self) -> nn.Module:
        """The network under the adapter."""
        return self.base.net

    def embed(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.adapter.project(self.base.embed(batch))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r}, adapter {self.adapter.kind} x{self.adapter.members}, dim={self.dim})"
