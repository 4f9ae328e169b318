"""Tests of medsearch.io.npz: MedMNIST-format files in every layout, the real sets, and bad files."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

from medsearch.errors import InvalidStudyError
from medsearch.io import NpzLayout, Volume, load_npz_split, npz_splits
from medsearch.io import npz as npz_module


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# (case id, image shape without N, label shape maker, expected layout, expected volume shape, rgb)
LAYOUTS = [
    ("gray", (8, 9), lambda n: (n,), NpzLayout.GRAY, (1, 8, 9), False),
    ("gray-labels-n1", (8, 9), lambda n: (n, 1), NpzLayout.GRAY, (1, 8, 9), False),
    ("rgb", (8, 9, 3), lambda n: (n, 1), NpzLayout.RGB, (1, 8, 9, 3), True),
    ("volume", (5, 8, 9), lambda n: (n,), NpzLayout.VOLUME, (5, 8, 9), False),
]


@pytest.mark.parametrize(("shape", "label_shape", "layout", "volume_shape", "rgb"), [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_layouts(tmp_path, shape, label_shape, layout, volume_shape, rgb):
    n = 4
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
    labels = np.arange(n).reshape(label_shape(n))
    path = _write(tmp_path / "x.npz", train_images=images, train_labels=labels, test_images=images[:2], test_labels=labels[:2])
    split = load_npz_split(path, "train")
    assert split.layout is layout and len(split) == n and split.split == "train"
    assert split.labels.shape == (n,) and split.labels.dtype == np.int64 and split.labels.tolist() == [0, 1, 2, 3]
    volume = split.volume(2)
    assert isinstance(volume, Volume)
    assert volume.pixels.shape == volume_shape and volume.pixels.dtype == np.float32 and volume.rgb is rgb
    assert volume.modality == "OT" and volume.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(volume.pixels.reshape(images[2].shape), images[2])
    assert [v.pixels.shape for v in split.volumes([3, 0])] == [volume_shape] * 2
    assert split.volume(0, modality="MR").modality == "MR"
    assert npz_splits(path) == ["train", "test"]


def test_layout_override_for_three_pixel_wide_volumes(tmp_path):
    images = np.zeros((2, 4, 5, 3), np.uint8)  # inferred as RGB...
    path = _write(tmp_path / "v.npz", test_images=images, test_labels=np.array([0, 1]))
    assert load_npz_split(path, "test").layout is NpzLayout.RGB
    split = load_npz_split(path, "test", layout="volume")  # ...unless told otherwise
    assert split.layout is NpzLayout.VOLUME and split.volume(0).pixels.shape == (4, 5, 3) and not split.volume(0).rgb


def test_float_labels_holding_whole_numbers_are_accepted(tmp_path):
    path = _write(tmp_path / "f.npz", test_images=np.zeros((2, 4, 4)), test_labels=np.array([[1.0], [0.0]]))
    assert load_npz_split(path, "test").labels.tolist() == [1, 0]


def test_sha256_follows_the_data(tmp_path):
    a = _write(tmp_path / "a.npz", test_images=np.zeros((2, 4, 4), np.uint8), test_labels=np.array([0, 1]))
    b = _write(tmp_path / "b.npz", test_images=np.zeros((2, 4, 4), np.uint8), test_labels=np.array([1, 1]))
    assert load_npz_split(a, "test").sha256() == load_npz_split(a, "test").sha256()
    assert load_npz_split(a, "test").sha256() != load_npz_split(b, "test").sha256()


def _not_npz(path: Path) -> Path:
    path.write_text("not an archive")
    return path


def _single_npy(path: Path) -> Path:
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    return path


BAD_FILES = [
    ("missing", lambda p: p / "nope.npz", "test", {}, "does not exist; give a MedMNIST-format .npz"),
    ("not-npz", lambda p: _not_npz(p / "x.npz"), "test", {}, "is not a readable .npz file"),
    ("single-npy", lambda p: _single_npy(p / "x.npz"), "test", {}, "holds a single array, not an .npz archive"),
    (
        "missing-split",
        lambda p: _write(p / "x.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros(2)),
        "test",
        {},
        r"has no test_images or test_labels; its splits: train",
    ),
    (
        "missing-labels",
        lambda p: _write(p / "x.npz", test_images=np.zeros((2, 4, 4))),
        "test",
        {},
        r"has no test_labels; its splits: none",
    ),
    ("unknown-split", lambda p: _write(p / "x.npz", test_images=np.zeros((2, 4, 4)), test_labels=np.zeros(2)), "valid", {}, "unknown split 'valid'"),
    (
        "count-mismatch",
        lambda p: _write(p / "x.npz", test_images=np.zeros((3, 4, 4)), test_labels=np.zeros(2)),
        "test",
        {},
        "holds 3 images but test_labels holds 2 labels",
    ),
    (
        "images-2d",
        lambda p: _write(p / "x.npz", test_images=np.zeros((3, 4)), test_labels=np.zeros(3)),
        "test",
        {},
        r"has shape \(3, 4\); expected \(N, H, W\) gray",
    ),
    (
        "images-5d",
        lambda p: _write(p / "x.npz", test_images=np.zeros((3, 2, 4, 4, 3)), test_labels=np.zeros(3)),
        "test",
        {},
        r"has shape \(3, 2, 4, 4, 3\)",
    ),
    (
        "multi-label",
        lambda p: _write(p / "x.npz", test_images=np.zeros((3, 4, 4)), test_labels=np.zeros((3, 14))),
        "test",
        {},
        r"has shape \(3, 14\); expected \(N,\) or \(N, 1\) single labels",
    ),
    (
        "fractional-labels",
        lambda p: _write(p / "x.npz", test_images=np.zeros((2, 4, 4)), test_labels=np.array([0.5, 1.0])),
        "test",
        {},
        "labels must be integers",
    ),
    (
        "empty-split",
        lambda p: _write(p / "x.npz", test_images=np.zeros((0, 4, 4)), test_labels=np.zeros(0)),
        "test",
        {},
        "holds no image",
    ),
    (
        "layout-mismatch",
        lambda p: _write(p / "x.npz", test_images=np.zeros((2, 4, 4)), test_labels=np.zeros(2)),
        "test",
        {"layout": "rgb"},
        r"not the rgb layout \(N, H, W, 3\)",
    ),
    (
        "unknown-layout",
        lambda p: _write(p / "x.npz", test_images=np.zeros((2, 4, 4)), test_labels=np.zeros(2)),
        "test",
        {"layout": "cube"},
        "unknown npz layout 'cube'",
    ),
]


@pytest.mark.parametrize(("make", "split", "options", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_raise_one_line(tmp_path, make, split, options, message):
    path = make(tmp_path)
    with pytest.raises(InvalidStudyError, match=message) as info:
        load_npz_split(path, split, **options)
    assert "\n" not in str(info.value)


def test_doctests():
    failures, _ = doctest.testmod(npz_module, verbose=False)
    assert failures == 0


@pytest.mark.parametrize(
    ("name", "sizes", "train_counts"),
    [
        ("breastmnist.npz", {"train": 546, "val": 78, "test": 156}, [147, 399]),
        ("pneumoniamnist_reduced_train.npz", {"train": 3882, "val": 524, "test": 624}, [388, 3494]),
    ],
)
def test_real_medmnist_files(medmnist_dir, name, sizes, train_counts):
    path = medmnist_dir / name
    assert npz_splits(path) == ["train", "val", "test"]
    for split_name, n in sizes.items():
        split = load_npz_split(path, split_name)
        assert len(split) == n and split.layout is NpzLayout.GRAY and split.images.shape[1:] == (28, 28)
        assert split.labels.shape == (n,)
    assert np.bincount(load_npz_split(path, "train").labels).tolist() == train_counts
