"""Reading a DICOM header for de-identification: the only way :mod:`medsearch.deid` reads one.

Only standard attributes of the top-level dataset are read, by keyword; private tags and sequences
are never read. Every read goes through one of two functions: :func:`policy_text` (and
:func:`policy_float`) for values that may leave, which the policy must mark ``K`` or ``C``, and
:func:`derivation_text` for the few values read only to derive a pseudonym, an age or a shifted
date, which never leave themselves.
"""

from __future__ import annotations

import math
from typing import Any

import pydicom
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from medsearch.deid.profile import DeidOptions, profile_action

__all__ = ["clean_uid", "derivation_text", "policy_float", "policy_text"]

_DERIVATION_SOURCES = frozenset(
    {"PatientID", "IssuerOfPatientID", "StudyInstanceUID", "PatientBirthDate", "StudyDate"}
)


def _raw(header: pydicom.Dataset, keyword: str) -> Any:
    try:
        value = header.get(keyword)
    except (ValueError, TypeError, KeyError, AttributeError):  # a value pydicom cannot convert
        return None
    if isinstance(value, (MultiValue, list, tuple)):  # every attribute we read has VM 1
        return None
    if isinstance(value, (Sequence, bytes, bytearray)):
        return None
    return value


def policy_text(header: pydicom.Dataset, keyword: str, options: DeidOptions) -> str | None:
    """The value of ``keyword`` as text, which the policy must keep or clean under ``options``."""
    if profile_action(keyword, options) not in ("K", "C"):
        raise RuntimeError(
            f"deid: {keyword} is not kept under {options}; this is a bug in medsearch"
        )
    value = _raw(header, keyword)
    return None if value is None else str(value)


def policy_float(header: pydicom.Dataset, keyword: str, options: DeidOptions) -> float | None:
    """The value of ``keyword`` as a finite number, or ``None``; as :func:`policy_text`."""
    if profile_action(keyword, options) not in ("K", "C"):
        raise RuntimeError(
            f"deid: {keyword} is not kept under {options}; this is a bug in medsearch"
        )
    value = _raw(header, keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def derivation_text(header: pydicom.Dataset, keyword: str) -> str | None:
    """The value of ``keyword``, read only to derive a value that never shows it."""
    if keyword not in _DERIVATION_SOURCES:
        raise RuntimeError(
            f"deid: {keyword} is not a derivation source; this is a bug in medsearch"
        )
    value = _raw(header, keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def clean_uid(uid: str) -> str:
    """A UID without the spaces and NUL bytes that DICOM pads values with."""
    return str(uid or "").strip().rstrip("\x00").strip()
