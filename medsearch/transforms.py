"""Preprocessing with MONAI: from decoded pixels to the tensors an encoder expects.

Two steps, kept apart so each is easy to test:

* :func:`select_slices` picks the 2D images a 2D encoder sees from a volume (evenly spaced axial
  slices, or the three central planes) and resamples them to square pixels.
* :func:`build_slice_transform` returns a ``monai.transforms.Compose`` for one 2D image: intensity
  windowing per modality, aspect-keeping resize and pad to the encoder input, channel handling, and the
  normalization the encoder was trained with. :func:`build_volume_transform` does the same for 3D
  encoders (MONAI networks with ``spatial_dims=3``).
* :class:`PercentileScale` and :class:`AntiAliasedResize` are faster forms of two MONAI transforms
  with the same output (to float32 rounding): an index records the preprocessing settings, not the
  code, so what a setting produces must not move.

This layer takes numpy arrays and plain numbers; it knows nothing of DICOM headers or of encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.sparse
import torch
from monai.data import MetaTensor
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    Lambda,
    RepeatChannel,
    Resize,
    ScaleIntensityRange,
    SpatialPad,
    Transform,
)
from skimage.transform import resize as _sk_resize

from medsearch.config import PreprocessConfig, SliceMode

__all__ = [
    "AntiAliasedResize",
    "ChannelAffine",
    "PercentileScale",
    "axial_indices",
    "build_slice_transform",
    "build_volume_transform",
    "intensity_transform",
    "make_thumbnail",
    "preprocess_volume",
    "select_slices",
]


class ChannelAffine(Transform):
    """``(img - mean[c]) / std[c]`` per channel of a channel-first image.

    Does what ``monai.transforms.NormalizeIntensity(subtrahend, divisor, channel_wise=True)`` does
    with fixed values, as one broadcast operation: measured about 100x faster here, where MONAI's
    per-channel loop dominated preprocessing time (CHANGELOG.md).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s == 0 for s in std):
            raise ValueError(f"mean and std need one nonzero std per channel, got {list(mean)} and {list(std)}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(img, MetaTensor):
            img = img.as_tensor()
        data = torch.as_tensor(img, dtype=torch.float32)
        if data.shape[0] != len(self.mean):
            raise ValueError(f"image has {data.shape[0]} channels, normalization is for {len(self.mean)}")
        shape = (-1,) + (1,) * (data.ndim - 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return (data - mean) / std


class PercentileScale(Transform):
    """Map the ``lower``..``upper`` percentile range of an image to ``b_min``..``b_max``, clipped.

    The output of ``monai.transforms.ScaleIntensityRangePercentiles(lower, upper, b_min, b_max,
    clip=True)``, found faster: MONAI computes the two percentiles one at a time, with two
    ``np.percentile`` calls (each a partial sort of the whole image) or, for images of at most a
    million values, two ``torch.quantile`` calls (each a full sort, about 0.25 s for a 900 x 900
    radiograph). Here both come from one partial sort of the image's tails
    (:func:`_order_statistics`), then are interpolated with the arithmetic of the library MONAI
    would have used (``torch.quantile``: float32 ranks and a fused lerp; numpy: float64), so that
    the output is the same to the last bit or two of float32.
    """

    def __init__(self, lower: float, upper: float, *, b_min: float = 0.0, b_max: float = 1.0) -> None:
        if not 0.0 <= lower <= upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower <= upper <= 100, got {lower} and {upper}")
        self.lower = float(lower)
        self.upper = float(upper)
        self.b_min = float(b_min)
        self.b_max = float(b_max)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(img, MetaTensor):
            img = img.as_tensor()
        out = torch.as_tensor(img, dtype=torch.float32)
        a_min, a_max = (torch.tensor(v, dtype=torch.float32) for v in _percentiles(out.numpy(), (self.lower, self.upper)))
        if a_max - a_min == 0.0:
            # what MONAI does for a flat range (after a warning): shift, no scaling, no clipping
            return out - a_min + self.b_min
        # MONAI's arithmetic, in place on one new tensor (the input may share its memory with `out`)
        out = out - a_min
        out /= a_max - a_min
        if (self.b_min, self.b_max) != (0.0, 1.0):
            out *= self.b_max - self.b_min
            out += self.b_min
        return out.clamp_(self.b_min, self.b_max)


# MONAI's percentile() hands tensors of more values than this to numpy (pytorch#64947)
_TORCH_QUANTILE_LIMIT = 1_000_000


def _percentiles(data: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """The ``q`` percentiles of ``data`` (float32), each as ``monai.transforms.utils.percentile`` finds it.

    Linear interpolation between neighbouring order statistics; where MONAI would use numpy, the
    arithmetic is numpy's (float64); where it would use ``torch.quantile``, torch's (float32).
    """
    flat = data.ravel()
    n = flat.size
    if n > _TORCH_QUANTILE_LIMIT:
        fraction = np.asarray(q, dtype=np.float64) / 100.0
        ranks = n * fraction + (1.0 - fraction) - 1.0  # numpy's virtual index for method="linear"
        below = np.floor(ranks).astype(np.int64)
        above = np.minimum(below + 1, n - 1)
        weights = ranks - below
        low, high = np.split(_order_statistics(flat, np.concatenate([below, above])), 2)
        diff = high - low  # in float32, as numpy subtracts the two float32 values
        return np.where(weights >= 0.5, high - diff * (1.0 - weights), low + diff * weights)
    ranks32 = (np.asarray(q, dtype=np.float64) / 100.0).astype(np.float32) * np.float32(n - 1)
    below = ranks32.astype(np.int64)
    above = np.ceil(ranks32).astype(np.int64)
    low, high = np.split(_order_statistics(flat, np.concatenate([below, above])), 2)
    weight = ranks32 - below.astype(np.float32)
    diff = high - low
    # torch's lerp, whose multiply-add is fused (one rounding): computed in float64, rounded once
    fused = (low.astype(np.float64) + weight.astype(np.float64) * diff).astype(np.float32)
    return np.where(weight < 0.5, fused, high - diff * (np.float32(1.0) - weight))


def _order_statistics(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``np.sort(flat)[ranks]``, exactly, without sorting or partitioning all of ``flat``.

    Percentiles for intensity scaling lie in the tails of an image: a strided sample of the image
    gives two thresholds that cut off both tails with room to spare; one pass keeps the values of
    the tails, and only those are partitioned. When a threshold misses a rank (an unlucky sample),
    the tails overlap, or the image holds NaN or infinity, all of ``flat`` is partitioned, as
    np.percentile does.
    """
    n = flat.size
    ranks = np.asarray(ranks, dtype=np.int64)
    if n < 100_000:
        return _partitioned(flat, ranks)
    sample = np.sort(flat[:: n // 20_000])
    m = sample.size
    fractions = ranks / (n - 1)
    low, high = ranks[fractions < 0.5], ranks[fractions >= 0.5]
    low_p = fractions.max(initial=0.0, where=fractions < 0.5)
    high_p = fractions.min(initial=1.0, where=fractions >= 0.5)
    # well beyond the sampling error of a sample quantile (its standard deviation is sqrt(p(1-p)/m))
    low_cut = sample[min(m - 1, int(np.ceil((low_p + _margin(low_p, m)) * (m - 1))))]
    high_cut = sample[max(0, int(np.floor((high_p - _margin(high_p, m)) * (m - 1))))]
    if low_cut < high_cut and np.isfinite(flat.sum()):
        # (ties at a cut go with their tail: an image often holds many pixels of its percentile value)
        tails = flat[(flat <= low_cut) | (flat >= high_cut)]
        n_low = int(np.count_nonzero(tails <= low_cut))
        n_middle = n - tails.size
        if (low.size == 0 or low.max() < n_low) and (high.size == 0 or high.min() >= n_middle + n_low):
            local = np.where(ranks < n_low, ranks, ranks - n_middle)
            return np.partition(tails, local)[local]
    return _partitioned(flat, ranks)


def _margin(p: float, m: int) -> float:
    return 0.002 + 8.0 * np.sqrt(max(p * (1.0 - p), 1.0 / m) / m)


def _partitioned(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    if np.isnan(flat).any():  # numpy and torch both give NaN for every percentile then
        return np.full(ranks.shape, np.nan, dtype=flat.dtype)
    return np.partition(flat, ranks)[ranks]


class AntiAliasedResize(Transform):
    """Resize a channel-first 2D image so its longest side is ``size``, smoothing first when shrinking.

    The output of ``monai.transforms.Resize(size, size_mode="longest", mode="bilinear",
    anti_aliasing=True)`` within float32 rounding: MONAI's Gaussian (its ``gaussian_1d`` kernel,
    sigma ``(factor - 1) / 2`` per axis, zero padding), then bilinear interpolation as
    ``torch.nn.functional.interpolate`` does it (``align_corners=False``). Both steps are linear and
    act on rows and columns separately, so each axis is one sparse ``(out, in)`` matrix, and the image
    is ``rows @ img @ cols.T``. Only the smoothed values that the interpolation reads get computed:
    for a 1,955 x 1,841 radiograph, about a hundredth of MONAI's two full-size convolutions. An
    image that only grows is not smoothed; it goes through torch's interpolation as in MONAI.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = int(size)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(img, MetaTensor):
            img = img.as_tensor()
        data = img.numpy(force=True) if isinstance(img, torch.Tensor) else np.asarray(img)
        if data.ndim != 3:
            raise ValueError(f"AntiAliasedResize takes a (C, H, W) image, got shape {data.shape}")
        data = data.astype(np.float32, copy=False)
        height, width = data.shape[1:]
        scale = self.size / max(height, width)
        out_h, out_w = round(height * scale), round(width * scale)
        if (out_h, out_w) == (height, width):
            return torch.as_tensor(data, dtype=torch.float32)
        smooth = out_h < height or out_w < width  # MONAI smooths every axis (sigma 0 where not shrunk)
        if not smooth:
            # enlarging: no smoothing, and torch's interpolation is cheap and bit-identical to MONAI's
            tensor = torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0)
            return torch.nn.functional.interpolate(tensor, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        rows = _resize_matrix(height, out_h, smooth)
        cols_t = _resize_matrix(width, out_w, smooth, transposed=True)
        out = np.empty((data.shape[0], out_h, out_w), dtype=np.float32)
        for c, channel in enumerate(data):
            out[c] = (rows @ channel) @ cols_t
        return torch.from_numpy(out)


@lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, smooth: bool, *, transposed: bool = False) -> scipy.sparse.csr_matrix:
    """The ``(n_out, n_in)`` float32 matrix of one axis of :class:`AntiAliasedResize` (or its transpose)."""
    if transposed:
        return _resize_matrix(n_in, n_out, smooth).T.tocsr()
    # bilinear weights, as torch computes them for align_corners=False: in float32, whose rounding
    # of the source positions moves the output by up to ~1e-5 of the image's range
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    low = np.minimum(src.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = np.clip(src - low.astype(np.float32), np.float32(0.0), np.float32(1.0))
    out_rows = np.arange(n_out)
    interp = scipy.sparse.csr_matrix(
        (np.concatenate([np.float32(1.0) - frac, frac]).astype(np.float64), (np.concatenate([out_rows, out_rows]), np.concatenate([low, high]))),
        shape=(n_out, n_in),
    )
    if not smooth:
        return interp.astype(np.float32)
    # sigma from float32 factors, as MONAI computes it, and MONAI's own kernel
    factor = torch.tensor(float(n_in), dtype=torch.float32) / torch.tensor(float(n_out), dtype=torch.float32)
    sigma = torch.clamp((factor - 1) / 2, min=0.0)
    kernel = gaussian_1d(sigma, truncated=4.0, approx="erf").double().numpy()
    tail = (kernel.size - 1) // 2
    # the zero-padded convolution: band matrix with (conv @ x)[i] = sum_t kernel[t + tail] * x[i + t]
    conv = scipy.sparse.diags(
        [np.full(n_in - abs(t), kernel[t + tail]) for t in range(-tail, tail + 1) if abs(t) < n_in],
        [t for t in range(-tail, tail + 1) if abs(t) < n_in],
        shape=(n_in, n_in),
    )
    return (interp @ conv).tocsr().astype(np.float32)


def select_slices(
    pixels: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    mode: SliceMode | str = SliceMode.AXIAL,
    count: int = 5,
) -> list[np.ndarray]:
    """Pick the 2D images of a volume that a 2D encoder sees.

    Parameters
    ----------
    pixels
        ``(Z, H, W)`` gray or ``(Z, H, W, 3)`` RGB; a 2D image is a volume with ``Z == 1``.
    spacing
        ``(z, y, x)`` voxel size in mm, used to give coronal and sagittal planes their true aspect.
    mode
        ``"axial"``: ``count`` axial slices at the centres of ``count`` equal parts of the stack (all
        slices when there are fewer). ``"triplanar"``: the central axial, coronal and sagittal planes
        (only the axial one for a single-slice volume).
    count
        Number of axial slices in ``"axial"`` mode.

    Returns
    -------
    list of ``(H, W)`` or ``(H, W, 3)`` float32 arrays with square pixels.

    Raises
    ------
    ValueError
        ``pixels`` is not 3D gray or 4D RGB, or ``count`` < 1.

    Examples
    --------
    >>> vol = np.zeros((10, 4, 4), dtype=np.float32)
    >>> len(select_slices(vol, count=3)), len(select_slices(vol[:1], count=3))
    (3, 1)
    """
    mode = SliceMode(mode)
    if pixels.ndim not in (3, 4) or (pixels.ndim == 4 and pixels.shape[-1] != 3):
        raise ValueError(f"pixels must be (Z, H, W) or (Z, H, W, 3), got shape {pixels.shape}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    depth = pixels.shape[0]
    sz, sy, sx = (float(s) if s and s > 0 else 1.0 for s in spacing)
    if mode is SliceMode.TRIPLANAR and depth > 1:
        axial = pixels[depth // 2]
        coronal = pixels[:, pixels.shape[1] // 2]
        sagittal = pixels[:, :, pixels.shape[2] // 2]
        # Volumes are stored top slice first only by convention of our sort (ascending position);
        # flip so that the head end is at the top of coronal and sagittal images.
        return [
            _square_pixels(axial, sy, sx),
            _square_pixels(coronal[::-1], sz, sx),
            _square_pixels(sagittal[::-1], sz, sy),
        ]
    return [_square_pixels(pixels[i], sy, sx) for i in axial_indices(depth, count=count)]


def axial_indices(depth: int, *, count: int) -> list[int]:
    """The axial slices :func:`select_slices` picks in ``"axial"`` mode from a stack of ``depth``.

    The centres of ``count`` equal parts of the stack (all slices when there are fewer). A loader
    can call this with the depth alone, to decode only these slices.

    Examples
    --------
    >>> axial_indices(8, count=5), axial_indices(3, count=5)
    ([0, 2, 4, 5, 7], [0, 1, 2])
    """
    if depth < 1 or count < 1:
        raise ValueError(f"depth and count must be at least 1, got {depth} and {count}")
    wanted = min(count, depth)
    return sorted({int((i + 0.5) * depth / wanted) for i in range(wanted)})


def intensity_transform(config: PreprocessConfig, *, modality: str) -> ScaleIntensityRange | PercentileScale:
    """Map raw values to [0, 1]: the configured HU window for CT, percentile scaling otherwise."""
    if modality.upper() == "CT":
        center, width = config.ct_window
        return ScaleIntensityRange(
            a_min=center - width / 2, a_max=center + width / 2, b_min=0.0, b_max=1.0, clip=True
        )
    low, high = config.percentiles
    return PercentileScale(low, high, b_min=0.0, b_max=1.0)


def build_slice_transform(
    config: PreprocessConfig,
    *,
    modality: str,
    rgb: bool,
    channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> Compose:
    """The MONAI pipeline for one 2D image, ``(H, W)`` or ``(H, W, 3)`` -> ``(channels, size, size)``.

    Parameters
    ----------
    config
        Preprocessing settings (window, percentiles, input size).
    modality
        DICOM modality; ``"CT"`` selects HU windowing.
    rgb
        The input has a trailing colour axis.
    channels
        Channels the encoder takes: 1 (gray) or 3 (gray repeated, or RGB kept).
    mean, std
        Per-channel normalization the encoder expects after scaling to [0, 1]
        (EfficientNet-Lite: 0.5 and 0.5, i.e. inputs in [-1, 1]).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    steps: list = [EnsureChannelFirst(channel_dim=-1 if rgb else "no_channel")]
    steps.append(intensity_transform(config, modality=modality))
    steps.append(AntiAliasedResize(config.size))
    steps.append(SpatialPad(spatial_size=(config.size, config.size)))
    # plain tensors from here on: MONAI's metadata tracking costs more than the arithmetic
    steps.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    if rgb and channels == 1:
        steps.append(Lambda(_mean_channels))
    elif not rgb and channels == 3:
        steps.append(RepeatChannel(repeats=3))
    steps.append(ChannelAffine(mean=list(mean)[:channels], std=list(std)[:channels]))
    steps.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(steps)


def build_volume_transform(
    config: PreprocessConfig,
    *,
    modality: str,
    shape: Sequence[int] = (64, 128, 128),
    mean: float = 0.0,
    std: float = 1.0,
) -> Compose:
    """The MONAI pipeline for a 3D encoder: ``(Z, H, W)`` -> ``(1, *shape)``.

    RGB volumes are averaged to gray first by :func:`preprocess_volume`.
    """
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            intensity_transform(config, modality=modality),
            Resize(spatial_size=tuple(shape), mode="trilinear"),
            ChannelAffine(mean=[mean], std=[std]),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def preprocess_volume(
    pixels: np.ndarray,
    *,
    config: PreprocessConfig,
    modality: str,
    rgb: bool,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    spatial_dims: int = 2,
    channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    volume_shape: Sequence[int] = (64, 128, 128),
) -> torch.Tensor:
    """Turn a decoded volume into a batch for an encoder.

    Returns ``(S, channels, size, size)`` for a 2D encoder (``S`` selected slices, see
    :func:`select_slices`) or ``(1, 1, *volume_shape)`` for a 3D encoder.
    """
    if spatial_dims == 3:
        gray = pixels.mean(axis=-1) if rgb else pixels
        transform = build_volume_transform(
            config, modality=modality, shape=volume_shape, mean=float(mean[0]), std=float(std[0])
        )
        return transform(gray.astype(np.float32, copy=False)).unsqueeze(0)
    transform = build_slice_transform(config, modality=modality, rgb=rgb, channels=channels, mean=mean, std=std)
    slices = select_slices(pixels, spacing=spacing, mode=config.slice_mode, count=config.slices)
    return torch.stack([transform(s) for s in slices])


def make_thumbnail(
    pixels: np.ndarray,
    *,
    config: PreprocessConfig,
    modality: str,
    rgb: bool,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    size: int = 96,
) -> np.ndarray:
    """A small gray picture of a case for result sheets: ``(size, size)`` uint8.

    The middle axial slice, windowed as for the encoder (CT window or percentiles), aspect kept and
    padded with black. Only source pixels are used: nothing is drawn on it.
    """
    middle = pixels[pixels.shape[0] // 2]
    if rgb:
        middle = middle @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    image = _square_pixels(middle, float(spacing[1] or 1.0), float(spacing[2] or 1.0))
    steps = Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            intensity_transform(config, modality=modality),
            Resize(spatial_size=size, size_mode="longest", mode="area"),
            SpatialPad(spatial_size=(size, size)),
            EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
        ]
    )
    out = np.asarray(steps(image))[0]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _square_pixels(image: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Resample so that a pixel is as tall as it is wide (only when they differ by more than 1%)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if abs(row_mm - col_mm) <= 0.01 * max(row_mm, col_mm):
        return image
    scale = row_mm / col_mm
    rows = max(1, int(round(image.shape[0] * scale)))
    shape = (rows, image.shape[1]) + image.shape[2:]
    return _sk_resize(image, shape, order=1, preserve_range=True, anti_aliasing=scale < 1).astype(np.float32)


def _mean_channels(img: torch.Tensor) -> torch.Tensor:
    # A module-level function rather than a lambda, so the pipeline pickles into worker processes.
    return img.mean(dim=0, keepdim=True)
