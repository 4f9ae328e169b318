"""The 2D preprocessing in numpy: what :func:`~medsearch.transforms.build_slice_transform` computes,
without importing MONAI or torch.

:func:`slice_input` turns one 2D image into the ``(channels, size, size)`` float32 array an encoder
sees, step for step as the MONAI pipeline does (channel first, intensity scaling, anti-aliased
resize, symmetric zero padding, channel repeat, normalization), with the same float32 arithmetic,
so that its output is the MONAI pipeline's bit for bit (``tests/test_transforms.py`` checks it on
real images). A query therefore pays for neither library: on a small CPU, importing MONAI costs
several seconds, more than the whole query. Two steps still call torch, imported then, because
their arithmetic is torch's own: enlarging an image smaller than the encoder input (bilinear
interpolation), and averaging RGB to gray for a one-channel encoder.

Also here, shared with the MONAI transforms: the slice selection (:func:`select_slices`,
:func:`axial_indices`), the percentiles of :class:`~medsearch.transforms.PercentileScale`
(:func:`_percentiles`) and the resize matrices of :class:`~medsearch.transforms.AntiAliasedResize`
(:func:`_resize_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from medsearch.config import PreprocessConfig, SliceMode

if TYPE_CHECKING:
    import scipy.sparse

__all__ = ["axial_indices", "chosen_slices", "middle_picture", "scale_intensity", "select_slices", "slice_input", "spaced_indices"]

_F32 = np.float32


# -- one 2D image --------------------------------------------------------------------------------


def slice_input(
    image: np.ndarray,
    config: PreprocessConfig,
    *,
    modality: str,
    rgb: bool,
    channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """One ``(H, W)`` or ``(H, W, 3)`` image as the encoder sees it: ``(channels, size, size)`` float32.

    The output of ``build_slice_transform(config, modality=..., rgb=..., channels=..., mean=...,
    std=...)(image)``, bit for bit.

    Raises
    ------
    ValueError
        ``channels`` is not 1 or 3, or ``mean``/``std`` do not give one nonzero std per channel.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mean32, std32 = _normalization(mean, std, channels)
    data = np.moveaxis(np.asarray(image), -1, 0) if rgb else np.asarray(image)[np.newaxis]
    data = scale_intensity(data.astype(_F32, copy=False), config, modality=modality)
    data = _resize(data, config.size)
    data = _pad(data, config.size)
    if rgb and channels == 1:
        data = _mean_channels(data)
    elif not rgb and channels == 3:
        data = np.repeat(data, 3, axis=0)
    if data.shape[0] != len(mean32):
        raise ValueError(f"image has {data.shape[0]} channels, normalization is for {len(mean32)}")
    return (data - mean32[:, None, None]) / std32[:, None, None]


def scale_intensity(
    data: np.ndarray, config: PreprocessConfig, *, modality: str, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Raw values to [0, 1], float32: a CT window in HU (``window``, else the config's), percentiles otherwise.

    The arithmetic of ``monai.transforms.ScaleIntensityRange(clip=True)`` and of
    :class:`~medsearch.transforms.PercentileScale`.
    """
    data = np.asarray(data, dtype=_F32)
    if modality.upper() == "CT":
        center, width = window or config.ct_window
        a_min, a_max = center - width / 2, center + width / 2
        # MONAI: (img - a_min) / (a_max - a_min), then * (b_max - b_min) + b_min (exact for 0 and 1), clipped
        return np.clip((data - _F32(a_min)) / _F32(a_max - a_min), _F32(0.0), _F32(1.0))
    low, high = config.percentiles
    p_min, p_max = (_F32(v) for v in _percentiles(data, (low, high)))
    if p_max - p_min == 0.0:
        return data - p_min + _F32(0.0)  # what MONAI does for a flat range: shift, no scaling
    return np.clip((data - p_min) / (p_max - p_min), _F32(0.0), _F32(1.0))


def _normalization(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[np.ndarray, np.ndarray]:
    mean32 = np.array([float(m) for m in list(mean)[:channels]], dtype=_F32)
    std32 = np.array([float(s) for s in list(std)[:channels]], dtype=_F32)
    if len(mean32) != len(std32) or not np.all(std32 != 0):
        raise ValueError(f"mean and std need one nonzero std per channel, got {list(mean)} and {list(std)}")
    return mean32, std32


def _resize(data: np.ndarray, size: int) -> np.ndarray:
    """:class:`~medsearch.transforms.AntiAliasedResize` of a ``(C, H, W)`` float32 array."""
    height, width = data.shape[1:]
    scale = size / max(height, width)
    out_h, out_w = round(height * scale), round(width * scale)
    if (out_h, out_w) == (height, width):
        return data
    if not (out_h < height or out_w < width):
        # enlarging: no smoothing; torch's bilinear interpolation, which MONAI runs
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0)
        return torch.nn.functional.interpolate(tensor, size=(out_h, out_w), mode="bilinear", align_corners=False)[0].numpy()
    rows = _resize_matrix(height, out_h, True)
    cols_t = _resize_matrix(width, out_w, True, transposed=True)
    out = np.empty((data.shape[0], out_h, out_w), dtype=_F32)
    for c, channel in enumerate(data):
        out[c] = (rows @ channel) @ cols_t
    return out


def _pad(data: np.ndarray, size: int) -> np.ndarray:
    """Zeros around a ``(C, H, W)`` array up to ``size`` x ``size``, split as MONAI's SpatialPad splits them."""
    height, width = data.shape[1:]
    if height >= size and width >= size:
        return data
    top, left = max(size - height, 0) // 2, max(size - width, 0) // 2
    out = np.zeros((data.shape[0], max(size, height), max(size, width)), dtype=_F32)
    out[:, top : top + height, left : left + width] = data
    return out


def _mean_channels(data: np.ndarray) -> np.ndarray:
    import torch  # torch's own mean (its summation order), as the MONAI pipeline computes it

    return torch.from_numpy(np.ascontiguousarray(data)).mean(dim=0, keepdim=True).numpy()


def middle_picture(
    pixels: np.ndarray,
    *,
    config: PreprocessConfig,
    modality: str,
    rgb: bool,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """The middle slice of a volume as a gray uint8 picture at its own resolution (square pixels).

    Scaled as a thumbnail is (:func:`~medsearch.transforms.make_thumbnail`: a CT in ``window``, else
    the config's CT window; other modalities to their percentiles), but neither resized nor padded.
    """
    middle = pixels[pixels.shape[0] // 2]
    if rgb:
        middle = middle @ np.array([0.299, 0.587, 0.114], dtype=_F32)
    image = _square_pixels(middle, float(spacing[1] or 1.0), float(spacing[2] or 1.0))
    scaled = scale_intensity(image, config, modality=modality, window=window)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def picture_box(
    box: Sequence[float], shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0), size: int | None = None
) -> tuple[float, float, float, float]:
    """Where a box (x0, y0, x1, y1 in pixels of a ``shape`` = (rows, columns) slice) lies on the
    slice's picture: the full one (:func:`middle_picture`: square pixels), or with ``size`` the
    thumbnail (:func:`~medsearch.transforms.make_thumbnail`: its longer side ``size``, padded to a
    square about the centre). For drawing: exact to a pixel.

    >>> picture_box((100, 50, 200, 150), (400, 200), size=100)
    (50.0, 12.5, 75.0, 37.5)
    """
    rows, columns = int(shape[0]), int(shape[1])
    row_mm, col_mm = float(spacing[1] or 1.0), float(spacing[2] or 1.0)
    tall = max(1, int(round(rows * row_mm / col_mm))) if abs(row_mm - col_mm) > 0.01 * max(row_mm, col_mm) else rows
    x0, y0, x1, y1 = (float(v) for v in box)
    y0, y1 = y0 * tall / rows, y1 * tall / rows
    if size is None:
        return x0, y0, x1, y1
    scale = size / max(tall, columns)
    pad_x, pad_y = (size - int(round(columns * scale))) // 2, (size - int(round(tall * scale))) // 2
    return x0 * scale + pad_x, y0 * scale + pad_y, x1 * scale + pad_x, y1 * scale + pad_y


# -- a volume: which slices --------------------------------------------------------------------------


def select_slices(
    pixels: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    mode: SliceMode | str = SliceMode.AXIAL,
    count: int = 5,
    indices: Sequence[int] | None = None,
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
    indices
        ``"axial"`` mode: these slices instead of ``count`` evenly spaced ones (e.g. from
        :func:`chosen_slices`).

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
    if indices is not None and (not indices or any(not 0 <= int(i) < depth for i in indices)):
        raise ValueError(f"indices must be slices of a stack of {depth}, got {list(indices)}")
    chosen = axial_indices(depth, count=count) if indices is None else [int(i) for i in indices]
    return [_square_pixels(pixels[i], sy, sx) for i in chosen]


def spaced_indices(depth: int, *, gap_mm: float, every_mm: float, at_most: int) -> list[int]:
    """Axial slices one every ``every_mm`` millimetres of a stack whose slices are ``gap_mm`` apart.

    The slices sit at the centres of equal parts of the stack, one part per ``every_mm`` of its
    extent (``depth * gap_mm``), so that the ends are covered alike; a stack thinner than
    ``every_mm`` gives its middle slice, a stack sparser than ``every_mm`` every slice. Beyond
    ``at_most`` parts, ``at_most`` evenly spaced slices (:func:`axial_indices`).

    Examples
    --------
    >>> spaced_indices(30, gap_mm=1.0, every_mm=5.0, at_most=64)
    [2, 7, 12, 17, 22, 27]
    >>> spaced_indices(300, gap_mm=1.0, every_mm=5.0, at_most=4)
    [37, 112, 187, 262]
    >>> spaced_indices(10, gap_mm=6.0, every_mm=5.0, at_most=64)
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if depth < 1 or at_most < 1 or not gap_mm > 0 or not every_mm > 0:
        raise ValueError(f"depth and at_most must be at least 1 and the distances positive, got {depth}, {at_most}, {gap_mm}, {every_mm}")
    parts = max(1, int(math.floor(depth * gap_mm / every_mm + 1e-6)))
    return axial_indices(depth, count=min(parts, at_most))


def chosen_slices(depth: int, config: PreprocessConfig, *, gap_mm: float | None) -> list[int]:
    """The axial slices a 2D encoder sees of a stack of ``depth``: by density when
    ``config.slice_spacing_mm`` is set and the slice gap ``gap_mm`` is known, else ``config.slices``
    evenly spaced (:func:`axial_indices`).

    Examples
    --------
    >>> from medsearch.config import PreprocessConfig
    >>> chosen_slices(40, PreprocessConfig(slice_spacing_mm=10.0), gap_mm=1.0)
    [5, 15, 25, 35]
    >>> chosen_slices(40, PreprocessConfig(slice_spacing_mm=10.0), gap_mm=None)
    [4, 12, 20, 28, 36]
    """
    if config.slice_spacing_mm > 0 and gap_mm is not None and gap_mm > 0:
        return spaced_indices(depth, gap_mm=gap_mm, every_mm=config.slice_spacing_mm, at_most=config.max_slices)
    return axial_indices(depth, count=config.slices)


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


def _square_pixels(image: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Resample so that a pixel is as tall as it is wide (only when they differ by more than 1%)."""
    image = np.ascontiguousarray(image, dtype=_F32)
    if abs(row_mm - col_mm) <= 0.01 * max(row_mm, col_mm):
        return image
    from skimage.transform import resize

    scale = row_mm / col_mm
    rows = max(1, int(round(image.shape[0] * scale)))
    shape = (rows, image.shape[1]) + image.shape[2:]
    return resize(image, shape, order=1, preserve_range=True, anti_aliasing=scale < 1).astype(_F32)


# -- percentiles -------------------------------------------------------------------------------------

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
    ranks32 = (np.asarray(q, dtype=np.float64) / 100.0).astype(_F32) * _F32(n - 1)
    below = ranks32.astype(np.int64)
    above = np.ceil(ranks32).astype(np.int64)
    low, high = np.split(_order_statistics(flat, np.concatenate([below, above])), 2)
    weight = ranks32 - below.astype(_F32)
    diff = high - low
    # torch's lerp, whose multiply-add is fused (one rounding): computed in float64, rounded once
    fused = (low.astype(np.float64) + weight.astype(np.float64) * diff).astype(_F32)
    return np.where(weight < 0.5, fused, high - diff * (_F32(1.0) - weight))


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


# -- the resize matrices ---------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, smooth: bool, *, transposed: bool = False) -> scipy.sparse.csr_matrix:
    """The ``(n_out, n_in)`` float32 matrix of one axis of an anti-aliased resize (or its transpose).

    MONAI's ``Resize(anti_aliasing=True)`` smooths with its Gaussian (:func:`_gaussian_kernel`),
    then interpolates bilinearly as ``torch.nn.functional.interpolate`` does
    (``align_corners=False``): both are linear, so one axis is one matrix.
    """
    import scipy.sparse

    if transposed:
        return _resize_matrix(n_in, n_out, smooth).T.tocsr()
    # bilinear weights, as torch computes them for align_corners=False: in float32, whose rounding
    # of the source positions moves the output by up to ~1e-5 of the image's range
    scale = _F32(n_in) / _F32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=_F32) + _F32(0.5)) - _F32(0.5), _F32(0.0))
    low = np.minimum(src.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = np.clip(src - low.astype(_F32), _F32(0.0), _F32(1.0))
    out_rows = np.arange(n_out)
    interp = scipy.sparse.csr_matrix(
        (np.concatenate([_F32(1.0) - frac, frac]).astype(np.float64), (np.concatenate([out_rows, out_rows]), np.concatenate([low, high]))),
        shape=(n_out, n_in),
    )
    if not smooth:
        return interp.astype(_F32)
    # sigma from float32 factors, as MONAI computes it
    factor = _F32(n_in) / _F32(n_out)
    sigma = max((factor - _F32(1.0)) / _F32(2.0), _F32(0.0))
    kernel = _gaussian_kernel(_F32(sigma)).astype(np.float64)
    tail = (kernel.size - 1) // 2
    # the zero-padded convolution: band matrix with (conv @ x)[i] = sum_t kernel[t + tail] * x[i + t]
    conv = scipy.sparse.diags(
        [np.full(n_in - abs(t), kernel[t + tail]) for t in range(-tail, tail + 1) if abs(t) < n_in],
        [t for t in range(-tail, tail + 1) if abs(t) < n_in],
        shape=(n_in, n_in),
    )
    return (interp @ conv).tocsr().astype(_F32)


def _gaussian_kernel(sigma: np.float32, truncated: float = 4.0) -> np.ndarray:
    """MONAI's ``gaussian_1d(sigma, truncated, approx="erf")``, float32, step for step.

    Each step is MONAI's float32 arithmetic; only the error function differs: here it is rounded
    correctly from double precision, where torch uses its own float32 approximation (which differs
    between CPU instruction sets). A kernel value differs from MONAI's by at most 3e-8 (half an ulp of 1).
    """
    tail = int(max(float(sigma) * truncated, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1, dtype=_F32)
    with np.errstate(divide="ignore"):  # sigma 0 (an axis not shrunk): t is infinite, the kernel [0, 1, 0]
        t = (_F32(1.0) / np.abs(sigma)) * _F32(0.70710678)  # torch: 0.70710678 / s is reciprocal(s) * 0.70710678
    upper = _erf(t * (x + _F32(0.5)))
    lower = _erf(t * (x - _F32(0.5)))
    return np.maximum(_F32(0.5) * (upper - lower), _F32(0.0))


def _erf(values: np.ndarray) -> np.ndarray:
    return np.array([math.erf(float(v)) for v in values], dtype=np.float64).astype(_F32)
