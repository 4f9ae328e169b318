"""Which DICOM objects are images a case can be made of: decided by SOP Class, then by size.

An object is an image for medsearch when its SOP Class is one of the image storage classes of
:data:`IMAGE_CLASSES` (CT, MR, CR, DX, MG, US, PT, NM, XA, RF, SC, with their Enhanced, Legacy
Converted, multi-frame and retired forms; UIDs from DICOM PS3.4 Annex B), and its image is at
least ``min_size`` pixels on each side. Everything else (segmentations, RT objects, structured
reports, key object selections, presentation states, waveforms, slide microscopy, photographs...)
is not, whether or not it carries pixel data: :func:`not_an_image` says why, naming the class.

A file without any SOP Class UID (an old ACR-NEMA file) is judged by its Modality: the modalities of
:data:`NOT_IMAGE_MODALITIES` are not images; other files go on to the pixel data check.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from medsearch.io.dicom.read import _get, _int, _str

__all__ = ["IMAGE_CLASSES", "MIN_IMAGE_SIZE", "NOT_IMAGE_MODALITIES", "not_an_image", "sop_class"]

#: The smallest image side (rows and columns) an indexed image may have, by default.
MIN_IMAGE_SIZE = 32

_STORAGE = "1.2.840.10008.5.1.4.1.1."

#: Image storage SOP Classes, by family: ``{uid: family}``.
IMAGE_CLASSES: dict[str, str] = {
    _STORAGE + uid: family
    for family, uids in {
        "CR": ("1",),
        # Digital X-Ray, with intra-oral X-ray (a DX image of the teeth)
        "DX": ("1.1", "1.1.1", "1.3", "1.3.1"),
        # Digital Mammography, Breast Tomosynthesis, Breast Projection X-Ray
        "MG": ("1.2", "1.2.1", "13.1.3", "13.1.4", "13.1.5"),
        # CT, Enhanced CT, Legacy Converted Enhanced CT, X-Ray 3D Craniofacial (cone-beam CT)
        "CT": ("2", "2.1", "2.2", "13.1.2"),
        # MR, Enhanced MR, Enhanced MR Color, Legacy Converted Enhanced MR
        "MR": ("4", "4.1", "4.3", "4.4"),
        # Ultrasound (single and multi-frame, with their retired forms), Enhanced US Volume
        "US": ("6.1", "3.1", "6", "3", "6.2"),
        # Secondary Capture, and its multi-frame grayscale and true colour forms
        "SC": ("7", "7.2", "7.3", "7.4"),
        # X-Ray Angiographic, Enhanced XA, X-Ray 3D Angiographic, the retired Bi-Plane
        "XA": ("12.1", "12.1.1", "13.1.1", "12.3"),
        # X-Ray Radiofluoroscopic, Enhanced XRF
        "RF": ("12.2", "12.2.1"),
        # Nuclear Medicine, and its retired form
        "NM": ("20", "5"),
        # Positron Emission Tomography, Enhanced PET, Legacy Converted Enhanced PET
        "PT": ("128", "130", "128.1"),
    }.items()
    for uid in uids
}

#: Modalities that are never images (used only for files that name no SOP Class).
NOT_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SR", "KO", "PR", "DOC", "REG", "FID",
     "RWV", "ECG", "HD", "AU", "EPS", "RESP", "PLAN", "SM"}
)


def sop_class(ds: Dataset) -> str:
    """The SOP Class UID of a header (or of its file meta), or "" when it names none."""
    uid = _str(ds, "SOPClassUID")
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = _str(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    return uid.strip("\0 ")


def not_an_image(ds: Dataset, *, min_size: int = MIN_IMAGE_SIZE, tile: tuple[int, int] | None = None) -> str | None:
    """Why the object of a header is not an image a case can be made of, or None when it is one.

    Parameters
    ----------
    ds
        A header (pixel data not needed).
    min_size
        The smallest image side in pixels (0: no minimum).
    tile
        The size of one image where the stored image is a mosaic of them (Siemens), else None.

    Returns
    -------
    str or None
        A one-line detail naming the SOP Class (never a header value of the patient).
    """
    uid = sop_class(ds)
    if uid:
        if uid not in IMAGE_CLASSES:
            return f"{_class_name(uid)} is not an image storage class (medsearch indexes CT, MR, CR, DX, MG, US, PT, NM, XA, RF and SC images)"
    else:
        modality = _str(ds, "Modality").upper()
        if modality in NOT_IMAGE_MODALITIES:
            return f"a {modality} object (no SOP Class UID) is not an image"
    rows, columns = tile or (_int(_get(ds, "Rows"), 0), _int(_get(ds, "Columns"), 0))
    if min_size and 0 < min(rows, columns) < min_size:
        what = _class_name(uid) if uid else "an image without SOP Class UID"
        return (
            f"{what} of {rows} x {columns} pixels is smaller than the {min_size} px minimum "
            "(index.min_image_size)"
        )
    return None


def _class_name(uid: str) -> str:
    """The registry name of a SOP Class (a private or unknown one is not quoted)."""
    name = UID(uid).name
    return name if name != uid else "a private or unknown SOP Class"
