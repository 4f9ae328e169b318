"""medsearch.embedding and the slice selection under it: slices by millimetres (capped, with the count
as the fallback when the gap is unknown), regions (a slab, a box) parsed and cut, slice vectors kept."""

from __future__ import annotations

import numpy as np
import pytest
from series import phantom

from medsearch.config import Config, PreprocessConfig
from medsearch.embedding import (
    Region,
    crop_array,
    crop_boxes,
    embed_crops,
    embed_slices,
    embed_volume,
    embedded_box,
    in_layout,
    is_box,
    pool_slices,
    query_slices,
    region_array,
    slice_indices,
    study_array,
)
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, InvalidStudyError
from medsearch.io import Volume
from medsearch.transforms import axial_indices, chosen_slices, spaced_indices

# depth, gap (mm), every (mm), cap -> slices
BY_MM = [
    (30, 1.0, 5.0, 64, [2, 7, 12, 17, 22, 27]),  # one slice per 5 mm, centred in its part
    (300, 1.0, 5.0, 64, axial_indices(300, count=60)),  # 60 parts
    (300, 1.0, 5.0, 16, axial_indices(300, count=16)),  # capped: evenly spaced
    (10, 6.0, 5.0, 64, list(range(10))),  # sparser than asked: every slice
    (3, 1.0, 5.0, 64, [1]),  # thinner than one part: the middle slice
    (1, 1.0, 5.0, 64, [0]),
]


@pytest.mark.parametrize(("depth", "gap", "every", "cap", "expected"), BY_MM)
def test_slices_are_chosen_by_millimetres(depth, gap, every, cap, expected):
    chosen = spaced_indices(depth, gap_mm=gap, every_mm=every, at_most=cap)
    assert chosen == expected
    assert chosen == sorted(set(chosen)) and len(chosen) <= cap
    if len(chosen) > 2 and len(chosen) < cap:  # evenly spread: the steps differ by at most one slice
        steps = np.diff(chosen)
        assert steps.max() - steps.min() <= 1 and abs(steps.mean() * gap - max(every, gap)) < gap


def test_the_count_is_the_fallback_when_the_gap_is_unknown_or_density_is_off():
    config = PreprocessConfig(slices=5, slice_spacing_mm=5.0)
    assert chosen_slices(100, config, gap_mm=None) == axial_indices(100, count=5)
    assert chosen_slices(100, PreprocessConfig(slices=5), gap_mm=1.0) == axial_indices(100, count=5)
    assert chosen_slices(100, config, gap_mm=1.0) == axial_indices(100, count=20)


@pytest.mark.parametrize(
    ("values", "message"),
    [({"slice_spacing_mm": -1.0}, "slice_spacing_mm must be 0"), ({"slice_spacing_mm": True}, "slice_spacing_mm"),
     ({"max_slices": 0}, "max_slices must be a whole number"), ({"max_slices": 2.5}, "max_slices")],
)
def test_bad_slice_density_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        PreprocessConfig(**values)


REGIONS = [
    ({"slices": "40:60"}, Region((40, 60), None)),
    ({"slices": " 7 "}, Region((7, 8), None)),
    ({"slices": (3, 9)}, Region((3, 9), None)),
    ({"roi": "1,2,30,40"}, Region(None, (1, 2, 30, 40))),
    ({"slices": "4:6", "roi": (0, 0, 8, 8)}, Region((4, 6), (0, 0, 8, 8))),
    ({}, None),
]
BAD_REGIONS = [
    ({"slices": "60:40"}, "is empty"),
    ({"slices": "a:b"}, "START:STOP"),
    ({"slices": "-3:4"}, "START:STOP"),
    ({"roi": "1,2,3"}, "four whole pixel numbers"),
    ({"roi": "5,5,5,9"}, "X0 < X1"),
    ({"roi": "1,2,x,4"}, "four whole pixel numbers"),
]


@pytest.mark.parametrize(("given", "expected"), REGIONS)
def test_regions_parse(given, expected):
    assert Region.parse(**given) == expected


@pytest.mark.parametrize(("given", "message"), BAD_REGIONS)
def test_malformed_regions_are_refused(given, message):
    with pytest.raises(ConfigError, match=message):
        Region.parse(**given)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(Config().encoder)


def _volume(gap_known: bool = True) -> Volume:
    return Volume(phantom(3).astype(np.float32), (2.5, 0.8, 0.8), "CT", False, z_known=gap_known)


def test_slice_vectors_pool_to_the_case_vector(encoder):
    config = Config().replace(preprocess={"slice_spacing_mm": 5.0})
    volume = _volume()
    found = embed_slices(volume, encoder, config)
    assert found is not None and found.gap_mm == 2.5
    assert found.indices.tolist() == spaced_indices(24, gap_mm=2.5, every_mm=5.0, at_most=64) == slice_indices(volume, encoder.info, config)
    np.testing.assert_allclose(pool_slices(found.vectors), embed_volume(volume, encoder, config), atol=1e-5)
    assert found.position_mm(4) == 10.0
    unknown = embed_slices(_volume(gap_known=False), encoder, config)
    assert unknown is not None and unknown.gap_mm is None and len(unknown) == 5  # the count


def test_region_batches_are_the_slab_and_the_crop(encoder):
    config = Config().replace(preprocess={"slice_spacing_mm": 5.0})
    volume = _volume()
    batch, indices = region_array(volume, encoder.info, config, Region((8, 16), None))
    assert indices == [9, 11, 13, 15] and batch.shape == (4, 3, 224, 224)  # 8 slices of 2.5 mm: one per 5 mm
    crop, where = region_array(volume, encoder.info, config, Region(None, (10, 20, 42, 52)))
    assert where == [12] and crop.shape == (1, 3, 224, 224)  # the middle slice, the box filling the input
    whole, _ = region_array(volume, encoder.info, config, Region((12, 13), None))
    assert not np.allclose(crop, whole)


@pytest.mark.parametrize(("height", "width", "grid"), [(64, 64, 2), (512, 512, 3), (90, 120, 2), (37, 53, 4)])
def test_every_small_box_lies_inside_a_tile(height, width, grid):
    tiles = crop_boxes(height, width, grid)
    assert len(tiles) == grid * grid
    assert min(t[0] for t in tiles) == 0 and max(t[2] for t in tiles) == width
    assert min(t[1] for t in tiles) == 0 and max(t[3] for t in tiles) == height
    side_x, side_y = width // (grid + 1), height // (grid + 1)  # half a tile, rounded down
    for x0 in range(0, width - side_x + 1, max(1, width // 17)):
        for y0 in range(0, height - side_y + 1, max(1, height // 13)):
            assert any(t[0] <= x0 and t[1] <= y0 and x0 + side_x <= t[2] and y0 + side_y <= t[3] for t in tiles)
    assert crop_boxes(height, width, 0) == []


def test_a_query_box_is_widened_to_the_tiles_of_the_index():
    assert embedded_box((30, 30, 40, 40), 64, 64, 2) == (14, 14, 57, 57)  # a tile is 43 px: centred on the box
    assert embedded_box((0, 50, 10, 64), 64, 64, 2) == (0, 21, 43, 64)  # kept inside the image
    assert embedded_box((0, 0, 60, 60), 64, 64, 2) == (0, 0, 60, 60)  # larger than a tile: as given
    assert embedded_box((30, 30, 40, 40), 64, 64, 0) == (30, 30, 40, 40)  # no tiles in the index


def test_crop_vectors_are_the_tiles_of_the_kept_slices(encoder):
    config = Config().replace(preprocess={"slice_spacing_mm": 5.0}, index={"crop_grid": 2})
    volume = _volume()
    chosen = slice_indices(volume, encoder.info, config)
    batch, rows, boxes = crop_array(volume, encoder.info, config, chosen)
    tiles = crop_boxes(64, 64, 2)
    assert batch.shape == (4 * len(chosen), 3, 224, 224)
    assert rows.tolist() == [i for i in chosen for _ in tiles] and boxes.tolist() == [list(t) for t in tiles] * len(chosen)
    # a tile embeds as a query of the same box does: the index and the query see the same pixels
    tile, where = region_array(volume, encoder.info, config, Region((chosen[1], chosen[1] + 1), tiles[3]))
    assert where == [chosen[1]]
    np.testing.assert_allclose(batch[4 + 3], tile[0], atol=1e-6)
    found = embed_crops(volume, encoder, config)
    assert found is not None and found.boxes is not None and len(found) == 4 * len(chosen) and found.gap_mm == 2.5
    assert embed_crops(volume, encoder, Config().replace(preprocess={"slice_spacing_mm": 5.0})) is None


def test_a_slab_is_matched_in_layout_by_default_on_an_index_with_tiles(encoder):
    tiled = Config().replace(preprocess={"slice_spacing_mm": 5.0}, index={"crop_grid": 2})
    plain = Config().replace(preprocess={"slice_spacing_mm": 5.0})
    slab, box = Region((8, 16), None), Region((8, 16), (10, 20, 42, 52))
    assert in_layout(encoder.info, tiled, slab) and not in_layout(encoder.info, tiled)  # a whole study: when asked
    assert in_layout(encoder.info, tiled, None, True) and not in_layout(encoder.info, tiled, slab, False)
    assert not in_layout(encoder.info, tiled, box, True)  # a box is one tile already
    assert not in_layout(encoder.info, plain, slab, True)  # no tiles in the index
    assert not in_layout(encoder.info, tiled.replace(preprocess={"slice_mode": "triplanar"}), slab, True)


def test_a_study_in_layout_brings_the_tiles_of_its_slices(encoder):
    config = Config().replace(preprocess={"slice_spacing_mm": 5.0}, index={"crop_grid": 2})
    volume = _volume()
    seen = study_array(volume, encoder.info, config, Region((8, 16), None))
    assert seen.slice_indices == [9, 11, 13, 15] and seen.tiles == 4 and seen.region == {"slices": [8, 16]}
    assert seen.images.shape == (4 + 4 * 4, 3, 224, 224)
    slab, _ = region_array(volume, encoder.info, config, Region((8, 16), None))
    tiles, _, _ = crop_array(volume, encoder.info, config, [9, 11, 13, 15])
    np.testing.assert_array_equal(seen.images[:4], slab)  # the slices, then their tiles as the index cut them
    np.testing.assert_array_equal(seen.images[4:], tiles)
    vectors = encoder.embed(seen.images)
    pooled, found = query_slices(vectors, seen.slice_indices, 2.5, tiles=seen.tiles)
    assert found is not None and found.tiles is not None and found.tiles.shape == (4, 4, vectors.shape[1])
    np.testing.assert_array_equal(pooled, vectors[:4])  # the case vector pools the slices, not the tiles
    np.testing.assert_array_equal(found.tiles[1, 3], vectors[4 + 4 * 1 + 3])
    whole = study_array(volume, encoder.info, config)  # a whole study: no tiles unless asked
    assert whole.tiles == 0 and whole.region is None and len(whole.images) == len(whole.slice_indices or [])
    assert query_slices(encoder.embed(whole.images), whole.slice_indices, 2.5)[1].tiles is None


@pytest.mark.parametrize(
    ("region", "message"),
    [(Region((20, 40), None), "outside the study's 24 slice"), (Region(None, (0, 0, 65, 10)), "outside the study's 64 x 64")],
)
def test_a_region_outside_the_study_is_refused(encoder, region, message):
    with pytest.raises(InvalidStudyError, match=message):
        region_array(_volume(), encoder.info, Config(), region)


def test_tri_planar_images_have_no_slice_set(encoder):
    config = Config().replace(preprocess={"slice_mode": "triplanar"})
    assert slice_indices(_volume(), encoder.info, config) is None
    assert embed_slices(_volume(), encoder, config) is None
    with pytest.raises(InvalidStudyError, match="region queries need an index of axial slices"):
        region_array(_volume(), encoder.info, config, Region((0, 4), None))


def test_a_box_query_is_one_with_a_roi():
    assert not is_box(None) and not is_box(Region.parse(slices="3:9"))
    assert is_box(Region.parse(roi="1,2,30,40")) and is_box(Region.parse(slices="3:9", roi="1,2,30,40"))
