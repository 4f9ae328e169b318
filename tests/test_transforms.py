from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut

from medsearch.config import PreprocessConfig
from medsearch.transforms import build_slice_transform, preprocess_volume, select_slices


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
