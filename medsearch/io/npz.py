"""MedMNIST-format ``.npz`` files: labeled image splits for retrieval evaluation.

A MedMNIST file (Yang et al., Scientific Data 2023) holds, for each split ``train``, ``val`` and
``test``, an array ``<split>_images`` and an array ``<split>_labels``. Images come in three layouts:

* ``(N, H, W)``: 2D gray (BreastMNIST, PneumoniaMNIST);
* ``(N, H, W, 3)``: 2D RGB (DermaMNIST, BloodMNIST);
* ``(N, D, H, W)``: 3D volumes (OrganMNIST3D, NoduleMNIST3D).

Labels are ``(N,)`` or ``(N, 1)`` (the official files use the latter) and are returned flat.

Each image becomes a :class:`~medsearch.io.Volume` (a 2D image is a volume of one slice), so the
evaluation embeds it through the same pipeline as an indexed DICOM case. This module reads arrays
only; it knows nothing of transforms, encoders or faiss.
"""

from __future__ import annotations

import enum
import hashlib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsearch.errors import InvalidStudyError, first_line
from medsearch.io.dicom import Volume

__all__ = ["NPZ_SPLITS", "NpzLayout", "NpzSplit", "load_npz_split", "npz_splits"]

#: The split names of a MedMNIST file, in their usual order.
NPZ_SPLITS = ("train", "val", "test")


class NpzLayout(str, enum.Enum):
    """How the image array of a split is laid out."""

    GRAY = "gray"  # (N, H, W)
    RGB = "rgb"  # (N, H, W, 3)
    VOLUME = "volume"  # (N, D, H, W)


@dataclass(frozen=True)
class NpzSplit:
    """The images and flat labels of one split of a MedMNIST-format file.

    Attributes
    ----------
    path : Path
        The ``.npz`` file.
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    images : numpy.ndarray
        ``(N, H, W)``, ``(N, H, W, 3)`` or ``(N, D, H, W)``, as stored (usually uint8).
    labels : numpy.ndarray
        ``(N,)`` integer labels.
    layout : NpzLayout
        How ``images`` is laid out.
    """

    path: Path
    split: str
    images: np.ndarray
    labels: np.ndarray
    layout: NpzLayout

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def volume(self, i: int, *, modality: str = "OT") -> Volume:
        """Image ``i`` as a float32 :class:`Volume`: ``(1, H, W)``, ``(1, H, W, 3)`` or ``(D, H, W)``.

        Parameters
        ----------
        i : int
            Row of the split.
        modality : str, default "OT"
            DICOM modality the pipeline should assume. ``"OT"`` (other) selects percentile
            intensity scaling; ``"CT"`` would apply the HU window, which MedMNIST's uint8 images
            do not hold.
        """
        pixels = np.asarray(self.images[i], dtype=np.float32)
        if self.layout is not NpzLayout.VOLUME:
            pixels = pixels[None]
        return Volume(pixels=pixels, spacing=(1.0, 1.0, 1.0), modality=modality, rgb=self.layout is NpzLayout.RGB, z_known=False)

    def volumes(self, indices: Sequence[int] | np.ndarray | None = None, *, modality: str = "OT") -> Iterator[Volume]:
        """:meth:`volume` for each index (default: every row), in order."""
        for i in range(len(self)) if indices is None else indices:
            yield self.volume(int(i), modality=modality)

    def sha256(self) -> str:
        """A hash of this split's images and labels (with their shapes and dtypes), e.g. for a cache key."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def npz_splits(path: str | Path) -> list[str]:
    """The splits a MedMNIST-format file holds (those with both images and labels), in the usual order.

    Raises
    ------
    InvalidStudyError
        The file is missing or not a readable ``.npz``.
    """
    keys = _keys(Path(path))
    return [s for s in NPZ_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]


def load_npz_split(path: str | Path, split: str, *, layout: NpzLayout | str | None = None) -> NpzSplit:
    """Read one split of a MedMNIST-format ``.npz`` file.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    layout : NpzLayout or str, optional
        ``"gray"``, ``"rgb"`` or ``"volume"``. By default a 3D array is gray, and a 4D array is RGB
        when its last axis has length 3 and a volume otherwise; pass ``"volume"`` for a stack of
        three-pixel-wide volumes.

    Returns
    -------
    NpzSplit

    Raises
    ------
    InvalidStudyError
        The file is missing or unreadable, lacks the split, or its arrays have the wrong shapes:
        images not ``(N, H, W)``, ``(N, H, W, 3)`` or ``(N, D, H, W)``, labels not ``(N,)`` or
        ``(N, 1)``, or a different ``N`` in images and labels.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> np.savez(folder / "tiny.npz", test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.array([[0], [1]]))
    >>> part = load_npz_split(folder / "tiny.npz", "test")
    >>> len(part), part.layout.value, part.labels.tolist(), part.volume(0).pixels.shape
    (2, 'gray', [0, 1], (1, 8, 8))
    """
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise InvalidStudyError(f"unknown split {split!r}; use one of {', '.join(NPZ_SPLITS)}")
    keys = _keys(path)
    missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in keys]
    if missing:
        have = [s for s in NPZ_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
        raise InvalidStudyError(
            f"{path} has no {' or '.join(missing)}; its splits: {', '.join(have) or 'none'} "
            "(a MedMNIST file holds train_images, train_labels, val_..., test_...)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            images = np.asarray(data[f"{split}_images"])
            labels = np.asarray(data[f"{split}_labels"])
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InvalidStudyError(f"cannot read split {split!r} of {path}: {first_line(e)}") from e
    layout = _layout(images, layout, path, split)
    labels = _flat_labels(labels, path, split)
    if labels.shape[0] != images.shape[0]:
        raise InvalidStudyError(
            f"{path}: {split}_images holds {images.shape[0]} images but {split}_labels holds "
            f"{labels.shape[0]} labels; give one label per image"
        )
    if images.shape[0] == 0:
        raise InvalidStudyError(f"{path}: split {split!r} holds no image; use another split")
    return NpzSplit(path=path, split=split, images=images, labels=labels, layout=layout)


def _keys(path: Path) -> set[str]:
    if not path.is_file():
        raise InvalidStudyError(f"{path} does not exist; give a MedMNIST-format .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InvalidStudyError(f"{path} is not a readable .npz file ({first_line(e)}); give a MedMNIST-format .npz file") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InvalidStudyError(f"{path} holds a single array, not an .npz archive; give a MedMNIST-format .npz file")
    with data:
        return set(data.files)


def _layout(images: np.ndarray, wanted: NpzLayout | str | None, path: Path, split: str) -> NpzLayout:
    shape = images.shape
    if images.dtype.kind not in "uif" and images.dtype != np.bool_:
        raise InvalidStudyError(f"{path}: {split}_images holds {images.dtype} values; images must be numbers")
    if wanted is None:
        if images.ndim == 3:
            return NpzLayout.GRAY
        if images.ndim == 4:
            return NpzLayout.RGB if shape[-1] == 3 else NpzLayout.VOLUME
        raise InvalidStudyError(
            f"{path}: {split}_images has shape {shape}; expected (N, H, W) gray, (N, H, W, 3) RGB "
            "or (N, D, H, W) volumes"
        )
    try:
        layout = NpzLayout(wanted)
    except ValueError:
        raise InvalidStudyError(
            f"unknown npz layout {wanted!r}; use one of {', '.join(m.value for m in NpzLayout)}"
        ) from None
    expected = {NpzLayout.GRAY: "(N, H, W)", NpzLayout.RGB: "(N, H, W, 3)", NpzLayout.VOLUME: "(N, D, H, W)"}
    ok = (
        (layout is NpzLayout.GRAY and images.ndim == 3)
        or (layout is NpzLayout.RGB and images.ndim == 4 and shape[-1] == 3)
        or (layout is NpzLayout.VOLUME and images.ndim == 4)
    )
    if not ok:
        raise InvalidStudyError(
            f"{path}: {split}_images has shape {shape}, which is not the {layout.value} layout "
            f"{expected[layout]}; pass another layout or leave it out to infer it"
        )
    return layout


def _flat_labels(labels: np.ndarray, path: Path, split: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InvalidStudyError(
            f"{path}: {split}_labels has shape {labels.shape}; expected (N,) or (N, 1) single labels "
            "(multi-label files such as ChestMNIST are not supported: pick one label column into a new file)"
        )
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            return labels.astype(np.int64)
        raise InvalidStudyError(f"{path}: {split}_labels holds {labels.dtype} values; labels must be integers")
    return labels.astype(np.int64)
