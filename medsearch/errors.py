"""Errors medsearch raises on purpose.

Every message says what is wrong, which value, and what to do. No message ever carries a value read
from a DICOM header that could identify a patient: name the file path or the pseudonymous case id.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DicomWebAuthError",
    "DicomWebError",
    "EncoderMismatchError",
    "FilterError",
    "IndexCorruptError",
    "IndexNotFoundError",
    "InvalidStudyError",
    "KeyFileError",
    "MedsearchError",
    "ShapeError",
    "WriteError",
    "first_line",
]


class MedsearchError(Exception):
    """Base class of every error medsearch raises for a user to act on."""


class InvalidStudyError(MedsearchError, ValueError):
    """A study path is missing, not DICOM, holds no image, or cannot be decoded."""


class ConfigError(MedsearchError, ValueError):
    """A configuration file or option has a wrong value."""


class FilterError(ConfigError):
    """A query filter (``--where``) is malformed, names an unknown field, or compares text as a number."""


class IndexNotFoundError(MedsearchError, FileNotFoundError):
    """A directory is not a medsearch index."""


class IndexCorruptError(MedsearchError, ValueError):
    """A file of an index is damaged (truncated, wrong checksum) or inconsistent."""


class EncoderMismatchError(MedsearchError, ValueError):
    """A query or addition uses another encoder or preprocessing than the index was built with."""


class KeyFileError(MedsearchError, OSError):
    """The site key (for pseudonyms) is missing, unreadable, or not the one the index was built with."""


class ShapeError(MedsearchError, ValueError):
    """Arrays handed to a function do not fit together: a wrong shape or length, or labels of mixed kinds."""


class WriteError(MedsearchError, OSError):
    """A file medsearch writes (a cache, a sheet, a report, a trained encoder) cannot be written."""


class DicomWebError(MedsearchError, ConnectionError):
    """A DICOMweb server (a PACS) cannot be reached, or refuses or fails a request of a whole run."""


class DicomWebAuthError(DicomWebError, PermissionError):
    """A DICOMweb server refused the credentials (HTTP 401 or 403), or none were given where it needs them."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none: what a one-line
    report or skip reason shows of a library's error."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
