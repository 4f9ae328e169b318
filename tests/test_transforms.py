from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    NormalizeIntensity,
    RepeatChannel,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPad,
)
from monai.transforms.utils_pytorch_numpy_unification import (
    percentile as monai_percentile,
)
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from medsearch.config import PreprocessConfig
from medsearch.io import load_volume, scan
from medsearch.transforms import (
    AntiAliasedResize,
    PercentileScale,
    build_slice_transform,
    encoder_batch,
    make_thumbnail,
    middle_picture,
    preprocess_volume,
    select_slices,
    slice_input,
)
from medsearch.transforms.arrays import _percentiles


def _ct_hu() -> np.ndarray:
    ds = pydicom.examples.ct
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


def test_ct_window_maps_hu_to_encoder_range():
    hu = _ct_hu()
    cfg = PreprocessConfig(size=64, ct_window=(40.0, 400.0))
    out = build_slice_transform(cfg, modality="CT", rgb=False)(hu)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # the three channels are the same gray image
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # a pixel at exactly the window's upper end (240 HU) is white, below the lower end (-160) black
    probe = np.array([[-1000.0, 240.0], [40.0, 3000.0]], dtype=np.float32)
    small = build_slice_transform(PreprocessConfig(size=16), modality="CT", rgb=False)(probe)
    assert float(small.max()) == pytest.approx(1.0) and float(small.min()) == pytest.approx(-1.0)


def test_percentile_scaling_for_other_modalities_ignores_outliers():
    img = np.full((32, 32), 100.0, dtype=np.float32)
    img[:16] = 200.0
    img[0, 0] = 1e6  # one hot pixel must not wash the image out
    out = build_slice_transform(PreprocessConfig(size=32), modality="MR", rgb=False)(img)
    assert float(out[0, 20, 20]) == pytest.approx(-1.0)
    assert float(out[0, 8, 8]) == pytest.approx(1.0)


def test_aspect_is_kept_and_padded():
    img = np.ones((20, 40), dtype=np.float32)
    img[:, :2] = 0.0
    out = build_slice_transform(PreprocessConfig(size=40, percentiles=(0.0, 100.0)), modality="MR", rgb=False)(img)
    assert out.shape == (3, 40, 40)
    # 20 rows scaled to 20 rows, padded by 10 above and below with the darkest value
    assert float(out[0, 0, 20]) == pytest.approx(-1.0) and float(out[0, 39, 20]) == pytest.approx(-1.0)
    assert float(out[0, 20, 20]) == pytest.approx(1.0)


def test_rgb_input_and_gray_encoder():
    rgb = np.random.default_rng(0).uniform(0, 255, (30, 30, 3)).astype(np.float32)
    out3 = build_slice_transform(PreprocessConfig(size=32), modality="US", rgb=True)(rgb)
    out1 = build_slice_transform(PreprocessConfig(size=32), modality="US", rgb=True, channels=1, mean=[0.0], std=[1.0])(rgb)
    assert out3.shape == (3, 32, 32) and out1.shape == (1, 32, 32)


SLICE_CASES = [
    # depth, mode, count, expected number of images
    (1, "axial", 5, 1),
    (3, "axial", 5, 3),
    (28, "axial", 5, 5),
    (28, "triplanar", 5, 3),
    (1, "triplanar", 5, 1),
]


@pytest.mark.parametrize(("depth", "mode", "count", "expected"), SLICE_CASES)
def test_select_slices_counts(depth, mode, count, expected):
    vol = np.zeros((depth, 16, 16), dtype=np.float32)
    assert len(select_slices(vol, mode=mode, count=count)) == expected


def test_axial_slices_are_evenly_spaced_and_triplanar_has_true_aspect():
    vol = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 8, 8), dtype=np.float32)
    picked = [int(s[0, 0]) for s in select_slices(vol, count=5)]
    assert picked == [1, 3, 5, 7, 9]
    coronal = select_slices(vol, mode="triplanar", spacing=(4.0, 1.0, 1.0))[1]
    assert coronal.shape == (40, 8)  # 10 slices of 4 mm next to 1 mm pixels


def test_select_slices_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        select_slices(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="count"):
        select_slices(np.zeros((2, 4, 4)), count=0)


def test_preprocess_volume_for_2d_and_3d_encoders():
    vol = np.random.default_rng(1).normal(0, 300, (12, 40, 40)).astype(np.float32)
    cfg = PreprocessConfig(size=32, slices=4)
    assert preprocess_volume(vol, config=cfg, modality="CT", rgb=False).shape == (4, 3, 32, 32)
    out3d = preprocess_volume(vol, config=cfg, modality="CT", rgb=False, spatial_dims=3, channels=1,
                              mean=[0.0], std=[1.0], volume_shape=(8, 16, 16))
    assert out3d.shape == (1, 1, 8, 16, 16)


# -- the fast forms of MONAI transforms give MONAI's output ---------------------------------------------

SAMPLE_CT = sorted((Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample" / "tcga-luad-ct").glob("*.dcm"))
# (file, where it comes from): pydicom's test files, pydicom-data's radiographs, the bundled sample
REAL_IMAGES = [
    ("CT_small.dcm", "pydicom"),
    ("MR_small.dcm", "pydicom"),
    ("US1_UNCR.dcm", "pydicom"),  # RGB
    ("RG1_UNCI.dcm", "pydicom-data"),  # CR, 1955 x 1841: numpy percentiles in MONAI
    ("RG3_UNCI.dcm", "pydicom-data"),
    (SAMPLE_CT[0].name, "sample"),
    (SAMPLE_CT[1].name, "sample"),
]


def _real_image(name: str, source: str) -> tuple[np.ndarray, bool]:
    """A real image as the loader gives it, ``(H, W)`` or ``(H, W, 3)`` float32, and whether it is RGB."""
    if source == "sample":
        path = next(p for p in SAMPLE_CT if p.name == name)
    else:
        path = get_testdata_file(name)
        if path is None:
            pytest.skip(f"{name} is in {source}, which is not installed")
    volume, _ = load_volume(scan([Path(path)]).cases[0])
    return volume.pixels[0], volume.rgb


def _channel_first(image: np.ndarray, rgb: bool) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(image, -1, 0) if rgb else image[np.newaxis])


def _monai_slice_transform(config: PreprocessConfig, *, modality: str, rgb: bool) -> Compose:
    """build_slice_transform as it was with MONAI's own percentile scaling and resize (3 channels)."""
    if modality == "CT":
        center, width = config.ct_window
        scale = ScaleIntensityRange(a_min=center - width / 2, a_max=center + width / 2, b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = ScaleIntensityRangePercentiles(lower=config.percentiles[0], upper=config.percentiles[1], b_min=0.0, b_max=1.0, clip=True)
    steps = [
        EnsureChannelFirst(channel_dim=-1 if rgb else "no_channel"),
        scale,
        Resize(spatial_size=config.size, size_mode="longest", mode="bilinear", anti_aliasing=True),
        SpatialPad(spatial_size=(config.size, config.size)),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    if not rgb:
        steps.append(RepeatChannel(repeats=3))
    steps.append(NormalizeIntensity(subtrahend=[0.5] * 3, divisor=[0.5] * 3, channel_wise=True))
    return Compose(steps)


@pytest.mark.parametrize(("name", "source"), REAL_IMAGES)
@pytest.mark.parametrize("size", [224, 96])
def test_slice_transform_matches_monai_on_real_images(name, source, size):
    image, rgb = _real_image(name, source)
    config = PreprocessConfig(size=size)
    for modality in ("CT", "CR") if not rgb else ("US",):
        ours = build_slice_transform(config, modality=modality, rgb=rgb)(image)
        monai = torch.as_tensor(_monai_slice_transform(config, modality=modality, rgb=rgb)(image))
        assert ours.shape == monai.shape
        assert float((ours - monai).abs().max()) < 1e-5, modality


@pytest.mark.parametrize(("name", "source"), REAL_IMAGES)
def test_percentile_scale_matches_monai_on_real_images(name, source):
    image, rgb = _real_image(name, source)
    data = _channel_first(image, rgb)
    ours = PercentileScale(1.0, 99.0)(data)
    monai = torch.as_tensor(ScaleIntensityRangePercentiles(1.0, 99.0, 0.0, 1.0, clip=True)(torch.as_tensor(data)))
    assert float((ours - monai).abs().max()) < 1e-6


@pytest.mark.parametrize(("name", "source"), REAL_IMAGES)
@pytest.mark.parametrize("size", [224, 96, 300])
def test_anti_aliased_resize_matches_monai_on_real_images(name, source, size):
    image, rgb = _real_image(name, source)
    data = PercentileScale(1.0, 99.0)(_channel_first(image, rgb))
    ours = AntiAliasedResize(size)(data)
    monai = torch.as_tensor(Resize(size, size_mode="longest", mode="bilinear", anti_aliasing=True)(data))
    assert ours.shape == monai.shape
    assert float((ours - monai).abs().max()) < 1e-5


@pytest.mark.parametrize(("name", "source"), REAL_IMAGES)
def test_thumbnail_is_unchanged(name, source):
    image, rgb = _real_image(name, source)
    config = PreprocessConfig()
    gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if rgb else image
    old = Compose([
        EnsureChannelFirst(channel_dim="no_channel"),
        ScaleIntensityRangePercentiles(lower=1.0, upper=99.0, b_min=0.0, b_max=1.0, clip=True),
        Resize(spatial_size=96, size_mode="longest", mode="area"),
        SpatialPad(spatial_size=(96, 96)),
        EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
    ])(gray)
    expected = np.clip(np.rint(np.asarray(old)[0] * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(make_thumbnail(image[np.newaxis], config=config, modality="CR", rgb=rgb, size=96), expected)


def _ties(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 4, n).astype(np.float32)


def _mostly_zero(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[: n // 50] = rng.normal(size=n // 50) * 100
    return out


def _sorted(n: int, rng: np.random.Generator) -> np.ndarray:  # a strided sample of it is not random
    return np.sort(rng.exponential(size=n) * 1000).astype(np.float32)


def _with_nan(n: int, rng: np.random.Generator) -> np.ndarray:
    out = rng.normal(size=n).astype(np.float32)
    out[n // 3] = np.nan
    return out


def _with_inf(n: int, rng: np.random.Generator) -> np.ndarray:
    out = rng.normal(size=n).astype(np.float32)
    out[n // 3] = np.inf
    return out


# arrays on both sides of MONAI's switch from torch.quantile to numpy at a million values
PERCENTILE_CASES = [
    (make, n, q)
    for make in (_ties, _mostly_zero, _sorted, _with_nan, _with_inf)
    for n in (37, 150_000, 1_000_000, 1_000_001, 2_500_000)
    for q in ((1.0, 99.0), (0.0, 100.0), (37.5, 62.5))
]


@pytest.mark.parametrize(("make", "n", "q"), PERCENTILE_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_percentiles_are_monais(make, n, q):
    data = make(n, np.random.default_rng(n))
    tensor = torch.as_tensor(data)
    expected = [float(monai_percentile(tensor, v)) for v in q]
    np.testing.assert_array_equal(_percentiles(data, q).astype(np.float32), np.array(expected, dtype=np.float32))


BAD_FAST_TRANSFORMS = [
    (lambda: PercentileScale(99.0, 1.0), ValueError, "0 <= lower <= upper <= 100"),
    (lambda: PercentileScale(-1.0, 50.0), ValueError, "0 <= lower <= upper <= 100"),
    (lambda: AntiAliasedResize(0), ValueError, "size must be at least 1"),
    (lambda: AntiAliasedResize(8)(np.zeros((16, 16), dtype=np.float32)), ValueError, r"\(C, H, W\) image"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_FAST_TRANSFORMS)
def test_fast_transforms_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_percentile_scale_of_a_flat_image_is_what_monai_gives():
    flat = np.full((1, 20, 20), 7.0, dtype=np.float32)
    with pytest.warns(Warning, match="Divide by zero"):
        monai = ScaleIntensityRangePercentiles(1.0, 99.0, 0.0, 1.0, clip=True)(torch.as_tensor(flat))
    assert torch.equal(PercentileScale(1.0, 99.0)(flat), torch.as_tensor(monai))


# -- the numpy pipeline is the MONAI pipeline, bit for bit (issue 17) ------------------------------------

NUMPY_CASES = [
    # (image, source, size, modality, channels): shrinking, enlarging, RGB kept and averaged to gray
    (SAMPLE_CT[0].name, "sample", 224, "CT", 3),
    (SAMPLE_CT[1].name, "sample", 96, "CR", 3),
    ("CT_small.dcm", "pydicom", 224, "CT", 3),  # 128 px: enlarged (torch's interpolation)
    ("MR_small.dcm", "pydicom", 224, "MR", 1),  # 64 px: enlarged, one channel
    ("US1_UNCR.dcm", "pydicom", 224, "US", 3),  # RGB
    ("US1_UNCR.dcm", "pydicom", 96, "US", 1),  # RGB averaged to gray (torch's mean)
    ("RG1_UNCI.dcm", "pydicom-data", 224, "CR", 3),  # 1955 x 1841: numpy percentiles
]


@pytest.mark.parametrize(("name", "source", "size", "modality", "channels"), NUMPY_CASES)
def test_numpy_slice_input_is_the_monai_pipeline_bit_for_bit(name, source, size, modality, channels):
    image, rgb = _real_image(name, source)
    config = PreprocessConfig(size=size)
    mean, std = ([0.5] * 3, [0.5] * 3) if channels == 3 else ([0.0], [1.0])
    monai = build_slice_transform(config, modality=modality, rgb=rgb, channels=channels, mean=mean, std=std)(image)
    ours = slice_input(image, config, modality=modality, rgb=rgb, channels=channels, mean=mean, std=std)
    assert ours.dtype == np.float32 and ours.shape == tuple(monai.shape)
    np.testing.assert_array_equal(ours, monai.numpy())


def test_numpy_slice_input_of_a_flat_image_is_monai_s():
    flat = np.full((20, 30), 7.0, dtype=np.float32)
    monai = build_slice_transform(PreprocessConfig(size=32), modality="MR", rgb=False)(flat)
    np.testing.assert_array_equal(slice_input(flat, PreprocessConfig(size=32), modality="MR", rgb=False), monai.numpy())


def test_encoder_batch_and_preprocess_volume_agree():
    volume = np.random.default_rng(3).normal(0, 300, (9, 80, 60)).astype(np.float32)
    config = PreprocessConfig(size=48, slices=3)
    batch = encoder_batch(volume, config=config, modality="CT", rgb=False, spacing=(2.0, 0.7, 0.7))
    np.testing.assert_array_equal(batch, preprocess_volume(volume, config=config, modality="CT", rgb=False,
                                                           spacing=(2.0, 0.7, 0.7)).numpy())
    assert batch.shape == (3, 3, 48, 48)


def test_gaussian_kernel_is_monai_s_to_one_unit_in_the_last_place():
    """The kernel's erf is rounded from double precision; torch's float32 erf differs from it by an ulp
    at most, so a kernel value differs by half an ulp of 1 (3e-8) at most."""
    from monai.networks.layers.convutils import gaussian_1d

    from medsearch.transforms.arrays import _gaussian_kernel

    for n_in, n_out in [(512, 224), (640, 96), (1955, 224), (300, 97), (100, 96), (224, 224), (3000, 16)]:
        factor = torch.tensor(float(n_in)) / torch.tensor(float(n_out))
        sigma = torch.clamp((factor - 1) / 2, min=0.0)
        monai = gaussian_1d(sigma, truncated=4.0, approx="erf").numpy()
        ours = _gaussian_kernel(np.float32(sigma.item()))
        assert ours.shape == monai.shape
        np.testing.assert_allclose(ours, monai, rtol=0, atol=3e-8)
    # the most common case, a 512 px CT slice at 224 px, is the same to the bit
    s = np.float32(np.float32(512) / np.float32(224) - np.float32(1)) / np.float32(2)
    np.testing.assert_array_equal(_gaussian_kernel(s), gaussian_1d(torch.tensor(float(s)), truncated=4.0, approx="erf").numpy())


@pytest.mark.slow
def test_preparing_a_ct_slice_imports_neither_torch_nor_monai():
    code = (
        "import sys, numpy as np\n"
        "from medsearch.config import PreprocessConfig\n"
        "from medsearch.transforms import encoder_batch, middle_picture\n"
        "hu = np.random.default_rng(0).normal(0, 400, (3, 512, 512)).astype(np.float32)\n"
        "batch = encoder_batch(hu, config=PreprocessConfig(), modality='CT', rgb=False)\n"
        "middle_picture(hu, config=PreprocessConfig(), modality='CT', rgb=False, window=(-600.0, 1500.0))\n"
        "print(batch.shape, 'torch' in sys.modules, 'monai' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "(3, 3, 224, 224) False False", done.stderr


def test_middle_picture_keeps_the_resolution_and_the_window():
    hu = np.zeros((3, 40, 30), dtype=np.float32)
    hu[1, :, :15] = -600.0
    hu[1, :, 15:] = 150.0
    picture = middle_picture(hu, config=PreprocessConfig(), modality="CT", rgb=False, window=(-600.0, 1500.0))
    assert picture.shape == (40, 30) and picture.dtype == np.uint8
    assert int(picture[0, 0]) == 128 and int(picture[0, 20]) == 255  # -600 HU mid-gray in the lung window
    soft = middle_picture(hu, config=PreprocessConfig(), modality="CT", rgb=False)
    assert int(soft[0, 0]) == 0 and int(soft[0, 20]) == 198  # the index's 40/400: the lung is black
