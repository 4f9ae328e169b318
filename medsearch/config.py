"""Settings: preprocessing, encoder and index options, read from TOML presets or files.

A config is plain data. Its ``preprocess`` and ``encoder`` parts are recorded in an index manifest, and
a query through different settings is refused (see ``medsearch.store``).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from medsearch._json import json_default
from medsearch.errors import ConfigError

__all__ = [
    "Config",
    "DeidConfig",
    "as_config",
    "config_for_index",
    "EncoderConfig",
    "IndexConfig",
    "IndexType",
    "Metric",
    "PreprocessConfig",
    "SliceMode",
    "config_from_dict",
    "load_config",
    "parse_enum",
    "preset_names",
]


class SliceMode(str, enum.Enum):
    """Which slices of a volume the 2D encoder sees."""

    AXIAL = "axial"
    TRIPLANAR = "triplanar"


class Metric(str, enum.Enum):
    """How vectors are compared. Results always report a distance: lower is closer.

    ``cosine``: distance = 1 - cosine similarity (0 for identical directions, at most 2).
    ``l2``: distance = Euclidean distance between the (L2-normalized) embeddings.
    """

    COSINE = "cosine"
    L2 = "l2"


class IndexType(str, enum.Enum):
    """Which faiss index holds the vectors (see ``medsearch.store`` for the rule behind ``auto``).

    ``flat``: exact search, every query compares with every case. ``hnsw``: a graph (HNSW32) over the
    exact vectors; approximate, fast, about 4*dim + 270 bytes per case. ``ivfpq``: inverted lists of
    product-quantized codes (with an OPQ rotation), trained on a sample; approximate, tens of bytes
    per case in memory. ``ivfpq-disk``: the same, with its inverted lists and (float16) exact vectors
    in files that a query memory-maps, for collections beyond memory. ``auto``: flat for small
    collections, then hnsw, then ivfpq when hnsw would exceed ``index.memory_budget_mb``, then
    ivfpq-disk when ivfpq's codes would.
    """

    AUTO = "auto"
    FLAT = "flat"
    HNSW = "hnsw"
    IVFPQ = "ivfpq"
    IVFPQ_DISK = "ivfpq-disk"


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 224
    ct_window: tuple[float, float] = (40.0, 400.0)
    percentiles: tuple[float, float] = (1.0, 99.0)
    slices: int = 5
    slice_mode: SliceMode = SliceMode.AXIAL
    pool: str = "mean"
    # Axial slices by density: one slice every this many millimetres (0: ``slices`` evenly spaced
    # slices instead; also the fallback for a volume whose slice spacing is unknown), at most
    # ``max_slices`` of them (evenly spaced over the stack beyond that).
    slice_spacing_mm: float = 0.0
    max_slices: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "slice_mode", parse_enum(SliceMode, self.slice_mode, "preprocess.slice_mode"))
        object.__setattr__(self, "ct_window", _pair(self.ct_window, "preprocess.ct_window"))
        object.__setattr__(self, "percentiles", _pair(self.percentiles, "preprocess.percentiles"))
        if not 16 <= int(self.size) <= 2048:
            raise ConfigError(f"preprocess.size must be between 16 and 2048 pixels, got {self.size}")
        if self.ct_window[1] <= 0:
            raise ConfigError(f"preprocess.ct_window width must be positive, got {self.ct_window[1]}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"preprocess.percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if int(self.slices) < 1:
            raise ConfigError(f"preprocess.slices must be at least 1, got {self.slices}")
        if self.pool not in ("mean", "max"):
            raise ConfigError(f"preprocess.pool must be 'mean' or 'max', got {self.pool!r}")
        spacing = self.slice_spacing_mm
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 <= spacing <= 500:
            raise ConfigError(f"preprocess.slice_spacing_mm must be 0 (a fixed count) or a distance up to 500 mm, got {spacing!r}")
        object.__setattr__(self, "slice_spacing_mm", float(spacing))
        if isinstance(self.max_slices, bool) or not isinstance(self.max_slices, int) or not 1 <= self.max_slices <= 1024:
            raise ConfigError(f"preprocess.max_slices must be a whole number from 1 to 1024, got {self.max_slices!r}")


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "efficientnet-lite0"
    checkpoint: str = ""
    batch_size: int = 16
    device: str = "auto"
    # How the network runs; none of these changes the embedding space (recorded, not compared).
    # "auto": ONNX Runtime on the CPU when onnxruntime is installed (fastest measured, see
    # benchmarks/encoder.py), else torch. "torch": eager torch. "onnx": ONNX Runtime, CPU only.
    runtime: str = "auto"
    # Autocast precision on CUDA: "float16", "bfloat16" or "float32" (no autocast).
    cuda_precision: str = "float16"
    # For MONAI networks only: the input they were trained on.
    spatial_dims: int = 2
    in_channels: int = 3
    volume_shape: tuple[int, int, int] = (64, 128, 128)
    # A projection trained on this encoder's embeddings (medsearch train --mode adapter): its file,
    # and that file's sha256, checked on load. Part of the embedding space: an index records it.
    adapter: str = ""
    adapter_sha256: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_shape", tuple(int(v) for v in self.volume_shape))
        if self.adapter_sha256 and not self.adapter:
            raise ConfigError("encoder.adapter_sha256 is set without encoder.adapter; give the adapter file too, or neither")
        if self.adapter_sha256 and not (len(self.adapter_sha256) == 64 and all(c in "0123456789abcdef" for c in self.adapter_sha256)):
            raise ConfigError("encoder.adapter_sha256 must be the 64 hex digits of a sha256; copy it from the config medsearch train wrote")
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"encoder.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"encoder.in_channels must be 1 or 3, got {self.in_channels}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"encoder.batch_size must be at least 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"encoder.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.runtime not in ("auto", "torch", "onnx"):
            raise ConfigError(f"encoder.runtime must be 'auto', 'torch' or 'onnx', got {self.runtime!r}")
        if self.cuda_precision not in ("float16", "bfloat16", "float32"):
            raise ConfigError(
                f"encoder.cuda_precision must be 'float16', 'bfloat16' or 'float32', got {self.cuda_precision!r}"
            )


@dataclass(frozen=True)
class IndexConfig:
    metric: Metric = Metric.COSINE
    # side of the gray thumbnail kept per case for result sheets, in pixels; 0 keeps none
    # (256 px: 64 KiB a case, uint8; see docs/index-format.md)
    thumbnail_size: int = 256
    # images smaller than this on either side are not indexed (skipped as not_an_image); 0: no minimum
    min_image_size: int = 32
    # region queries with a box: also keep the vectors of tiles of every kept slice, a grid of G x G
    # overlapping tiles each 2/(G+1) of the image a side (2: 4 tiles of 2/3, 3: 9 of 1/2, 4: 16 of 2/5);
    # 0 keeps none. Indexing then encodes G^2 + 1 images a slice instead of 1 (docs/query.md)
    crop_grid: int = 0
    # which faiss index; "auto" follows the collection size and the memory budget
    index_type: IndexType = IndexType.AUTO
    # the most memory the faiss index may take, in MB ("auto" picks a smaller index type beyond it)
    memory_budget_mb: int = 8192
    # search-time accuracy knobs of the approximate types: more is slower and closer to exact
    ef_search: int = 256
    nprobe: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", parse_enum(Metric, self.metric, "index.metric"))
        object.__setattr__(self, "index_type", parse_enum(IndexType, self.index_type, "index.index_type"))
        for name in ("memory_budget_mb", "ef_search", "nprobe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"index.{name} must be a whole number of at least 1, got {value!r}")
        if not (self.thumbnail_size == 0 or 16 <= int(self.thumbnail_size) <= 512):
            raise ConfigError(f"index.thumbnail_size must be 0 (none) or 16 to 512 pixels, got {self.thumbnail_size}")
        if isinstance(self.crop_grid, bool) or not isinstance(self.crop_grid, int) or self.crop_grid not in (0, 2, 3, 4):
            raise ConfigError(f"index.crop_grid must be 0 (no crop vectors), 2, 3 or 4 (tiles a side), got {self.crop_grid!r}")
        if isinstance(self.min_image_size, bool) or not isinstance(self.min_image_size, int) or not 0 <= self.min_image_size <= 1024:
            raise ConfigError(f"index.min_image_size must be a whole number of pixels from 0 (no minimum) to 1024, got {self.min_image_size!r}")


@dataclass(frozen=True)
class DeidConfig:
    """The site's additions to the vocabularies the kept metadata comes from (``[deid]``).

    A header value that is in no vocabulary of :mod:`medsearch.deid.vocabulary` is kept as
    ``OTHER``; listed here, it is kept as spelled here. ``body_parts``: Body Part Examined codes
    (``"LEFTLUNG"``); ``manufacturers`` and ``models``: device names. Entries that look like a
    person name, a date, a UID or an e-mail address are refused when the index is built.
    """

    body_parts: tuple[str, ...] = ()
    manufacturers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("body_parts", "manufacturers", "models"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"deid.{name} must be a list of text entries, got {value!r}")
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (enums as strings, tuples as lists)."""
        return json.loads(json.dumps(asdict(self), default=json_default))

    def preprocess_hash(self) -> str:
        """A short hash of the preprocessing settings, recorded in an index manifest."""
        text = json.dumps(self.to_dict()["preprocess"], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys of some sections changed: ``cfg.replace(encoder={"device": "cpu"})``."""
        data = self.to_dict()
        for name, values in sections.items():
            if name not in data:
                raise ConfigError(f"unknown config section {name!r}; use preprocess, encoder, index or deid")
            data[name].update(values)
        return config_from_dict(data, source="override")


def preset_names() -> list[str]:
    """Names of the presets shipped with medsearch (the TOML files in ``configs/``)."""
    folder = resources.files("medsearch") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(source: str | Path | None = None) -> Config:
    """Read a config from a TOML file or a preset name (``"default"``, ``"chest-ct"``).

    Raises
    ------
    ConfigError
        The file is missing or not valid TOML, or a key or value is unknown.
    """
    if source is None:
        source = "default"
    path = Path(source)
    if not path.suffix and not path.exists():
        if str(source) not in preset_names():
            raise ConfigError(
                f"no config file or preset named {str(source)!r}; presets: {', '.join(preset_names())}"
            )
        text = (resources.files("medsearch") / "configs" / f"{source}.toml").read_text()
    else:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; give a TOML file or a preset name")
        text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {source} is not valid TOML: {e}") from e
    return config_from_dict(data, source=str(source))


_SECTIONS = {"preprocess": PreprocessConfig, "encoder": EncoderConfig, "index": IndexConfig, "deid": DeidConfig}


def config_from_dict(data: dict[str, Any], *, source: str = "dict") -> Config:
    """A config from its ``to_dict()`` form (as recorded in an index manifest).

    Raises
    ------
    ConfigError
        An unknown section or key, or a bad value.
    """
    parts: dict[str, Any] = {}
    for name, values in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"config {source}: unknown section [{name}]; use preprocess, encoder, index or deid")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"config {source}: unknown key(s) in [{name}]: {', '.join(unknown)}")
        try:
            parts[name] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"config {source}: bad value in [{name}]: {e}") from e
    return Config(**parts)


def as_config(config: Config | str | Path | None) -> Config:
    """A config object, a preset name or TOML path (:func:`load_config`), or None for the default."""
    return config if isinstance(config, Config) else load_config(config)


def config_for_index(recorded: Mapping[str, Any] | None) -> Config:
    """The config an index recorded in its manifest, to query or extend it with the same settings.

    Raises
    ------
    ConfigError
        The manifest records no config (an index from an older medsearch).
    """
    data = dict(recorded or {})
    if not data:
        raise ConfigError("the index manifest records no config; rebuild the index with this medsearch version")
    # Where and how the network runs is this machine's choice; neither changes the embeddings.
    data["encoder"] = {**data["encoder"], "device": "auto", "runtime": "auto"}
    return config_from_dict(data, source="index manifest")


def parse_enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    """``cls(value)``, or a :class:`ConfigError` that names the setting and lists its choices."""
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}") from None


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        a, b = value
        return float(a), float(b)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be two numbers, got {value!r}") from None
