"""The window a CT image is shown in: the file's own, or its body part's.

A soft-tissue window (40/400 HU) shows a head CT as flat gray and a lung as black. For pictures (the
thumbnail an index keeps, the query on a result sheet), :func:`display_window` picks, for a CT whose
body part is one of :data:`BODY_PART_WINDOWS` (head: brain, chest: lung, spine and limbs: bone),
the window the file itself carries (WindowCenter/WindowWidth, or the Frame VOI LUT functional group
of an Enhanced CT) that is of that kind (a chest CT carrying a mediastinal and a lung window is
shown in its lung window, a head CT in its own brain window), else the body part's window; for
another CT, the file's own first window; else None (the index's own CT window is used).

The window only changes pictures; what the encoder sees is the index's preprocessing, unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medsearch.io.dicom.read import _get, _group_item, _is_enhanced, _str

__all__ = ["BODY_PART_WINDOWS", "WINDOWS", "display_window"]

#: Common CT windows, (center, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "soft tissue": (40.0, 400.0),
}

_BRAIN = ("HEAD", "BRAIN", "SKULL", "CEREBRUM", "CEREBELLUM")
_LUNG = ("CHEST", "LUNG", "THORAX", "LUNGS")
_BONE = (
    "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "COCCYX", "SACRUM",
    "EXTREMITY", "UPRLIMB", "LOWERLIMB", "ARM", "LEG", "HAND", "FOOT", "WRIST", "ANKLE", "ELBOW", "KNEE",
    "HIP", "SHOULDER", "FEMUR", "TIBIA", "FIBULA", "HUMERUS", "RADIUS", "ULNA", "CLAVICLE", "SCAPULA",
    "RIB", "STERNUM", "PELVIS_BONE", "TMJ", "JAW", "MANDIBLE",
)
#: Body Part Examined (as written, upper case) -> the window it is shown in.
BODY_PART_WINDOWS: dict[str, tuple[float, float]] = {
    **dict.fromkeys(_BRAIN, WINDOWS["brain"]),
    **dict.fromkeys(_LUNG, WINDOWS["lung"]),
    **dict.fromkeys(_BONE, WINDOWS["bone"]),
}
_MAX_WINDOWS = 16  # a header may list several; more than this is not a window list
# How far (see _distance) a file's window may be from its body part's and still be of its kind: a
# width within a factor of about two, a center within half a width.
_SAME_KIND = 0.75


def display_window(ds: Dataset) -> tuple[float, float] | None:
    """The (center, width) in HU to show a CT header's image in, or None (not a CT, nothing known).

    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset(); ds.Modality = "CT"; ds.BodyPartExamined = "HEAD"
    >>> display_window(ds)
    (40.0, 80.0)
    >>> ds.WindowCenter, ds.WindowWidth = [40, -550], [400, 1800]; ds.BodyPartExamined = "CHEST"
    >>> display_window(ds)
    (-550.0, 1800.0)
    >>> ds.WindowCenter, ds.WindowWidth = 40, 400
    >>> display_window(ds)
    (-600.0, 1500.0)
    """
    if _str(ds, "Modality").upper() != "CT":
        return None
    part = BODY_PART_WINDOWS.get(_str(ds, "BodyPartExamined").upper().replace(" ", ""))
    own = _own_windows(ds)
    if part is None:
        return own[0] if own else None
    close = [w for w in own if _distance(w, part) <= _SAME_KIND]
    return min(close, key=lambda w: _distance(w, part)) if close else part


def _own_windows(ds: Dataset) -> list[tuple[float, float]]:
    """The (center, width) pairs a header carries, in order, with a positive width."""
    holder: Any = ds
    if "WindowCenter" not in ds and _is_enhanced(ds):
        holder = _group_item(ds, 0, "FrameVOILUTSequence")
        if holder is None:
            return []
    centers, widths = _numbers(_get(holder, "WindowCenter")), _numbers(_get(holder, "WindowWidth"))
    pairs = [(c, w) for c, w in zip(centers, widths) if w > 1.0]
    return pairs[:_MAX_WINDOWS]


def _numbers(value: Any) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    out = []
    for v in values:
        try:
            number = float(v)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(number):
            return []
        out.append(number)
    return out


def _distance(window: tuple[float, float], target: tuple[float, float]) -> float:
    """How far apart two windows are: the centers in target widths, the widths as a ratio."""
    return abs(window[0] - target[0]) / target[1] + abs(math.log(window[1] / target[1]))
