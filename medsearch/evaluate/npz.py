"""Embedding MedMNIST ``.npz`` splits for an evaluation: the encoders to compare, batched embedding, a cache.

:func:`embed_npz_split` embeds the images of a split in batches, exactly as
:func:`medsearch.embedding.embed_volume` embeds a case; :func:`embed_cached` keeps those vectors in a
cache folder, keyed by the data, encoder and preprocessing. :func:`parse_encoder_spec` reads
``--encoder NAME[:CHECKPOINT]``, :func:`resolve_encoders` checks the encoders to compare, and
:func:`encoder_record` describes one in a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: notebooks need no widget package

from medsearch._files import write_with
from medsearch.config import Config, EncoderConfig
from medsearch.embedding import SliceSet, encoder_input, slice_indices
from medsearch.encoders import Encoder, resolve_device
from medsearch.errors import ConfigError, WriteError
from medsearch.io import NpzSplit

__all__ = ["embed_cached", "embed_npz_split", "encoder_record", "parse_encoder_spec", "resolve_encoders"]

log = logging.getLogger(__name__)


def parse_encoder_spec(spec: str | EncoderConfig, base: EncoderConfig | None = None) -> EncoderConfig:
    """An encoder config from ``"name"`` or ``"name:checkpoint"``, other settings from ``base``.

    Examples
    --------
    >>> parse_encoder_spec("resnet18:weights/r18.pt").checkpoint
    'weights/r18.pt'
    """
    base = base or EncoderConfig()
    if isinstance(spec, EncoderConfig):
        return spec
    name, _, checkpoint = str(spec).partition(":")
    if not name.strip():
        raise ConfigError(f"encoder {spec!r} has no name; give NAME or NAME:CHECKPOINT, e.g. efficientnet-lite0")
    return _replace_encoder(base, name=name.strip(), checkpoint=checkpoint.strip())


def _replace_encoder(base: EncoderConfig, **changes: Any) -> EncoderConfig:
    return Config(encoder=base).replace(encoder=changes).encoder


def embed_npz_split(
    split: NpzSplit,
    encoder: Encoder,
    config: Config,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    modality: str = "OT",
    images_per_batch: int = 64,
    progress: bool = False,
    timings: dict[str, float] | None = None,
    keep_slices: list[SliceSet | None] | None = None,
) -> np.ndarray:
    """Embed images of a split exactly as :func:`medsearch.embedding.embed_volume` embeds a case.

    Each image is preprocessed on its own with :func:`~medsearch.transforms.preprocess_volume`
    (the same call as ``embed_volume``); the encoder then takes the slices of ``images_per_batch``
    images at once, and each image's slice vectors are pooled and normalized as ``embed_volume``
    does. The result equals ``embed_volume`` on each image up to float rounding.

    Parameters
    ----------
    split : NpzSplit
        Images to embed.
    encoder : Encoder
        A loaded encoder.
    config : Config
        Preprocessing (and the 3D encoder's volume shape).
    indices : sequence of int, optional
        Rows to embed, in this order (default: all).
    modality : str, default "OT"
        Modality the pipeline assumes (``"OT"``: percentile intensity scaling).
    images_per_batch : int, default 64
        Images preprocessed and sent to the encoder together.
    progress : bool
        Show a progress bar on stderr.
    timings : dict, optional
        Filled with ``preprocess_s``, ``encode_s`` and ``images`` (added to what it holds).
    keep_slices : list, optional
        Filled with each image's slice vectors (:class:`~medsearch.embedding.SliceSet`, None for
        a 3D encoder or tri-planar images), in the order of the rows, for re-ranking.

    Returns
    -------
    numpy.ndarray, shape (n, dim)
        Unit-length float32 rows.
    """
    info = encoder.info
    order = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.zeros((order.shape[0], encoder.dim), dtype=np.float32)
    timings = timings if timings is not None else {}
    bar = tqdm(total=order.shape[0], desc=f"embedding {split.split}", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, order.shape[0], max(1, images_per_batch)):
            batch_rows = order[start : start + images_per_batch]
            t0 = time.perf_counter()
            tensors = []
            chosen: list[list[int] | None] = []
            for volume in split.volumes(batch_rows, modality=modality):
                tensors.append(encoder_input(volume, info, config))
                chosen.append(slice_indices(volume, info, config))
            t1 = time.perf_counter()
            vectors = encoder.embed(torch.cat(tensors))
            t2 = time.perf_counter()
            counts = np.array([t.shape[0] for t in tensors])
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
            if config.preprocess.pool == "max":
                pooled = np.maximum.reduceat(vectors, offsets, axis=0)
            else:
                pooled = np.add.reduceat(vectors, offsets, axis=0) / counts[:, None]
            norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[start : start + len(batch_rows)] = pooled / norms
            if keep_slices is not None:
                for first, count, picked in zip(offsets.tolist(), counts.tolist(), chosen):
                    keep_slices.append(None if picked is None else SliceSet(
                        vectors[first : first + count].astype(np.float16), np.asarray(picked, np.int32), None))
            timings["preprocess_s"] = timings.get("preprocess_s", 0.0) + t1 - t0
            timings["encode_s"] = timings.get("encode_s", 0.0) + t2 - t1
            timings["images"] = timings.get("images", 0) + len(batch_rows)
            timings["encoder_inputs"] = timings.get("encoder_inputs", 0) + int(counts.sum())
            bar.update(len(batch_rows))
    finally:
        bar.close()
    return out


def embed_cached(
    split: NpzSplit,
    indices: np.ndarray | None,
    encoder: Encoder,
    config: Config,
    *,
    modality: str,
    images_per_batch: int,
    progress: bool,
    timings: dict[str, float],
    cache_dir: Path | None,
) -> np.ndarray:
    """:func:`embed_npz_split`, read from or written to ``cache_dir`` when one is given.

    Raises
    ------
    WriteError
        The cache file cannot be written.
    """
    if cache_dir is None:
        return embed_npz_split(
            split, encoder, config, indices=indices, modality=modality,
            images_per_batch=images_per_batch, progress=progress, timings=timings,
        )
    key = {
        "data": split.sha256(),
        "split": split.split,
        "layout": split.layout.value,
        "rows": None if indices is None else hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
        "encoder": encoder.info.to_dict(),
        "device": encoder.device.type,
        "preprocess": config.preprocess_hash(),
        "volume_shape": list(config.encoder.volume_shape),
        "modality": modality,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{split.path.stem}-{split.split}-{digest}.npy"
    if path.is_file():
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            log.warning("embedding cache file %s is unreadable; embedding again", path)
        else:
            n = len(split) if indices is None else len(indices)
            if vectors.shape == (n, encoder.dim):
                timings["cache_hits"] = timings.get("cache_hits", 0) + 1
                return vectors
    vectors = embed_npz_split(
        split, encoder, config, indices=indices, modality=modality,
        images_per_batch=images_per_batch, progress=progress, timings=timings,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_with(path, lambda f: np.save(f, vectors))
    except OSError as e:
        raise WriteError(f"cannot write the embedding cache in {cache_dir} ({e.strerror}); give a writable --cache folder") from e
    return vectors


def resolve_encoders(
    encoders: Sequence[str | EncoderConfig] | None, base: EncoderConfig, batch_size: int | None
) -> list[EncoderConfig]:
    """The encoders to evaluate (default: ``base``), each with ``batch_size`` when one is given.

    Raises
    ------
    ConfigError
        A batch size below 1, a spec without a name, or an encoder given twice.
    """
    configs = [parse_encoder_spec(e, base) for e in encoders] if encoders else [base]
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        configs = [_replace_encoder(c, batch_size=int(batch_size)) for c in configs]
    seen = set()
    for c in configs:
        label = (c.name.lower(), c.checkpoint, c.adapter)
        if label in seen:
            raise ConfigError(f"encoder {c.name}{':' + c.checkpoint if c.checkpoint else ''} is given twice; give each once")
        seen.add(label)
    return configs


def encoder_record(encoder: Encoder, config: EncoderConfig) -> dict[str, Any]:
    """What a result records of an encoder: name, dimension, weights hash, checkpoint, device, runtime."""
    info = encoder.info
    record: dict[str, Any] = {"name": info.name, "dim": info.dim, "weights_sha256": info.weights_sha256}
    if config.checkpoint:
        record["checkpoint"] = config.checkpoint
    if config.adapter:
        record["adapter"], record["adapter_sha256"] = config.adapter, config.adapter_sha256
    record["device"] = resolve_device(config.device)
    # The runtime (torch or ONNX Runtime) gives the same embedding space; record it for timings.
    record["runtime"] = str(getattr(encoder, "runtime", "torch"))
    return record
