"""The kept query studies: their previews are exact where the values are integers, stay within their
budget, open in the file's own window; the cache keeps the last ones within its bounds."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from web.pages import QUERY, make_series

from medsearch.io import load_study
from medsearch.web.studies import CT_WINDOWS, StudyCache, make_preview, preview_slices


def test_a_ct_preview_is_exact_and_opens_in_the_files_window():
    case, volume = load_study(QUERY)
    preview = make_preview(case, volume)
    assert (preview.scale, preview.offset) == (1.0, 0.0) and preview.pixels.dtype == np.int16
    np.testing.assert_array_equal(preview.pixels, volume.pixels)
    ds = pydicom.dcmread(QUERY)
    assert preview.window == (float(ds.WindowCenter), float(ds.WindowWidth)) and preview.window_source == "header"
    described = preview.describe()
    assert described["presets"] == {n: {"center": c, "width": w} for n, (c, w) in CT_WINDOWS.items()}
    assert len(preview.slice_bytes(0)) == 512 * 512 * 2
    with pytest.raises(IndexError):
        preview.slice_bytes(1)


def test_without_a_window_in_the_file_the_image_gives_one(tmp_path):
    ds = pydicom.dcmread(QUERY)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "q.dcm")
    case, volume = load_study(tmp_path / "q.dcm")
    preview = make_preview(case, volume)
    low, high = np.percentile(volume.pixels, [0.5, 99.5])
    assert preview.window_source == "image"
    assert preview.window == pytest.approx(((low + high) / 2, high - low))


def test_values_that_are_not_small_integers_are_scaled(tmp_path):
    case, volume = load_study(QUERY)
    volume.pixels = volume.pixels * 0.37 + 1e5
    preview = make_preview(case, volume)
    back = preview.pixels.astype(np.float64) * preview.scale + preview.offset
    assert np.abs(back - volume.pixels).max() <= preview.scale
    assert preview.describe()["presets"]  # still CT


def test_a_long_series_keeps_evenly_spaced_slices_within_the_budget(tmp_path):
    assert preview_slices(10, 512, 512, budget=10 * 512 * 512 * 2) == list(range(10))
    assert preview_slices(100, 512, 512, budget=5 * 512 * 512 * 2) == [0, 25, 50, 74, 99]
    make_series(tmp_path / "s", slices=4)
    case, volume = load_study(tmp_path / "s")
    preview = make_preview(case, volume, budget=2 * 512 * 512 * 2)
    assert preview.slices == (0, 3) and preview.n_slices == 4 and preview.nbytes <= 2 * 512 * 512 * 2


def test_the_cache_keeps_the_last_studies_within_its_bounds():
    case, volume = load_study(QUERY)
    preview = make_preview(case, volume)
    cache = StudyCache(studies=3, max_bytes=2 * preview.nbytes)
    vector = np.ones(4, np.float32)
    first = cache.add(vector, {}, preview)
    second = cache.add(vector, {}, preview)
    assert cache.get(first.token) is first  # used: now the most recent
    third = cache.add(vector, {}, preview)  # over the byte budget: the least recently used goes
    assert cache.get(second.token) is None and cache.get(first.token) is first and cache.get(third.token) is third
    small = [cache.add(vector, {}, None) for _ in range(3)]
    assert len(cache) == 3 and all(cache.get(s.token) for s in small)
    assert len({first.token, second.token, third.token}) == 3


def test_a_color_study_is_kept_as_rgb():
    case, volume = load_study(QUERY)
    rgb = np.stack([np.clip(volume.pixels, 0, 255)] * 3, axis=-1)
    color = type(volume)(rgb.astype(np.float32), volume.spacing, "US", True)
    preview = make_preview(case, color)
    assert preview.pixels.dtype == np.uint8 and preview.pixels.shape == (1, 512, 512, 3)
    described = preview.describe()
    assert described["format"] == "rgb8" and described["presets"] == {}
    assert len(preview.slice_bytes(0)) == 512 * 512 * 3
