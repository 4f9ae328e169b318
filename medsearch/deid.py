"""De-identification: the one place that decides what leaves a DICOM header.

medsearch keeps, for each case, a row of metadata beside its embedding. That row, and every id,
log line, message and report, must carry nothing that identifies a patient. This module builds the
row (:func:`case_metadata`), the keyed pseudonyms that stand in for patients and cases
(:class:`SiteKey`, :func:`case_id`, :func:`patient_pseudonym`) and states the policy as a table
(:data:`ATTRIBUTE_ACTIONS`, :data:`OPTION_ACTIONS`, :func:`profile_action`).

The policy follows DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile, with
the Retain Patient Characteristics, Retain Device Identity, Retain Longitudinal Temporal Information
with Modified Dates and Clean Descriptors options as :class:`DeidOptions` selects them. Where
medsearch is stricter than the profile, :data:`STRICTER_THAN_PROFILE` says where and why.

Reading rules: only standard attributes of the top-level dataset are read, by keyword; private
tags and sequences are never read. Action codes are those of PS3.15 Table E.1-1: ``X`` remove,
``Z`` zero length, ``D`` dummy value, ``K`` keep, ``C`` clean, ``U`` replace UID. In the case table,
any action other than ``K`` or ``C`` means the value never leaves the header.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from medsearch.errors import InvalidStudyError, KeyFileError

__all__ = [
    "ATTRIBUTE_ACTIONS",
    "CASE_FIELDS",
    "CASE_METADATA_KEYS",
    "DERIVED_FIELDS",
    "OPTION_ACTIONS",
    "STRICTER_THAN_PROFILE",
    "DeidOptions",
    "SiteKey",
    "age_band",
    "case_id",
    "case_metadata",
    "patient_pseudonym",
    "profile_action",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeidOptions:
    """Which PS3.15 Annex E options apply on top of the Basic Profile.

    Attributes
    ----------
    retain_device_identity
        Keep manufacturer and model name (Retain Device Identity Option). Serial numbers, station
        names and other ids of one machine are never kept.
    retain_patient_characteristics
        Keep sex, an age band, size and weight, the last two rounded (Retain Patient
        Characteristics Option).
    longitudinal_dates
        Keep the study date shifted by a keyed per-patient offset (Retain Longitudinal Temporal
        Information with Modified Dates Option), so a patient's cases keep their order and spacing.
    clean_descriptors
        Map body part and descriptions to a controlled vocabulary of body parts (Clean Descriptors
        Option); without it free text is dropped.
    """

    retain_device_identity: bool = True
    retain_patient_characteristics: bool = True
    longitudinal_dates: bool = False
    clean_descriptors: bool = False


# --------------------------------------------------------------------------------------------
# The policy, as tables.
#
# Actions under the Basic Profile alone. Where PS3.15 Table E.1-1 gives a choice ("X/Z/D": which
# one depends on the attribute's type in the IOD) medsearch takes the first, strictest one: the
# case table is not an IOD and needs no placeholder. Attributes absent from Table E.1-1 are kept
# by the profile; medsearch lists the few it reads. Anything not listed here is removed.
# --------------------------------------------------------------------------------------------

ATTRIBUTE_ACTIONS: dict[tuple[int, int] | str, str] = {
    # Patient
    "PatientName": "Z",  # (0010,0010) Z
    "PatientID": "Z",  # (0010,0020) Z/D; read only to derive the keyed patient pseudonym
    "IssuerOfPatientID": "X",  # (0010,0021) X; read only to derive the patient pseudonym
    "PatientBirthDate": "Z",  # (0010,0030) Z; read only to compute an age band, never stored
    "PatientSex": "Z",  # (0010,0040) Z; K with Retain Patient Characteristics
    "PatientAge": "X",  # (0010,1010) X; K with Retain Patient Characteristics (we band it: C)
    "PatientSize": "X",  # (0010,1020) X; K with Retain Patient Characteristics (we round it: C)
    "PatientWeight": "X",  # (0010,1030) X; K with Retain Patient Characteristics (we round it: C)
    "OtherPatientIDs": "X",  # (0010,1000) X
    "OtherPatientNames": "X",  # (0010,1001) X
    "OtherPatientIDsSequence": "X",  # (0010,1002) X
    "PatientAddress": "X",  # (0010,1040) X
    "PatientTelephoneNumbers": "X",  # (0010,2154) X
    "EthnicGroup": "X",  # (0010,2160) X; K with Retain Patient Characteristics, never kept here
    "PregnancyStatus": "X",  # (0010,21C0) X; K with Retain Patient Characteristics, never kept
    "ReferencedPatientSequence": "X",  # (0008,1120) X
    # Study, series, dates and times
    "AccessionNumber": "Z",  # (0008,0050) Z
    "StudyID": "Z",  # (0020,0010) Z
    "StudyDate": "Z",  # (0008,0020) Z; C with modified longitudinal dates
    "StudyTime": "Z",  # (0008,0030) Z
    "SeriesDate": "X",  # (0008,0021) X/D
    "SeriesTime": "X",  # (0008,0031) X/D
    "ContentDate": "Z",  # (0008,0023) Z/D
    "ContentTime": "Z",  # (0008,0033) Z/D
    "AcquisitionDate": "X",  # (0008,0022) X/Z
    "AcquisitionTime": "X",  # (0008,0032) X/Z
    "AcquisitionDateTime": "X",  # (0008,002A) X/Z/D
    "InstanceCreationDate": "X",  # (0008,0012) X/D
    # Free text
    "StudyDescription": "X",  # (0008,1030) X; C with Clean Descriptors
    "SeriesDescription": "X",  # (0008,103E) X; C with Clean Descriptors
    "ProtocolName": "X",  # (0018,1030) X/D; C with Clean Descriptors
    "ImageComments": "X",  # (0020,4000) X; C with Clean Descriptors, never kept here
    "RequestAttributesSequence": "X",  # (0040,0275) X; a sequence, never read
    # People and places
    "InstitutionName": "X",  # (0008,0080) X/Z/D
    "InstitutionAddress": "X",  # (0008,0081) X
    "InstitutionalDepartmentName": "X",  # (0008,1040) X
    "ReferringPhysicianName": "Z",  # (0008,0090) Z
    "PhysiciansOfRecord": "X",  # (0008,1048) X
    "PerformingPhysicianName": "X",  # (0008,1050) X
    "NameOfPhysiciansReadingStudy": "X",  # (0008,1060) X
    "OperatorsName": "X",  # (0008,1070) X/Z/D
    # Equipment
    "StationName": "X",  # (0008,1010) X/Z/D; K with Retain Device Identity, never kept here
    "DeviceSerialNumber": "X",  # (0018,1000) X/Z/D; K with Retain Device Identity, never kept
    "DetectorID": "X",  # (0018,700A) X/D; K with Retain Device Identity, never kept here
    "GantryID": "X",  # (0018,1008) X; K with Retain Device Identity, never kept here
    "Manufacturer": "X",  # (0008,0070) not in E.1-1 (K); kept only with retain_device_identity
    "ManufacturerModelName": "X",  # (0008,1090) not in E.1-1 (K); as Manufacturer
    # UIDs: only keyed hashes of them leave (case_id, patient pseudonym fallback)
    "StudyInstanceUID": "U",  # (0020,000D) U
    "SeriesInstanceUID": "U",  # (0020,000E) U
    "SOPInstanceUID": "U",  # (0008,0018) U
    "FrameOfReferenceUID": "U",  # (0020,0052) U
    # Not in Table E.1-1: describe the image, not the patient
    "Modality": "K",  # (0008,0060)
    "SOPClassUID": "K",  # (0008,0016) a standard class UID, emitted as its name
    "PhotometricInterpretation": "K",  # (0028,0004)
    "BodyPartExamined": "C",  # (0018,0015) not in E.1-1 (K); kept only as a CS-like token
}

# What each option of DeidOptions changes, keyed by the option's field name. Attributes the profile
# would let an option keep but medsearch does not are absent: they stay as ATTRIBUTE_ACTIONS says.
OPTION_ACTIONS: dict[str, dict[str, str]] = {
    "retain_device_identity": {
        "Manufacturer": "K",  # make of the device
        "ManufacturerModelName": "K",  # model of the device
    },
    "retain_patient_characteristics": {
        "PatientSex": "K",  # M, F or O only
        "PatientAge": "C",  # decade band, 90 and over pooled
        "PatientSize": "C",  # rounded to 0.1 m
        "PatientWeight": "C",  # rounded to 5 kg
    },
    "longitudinal_dates": {
        "StudyDate": "C",  # shifted by SiteKey.date_offset_days of the patient pseudonym
    },
    "clean_descriptors": {
        "StudyDescription": "C",  # only a body-part term of the vocabulary is taken from it
        "SeriesDescription": "C",  # as StudyDescription
        "ProtocolName": "C",  # as StudyDescription
    },
}

# Where medsearch's action is stricter than PS3.15 under some option, and why. Tests check that
# every other attribute gets exactly the profile's (first) action.
STRICTER_THAN_PROFILE: dict[str, str] = {
    "Manufacturer": "treated as device identity: kept only with retain_device_identity",
    "ManufacturerModelName": "treated as device identity: kept only with retain_device_identity",
    "BodyPartExamined": "kept only as a CS-like token, or a vocabulary term with clean_descriptors",
    "PatientAge": "kept only as a decade band; ages of 90 and over are pooled",
    "PatientSize": "kept only rounded to 0.1 m",
    "PatientWeight": "kept only rounded to 5 kg",
    "EthnicGroup": "not needed to find similar images; never kept",
    "PregnancyStatus": "not needed to find similar images; never kept",
    "StationName": "names one machine, and so one site; never kept",
    "DeviceSerialNumber": "names one machine, and so one site; never kept",
    "DetectorID": "names one machine, and so one site; never kept",
    "GantryID": "names one machine, and so one site; never kept",
    "StudyTime": "with longitudinal_dates only the shifted study date is kept",
    "SeriesDate": "with longitudinal_dates only the shifted study date is kept",
    "SeriesTime": "with longitudinal_dates only the shifted study date is kept",
    "ContentDate": "with longitudinal_dates only the shifted study date is kept",
    "ContentTime": "with longitudinal_dates only the shifted study date is kept",
    "AcquisitionDate": "with longitudinal_dates only the shifted study date is kept",
    "AcquisitionTime": "with longitudinal_dates only the shifted study date is kept",
    "AcquisitionDateTime": "with longitudinal_dates only the shifted study date is kept",
    "InstanceCreationDate": "with longitudinal_dates only the shifted study date is kept",
    "ImageComments": "free text that is not a description of the body part; never kept",
}


def _is_keyword(name: str) -> bool:
    # tag_for_keyword("") finds a retired element whose keyword is empty; round-trip instead.
    tag = tag_for_keyword(name) if name else None
    return tag is not None and keyword_for_tag(tag) == name


def _add_tag_keys(table: dict[tuple[int, int] | str, str]) -> None:
    """Let the table be looked up by (group, element) as well as by keyword."""
    for keyword, action in list(table.items()):
        tag = tag_for_keyword(str(keyword)) if _is_keyword(str(keyword)) else None
        if tag is None:  # a typo in the table above; fail at import, not at the first case
            raise ValueError(f"ATTRIBUTE_ACTIONS: {keyword!r} is not a DICOM keyword")
        table[(tag >> 16, tag & 0xFFFF)] = action


_add_tag_keys(ATTRIBUTE_ACTIONS)

_OPTION_NAMES = tuple(f.name for f in fields(DeidOptions))
if set(OPTION_ACTIONS) != set(_OPTION_NAMES):  # keep the two in step when an option is added
    raise ValueError("OPTION_ACTIONS must have one entry per DeidOptions field")


def profile_action(keyword: str | tuple[int, int], options: DeidOptions = DeidOptions()) -> str:
    """Return medsearch's PS3.15 Annex E action for one attribute under ``options``.

    Parameters
    ----------
    keyword
        A DICOM keyword (``"PatientName"``) or a ``(group, element)`` tag.
    options
        The options in force.

    Returns
    -------
    str
        One of ``"X"``, ``"Z"``, ``"D"``, ``"K"``, ``"C"``, ``"U"``. Attributes medsearch does not
        list, private tags included, are ``"X"``: only what is listed may leave a header.

    Raises
    ------
    ValueError
        If ``keyword`` is neither a DICOM keyword nor a ``(group, element)`` pair.

    Examples
    --------
    >>> profile_action("PatientSex", DeidOptions(retain_patient_characteristics=False))
    'Z'
    >>> profile_action("PatientSex")
    'K'
    """
    if isinstance(keyword, tuple):
        if len(keyword) != 2 or not all(isinstance(x, int) for x in keyword):
            raise ValueError(f"profile_action: {keyword!r} is not a (group, element) pair of ints")
        name = keyword_for_tag((keyword[0] << 16) | keyword[1]) or ""
    elif isinstance(keyword, str) and _is_keyword(keyword):
        name = keyword
    else:
        raise ValueError(
            f"profile_action: {keyword!r} is not a DICOM keyword; use the keyword pydicom uses, "
            "e.g. 'PatientName'"
        )
    action = ATTRIBUTE_ACTIONS.get(name, "X")
    for option in _OPTION_NAMES:
        if getattr(options, option):
            action = OPTION_ACTIONS[option].get(name, action)
    return action


# --------------------------------------------------------------------------------------------
# The site key and keyed pseudonyms.
# --------------------------------------------------------------------------------------------

_KEY_BYTES = 32
_ENV_KEY = "MEDSEARCH_SITE_KEY"
_ENV_KEY_FILE = "MEDSEARCH_KEY_FILE"
_HEX = re.compile(r"[0-9a-fA-F]+")
_KIND = re.compile(r"[a-z][a-z0-9_]*")
# Domain labels keep the HMACs of different uses apart, so one can never stand for another.
_PSEUDONYM_DOMAIN = b"medsearch/pseudonym/v1"
_CHECK_LABEL = b"medsearch/site-key-check/v1"
_DATE_OFFSET_DOMAIN = b"medsearch/date-offset/v1"
_MAX_DATE_OFFSET = 365


def _default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "medsearch" / "site.key"


def _parse_key(text: str) -> bytes | None:
    text = text.strip()
    if not _HEX.fullmatch(text) or len(text) % 2 or len(text) < 2 * _KEY_BYTES:
        return None
    return bytes.fromhex(text)


def _encode_fields(*items: bytes) -> bytes:
    """Length-prefix each field so that no two different field lists give the same bytes."""
    return b"".join(len(item).to_bytes(8, "big") + item for item in items)


class SiteKey:
    """Secret key for pseudonyms. Never printed (repr shows only the path / 'from environment'
    and the check value).

    Use :meth:`load` to get one. The same key always gives the same pseudonyms, so an index can
    grow over several runs; another key gives unrelated ones, which :meth:`check_value` detects.

    Attributes
    ----------
    path
        The key file, or ``None`` when the key came from ``MEDSEARCH_SITE_KEY``.
    created
        ``True`` when :meth:`load` made a new key file.
    """

    __slots__ = ("_key", "created", "path")

    def __init__(self, key: bytes, *, path: Path | None = None, created: bool = False) -> None:
        if not isinstance(key, bytes) or len(key) < _KEY_BYTES:
            raise ValueError(f"SiteKey needs at least {_KEY_BYTES} bytes of key")
        self._key = key
        self.path = path
        self.created = created

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, create: bool = False) -> SiteKey:
        """Load the site key, or create it when asked.

        Resolution order: ``path``; else ``MEDSEARCH_SITE_KEY`` (hex, at least 32 bytes); else the
        file named by ``MEDSEARCH_KEY_FILE``; else ``$XDG_CONFIG_HOME/medsearch/site.key`` (by
        default ``~/.config/medsearch/site.key``). A key file holds the key as hex on one line.

        Parameters
        ----------
        path
            Key file to use, ahead of the environment.
        create
            When the key file does not exist, write a new random key there (mode 0o600, in a
            directory created with mode 0o700) and set ``created``. An existing file is loaded.

        Raises
        ------
        KeyFileError
            The key file is missing (and ``create`` is false), unreadable, not writable when it must
            be created, or does not hold a hex key of at least 32 bytes; or ``MEDSEARCH_SITE_KEY``
            is set to something that is not such a key. A new key is never made silently: it would
            change every pseudonym.
        """
        if path is None:
            env_key = os.environ.get(_ENV_KEY, "")
            if env_key:
                key = _parse_key(env_key)
                if key is None:
                    raise KeyFileError(
                        f"{_ENV_KEY} is not a hex key of at least {_KEY_BYTES} bytes "
                        f"({2 * _KEY_BYTES} hex digits); set it to the site's key or unset it "
                        "to use the key file"
                    )
                return cls(key)
            env_file = os.environ.get(_ENV_KEY_FILE, "")
            key_path = Path(env_file).expanduser() if env_file else _default_key_path()
        else:
            key_path = Path(path).expanduser()

        if create and not key_path.exists():
            return cls._create(key_path)
        return cls(cls._read(key_path), path=key_path)

    @staticmethod
    def _read(key_path: Path) -> bytes:
        try:
            text = key_path.read_text(encoding="ascii")
        except FileNotFoundError as e:
            raise KeyFileError(
                f"Site key file {key_path} does not exist; point MEDSEARCH_KEY_FILE at the key "
                "this index was built with, or load with create=True to make a new key"
            ) from e
        except UnicodeDecodeError as e:
            raise KeyFileError(
                f"Site key file {key_path} is not a hex key of at least {_KEY_BYTES} bytes; "
                "restore the original key file (a new key would change every pseudonym)"
            ) from e
        except OSError as e:
            raise KeyFileError(
                f"Cannot read site key file {key_path} ({e.strerror or type(e).__name__}); "
                "check that it is a file and that this user may read it"
            ) from e
        key = _parse_key(text)
        if key is None:
            raise KeyFileError(
                f"Site key file {key_path} is not a hex key of at least {_KEY_BYTES} bytes; "
                "restore the original key file (a new key would change every pseudonym)"
            )
        try:
            mode = key_path.stat().st_mode
        except OSError:  # pragma: no cover - the file was just read
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("Site key file %s can be read by other users; chmod 600 it", key_path)
        return key

    @classmethod
    def _create(cls, key_path: Path) -> SiteKey:
        key = secrets.token_bytes(_KEY_BYTES)
        parent = key_path.parent
        tmp: Path | None = None
        try:
            if not parent.exists():
                parent.mkdir(mode=0o700, parents=True)
                parent.chmod(0o700)  # mkdir's mode is filtered by the umask
            # Write a private temporary file, then link it into place: the link fails if another
            # process made a key meanwhile, and that key then wins instead of being overwritten.
            candidate = parent / f".{key_path.name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            tmp = candidate
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (key.hex() + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, key_path)
            except FileExistsError:
                return cls(cls._read(key_path), path=key_path)
        except OSError as e:
            raise KeyFileError(
                f"Cannot create site key file {key_path} ({e.strerror or type(e).__name__}); "
                "choose a writable path with MEDSEARCH_KEY_FILE"
            ) from e
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        logger.info("Created a new site key at %s", key_path)
        return cls(key, path=key_path, created=True)

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def pseudonym(self, *parts: str, kind: str) -> str:
        """Return a keyed pseudonym for ``parts``, e.g. ``"c-3fa2..."`` for kind ``"case"``.

        HMAC-SHA256 over the kind and the parts, each length-prefixed so that no two different
        inputs share an encoding; 16 hex digits (64 bits) follow a tag of the kind's first letter.

        Raises
        ------
        ValueError
            If ``kind`` is not a lowercase identifier.
        TypeError
            If a part is not a ``str``.
        """
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(
                f"pseudonym kind must be a lowercase identifier, e.g. 'case'; got {kind!r}"
            )
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(f"pseudonym parts must be str, got {type(part).__name__}")
        message = _encode_fields(
            _PSEUDONYM_DOMAIN, kind.encode(), *(p.encode("utf-8") for p in parts)
        )
        return f"{kind[0]}-{self._mac(message)[:16]}"

    def check_value(self) -> str:
        """Return 16 hex digits that identify this key without revealing it.

        Store it in an index manifest; a later run with another key gives another value.
        """
        return self._mac(_CHECK_LABEL)[:16]

    def date_offset_days(self, patient_pseudonym: str) -> int:
        """Return this patient's keyed date shift in days: in [-365, 365], never 0.

        Zero is left out so that no patient's dates are kept unshifted.
        """
        digest = hmac.new(
            self._key,
            _encode_fields(_DATE_OFFSET_DOMAIN, patient_pseudonym.encode("utf-8")),
            hashlib.sha256,
        ).digest()
        n = int.from_bytes(digest[:8], "big") % (2 * _MAX_DATE_OFFSET)  # 0 .. 729
        return n - _MAX_DATE_OFFSET if n < _MAX_DATE_OFFSET else n - _MAX_DATE_OFFSET + 1

    def __repr__(self) -> str:
        where = (
            f"path={str(self.path)!r}" if self.path is not None else f"from environment {_ENV_KEY}"
        )
        return f"SiteKey({where}, check={self.check_value()})"

    __str__ = __repr__


def case_id(key: SiteKey, study_uid: str, series_uid: str, part: str = "") -> str:
    """Return the pseudonymous id of a case (a series, or a part of one): ``"c-..."``.

    Raises
    ------
    InvalidStudyError
        If the study or series UID is empty: cases without them would share one id.
    """
    study_uid, series_uid = _clean_uid(study_uid), _clean_uid(series_uid)
    if not study_uid or not series_uid:
        raise InvalidStudyError(
            "A case needs a StudyInstanceUID and a SeriesInstanceUID to get an id; "
            "check the files of this series"
        )
    return key.pseudonym(study_uid, series_uid, part, kind="case")


def _clean_uid(uid: str) -> str:
    return str(uid or "").strip().rstrip("\x00").strip()


def patient_pseudonym(key: SiteKey, header: pydicom.Dataset) -> str:
    """Return the keyed pseudonym of the patient of ``header``: ``"p-..."``.

    Made from PatientID and IssuerOfPatientID; when PatientID is empty, from StudyInstanceUID
    (each study then counts as its own patient, which is the safe mistake).

    Raises
    ------
    InvalidStudyError
        If the header has neither a PatientID nor a StudyInstanceUID.
    """
    patient_id = _derivation_text(header, "PatientID")
    if patient_id:
        issuer = _derivation_text(header, "IssuerOfPatientID") or ""
        return key.pseudonym("id", issuer, patient_id, kind="patient")
    study_uid = _clean_uid(_derivation_text(header, "StudyInstanceUID") or "")
    if study_uid:
        return key.pseudonym("study", study_uid, kind="patient")
    raise InvalidStudyError(
        "A header has neither a PatientID nor a StudyInstanceUID, so no patient pseudonym can be "
        "made; check the files of this series"
    )


# --------------------------------------------------------------------------------------------
# Values: age bands, rounding, tokens.
# --------------------------------------------------------------------------------------------

_AGE_STRING = re.compile(r"(\d{3})([DWMY])")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.2425 / 12, "Y": 365.2425}


def age_band(value: str | int | None) -> str | None:
    """Return the age band of a DICOM age string (``"060Y"``) or a whole number of years.

    Decades (``"60-69"``), with ``"0"`` under one year, ``"1-9"`` from one to nine years and
    ``"90+"`` from ninety on (ages over 89 are rare enough to identify). Anything else is ``None``.

    Examples
    --------
    >>> age_band("060Y"), age_band("006M"), age_band("104Y"), age_band(7), age_band("abc")
    ('60-69', '0', '90+', '1-9', None)
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        years = value
    elif isinstance(value, str):
        match = _AGE_STRING.fullmatch(value.strip().upper())
        if match is None:
            return None
        days = int(match.group(1)) * _DAYS_PER[match.group(2)]
        years = math.floor(days / _DAYS_PER["Y"] + 1e-9)  # 012M is one year, not 0.9999
    else:
        return None
    if years < 0:
        return None
    if years < 1:
        return "0"
    if years < 10:
        return "1-9"
    if years >= 90:
        return "90+"
    low = years // 10 * 10
    return f"{low}-{low + 9}"


def _parse_date(text: str | None) -> _dt.date | None:
    if not text:
        return None
    text = text.strip()
    if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text):  # ACR-NEMA style, still seen in old archives
        text = text.replace(".", "")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _years_between(birth: _dt.date, on: _dt.date) -> int | None:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return years if years >= 0 else None


def _round_to(value: float, step: float) -> float:
    # Half up, not Python's half-to-even, so that bands do not depend on parity.
    return round(math.floor(value / step + 0.5) * step, 6)


_CS_TOKEN = re.compile(r"[A-Z0-9_ ]{1,16}")
_BODY_PART_TOKEN = re.compile(r"[A-Z ]{1,16}")
_PRINTABLE_LO = re.compile(r"[ -~]{1,64}")

# Body Part Examined defined terms (PS3.16 CID 4031 / PS3.3 C.7.3.1), the vocabulary that
# clean_descriptors maps onto. Words of descriptions that mean one of them map through _SYNONYMS.
# fmt: off
_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "ANKLE", "AORTA", "ARM", "AXILLA", "BLADDER", "BRAIN", "BREAST",
    "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "CLAVICLE", "COCCYX", "COLON", "CSPINE", "ELBOW",
    "EXTREMITY", "EYE", "FACE", "FINGER", "FOOT", "FOREARM", "HAND", "HEAD", "HEADNECK", "HEART",
    "HIP", "HUMERUS", "JAW", "KIDNEY", "KNEE", "LEG", "LIVER", "LSPINE", "LUNG", "NECK", "ORBIT",
    "PANCREAS", "PELVIS", "PROSTATE", "SACRUM", "SHOULDER", "SKULL", "SPINE", "SPLEEN", "TSPINE",
    "THIGH", "THYROID", "WHOLEBODY", "WRIST",
})
# fmt: on
_SYNONYMS = {
    "THORAX": "CHEST",
    "LUNGS": "LUNG",
    "PULMONARY": "LUNG",
    "ABD": "ABDOMEN",
    "ABDOMINAL": "ABDOMEN",
    "PELVIC": "PELVIS",
    "CEREBRAL": "BRAIN",
    "CRANIAL": "HEAD",
    "CARDIAC": "HEART",
    "HEPATIC": "LIVER",
    "RENAL": "KIDNEY",
    "KIDNEYS": "KIDNEY",
    "BREASTS": "BREAST",
    "MAMMO": "BREAST",
}
# Several regions named together map to the combined term where the vocabulary has one.
_COMBINED = {
    frozenset({"CHEST", "ABDOMEN"}): "CHESTABDOMEN",
    frozenset({"ABDOMEN", "PELVIS"}): "ABDOMENPELVIS",
    frozenset({"CHEST", "ABDOMEN", "PELVIS"}): "CHESTABDPELVIS",
    frozenset({"HEAD", "NECK"}): "HEADNECK",
}


def _cs_token(text: str | None, pattern: re.Pattern[str] = _CS_TOKEN) -> str | None:
    if not text:
        return None
    token = text.strip().upper()
    return token if pattern.fullmatch(token) else None


def _body_part_token(text: str | None) -> str | None:
    """BodyPartExamined as a CS-like token: uppercase letters and single spaces, or None."""
    if not text:
        return None
    token = _cs_token(text.replace("_", " "), _BODY_PART_TOKEN)
    if token is None or not token.strip():
        return None
    return " ".join(token.split())


def _vocabulary_term(texts: list[str]) -> str | None:
    """The body-part term named in ``texts``, tried in order; never any other word of them."""
    for text in texts:
        letters_only = re.sub(r"[^A-Z]", "", text.upper())
        if letters_only in _BODY_PARTS:  # "C-SPINE", "Chest_Abdomen" and the like
            return letters_only
        found: list[str] = []
        for word in re.findall(r"[A-Z]+", text.upper()):
            term = _SYNONYMS.get(word, word)
            if term in _BODY_PARTS and term not in found:
                found.append(term)
        if len(found) == 1:
            return found[0]
        if found:
            return _COMBINED.get(frozenset(found))
    return None


def _printable(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text if _PRINTABLE_LO.fullmatch(text) else None


# --------------------------------------------------------------------------------------------
# Reading the header. Every read goes through one of two functions: _policy_text for values that
# may leave (the policy must say K or C), _derivation_text for the few values read only to derive
# a pseudonym, an age or a shifted date, which never leave themselves.
# --------------------------------------------------------------------------------------------

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


def _policy_text(header: pydicom.Dataset, keyword: str, options: DeidOptions) -> str | None:
    if profile_action(keyword, options) not in ("K", "C"):
        raise RuntimeError(
            f"deid: {keyword} is not kept under {options}; this is a bug in medsearch"
        )
    value = _raw(header, keyword)
    return None if value is None else str(value)


def _policy_float(header: pydicom.Dataset, keyword: str, options: DeidOptions) -> float | None:
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


def _derivation_text(header: pydicom.Dataset, keyword: str) -> str | None:
    if keyword not in _DERIVATION_SOURCES:
        raise RuntimeError(
            f"deid: {keyword} is not a derivation source; this is a bug in medsearch"
        )
    value = _raw(header, keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# --------------------------------------------------------------------------------------------
# The case table row.
# --------------------------------------------------------------------------------------------

# Each key of case_metadata and the attributes it may come from. Keys in DERIVED_FIELDS are made
# by a computation that never outputs its inputs (a keyed hash, an age band).
CASE_FIELDS: dict[str, tuple[str, ...]] = {
    "modality": ("Modality",),
    "body_part": ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName"),
    "sex": ("PatientSex",),
    "age_band": ("PatientAge", "PatientBirthDate", "StudyDate"),
    "patient_size_m": ("PatientSize",),
    "patient_weight_kg": ("PatientWeight",),
    "manufacturer": ("Manufacturer",),
    "model": ("ManufacturerModelName",),
    "sop_class": ("SOPClassUID",),
    "photometric": ("PhotometricInterpretation",),
    "study_date_shifted": ("StudyDate",),
    "patient": ("PatientID", "IssuerOfPatientID", "StudyInstanceUID"),
}
CASE_METADATA_KEYS: tuple[str, ...] = tuple(CASE_FIELDS)
DERIVED_FIELDS = frozenset({"age_band", "patient"})

_MAX_SIZE_M = 3.0
_MAX_WEIGHT_KG = 700.0


def case_metadata(
    header: pydicom.Dataset, *, key: SiteKey, options: DeidOptions = DeidOptions()
) -> dict[str, str | float | int | None]:
    """Return the non-identifying metadata of the case ``header`` belongs to.

    Always the keys of :data:`CASE_METADATA_KEYS`, in that order, ``None`` where a value is
    unknown or not kept under ``options``. Only top-level standard attributes that the policy keeps
    or cleans are read (:func:`profile_action`); private tags and sequences are never read.

    Parameters
    ----------
    header
        A dataset of the case, as read by :mod:`medsearch.io`.
    key
        The site key, for the patient pseudonym and the date shift.
    options
        The PS3.15 options in force.

    Raises
    ------
    InvalidStudyError
        If the header has neither a PatientID nor a StudyInstanceUID.
    """
    patient = patient_pseudonym(key, header)
    row: dict[str, str | float | int | None] = dict.fromkeys(CASE_METADATA_KEYS)
    row["patient"] = patient
    row["modality"] = _cs_token(_policy_text(header, "Modality", options))
    row["photometric"] = _cs_token(_policy_text(header, "PhotometricInterpretation", options))

    sop_class = _policy_text(header, "SOPClassUID", options)
    if sop_class:
        uid = UID(_clean_uid(sop_class))
        # Only a class the standard names: a private class UID is an opaque string.
        row["sop_class"] = uid.name if uid.is_valid and uid.name != str(uid) else None

    body_part = _policy_text(header, "BodyPartExamined", options)
    if options.clean_descriptors:
        texts = [body_part] + [
            _policy_text(header, kw, options)
            for kw in ("StudyDescription", "SeriesDescription", "ProtocolName")
        ]
        row["body_part"] = _vocabulary_term([t for t in texts if t])
    else:
        row["body_part"] = _body_part_token(body_part)

    if options.retain_patient_characteristics:
        sex = (_policy_text(header, "PatientSex", options) or "").strip().upper()
        row["sex"] = sex if sex in ("M", "F", "O") else None
        row["age_band"] = _age_band_of(header, options)
        size = _policy_float(header, "PatientSize", options)
        if size is not None and 0 < size <= _MAX_SIZE_M:
            row["patient_size_m"] = _round_to(size, 0.1)
        weight = _policy_float(header, "PatientWeight", options)
        if weight is not None and 0 < weight <= _MAX_WEIGHT_KG:
            row["patient_weight_kg"] = _round_to(weight, 5.0)

    if options.retain_device_identity:
        row["manufacturer"] = _printable(_policy_text(header, "Manufacturer", options))
        row["model"] = _printable(_policy_text(header, "ManufacturerModelName", options))

    if options.longitudinal_dates:
        study_date = _parse_date(_policy_text(header, "StudyDate", options))
        if study_date is not None:
            shifted = study_date + _dt.timedelta(days=key.date_offset_days(patient))
            row["study_date_shifted"] = shifted.isoformat()
    return row


def _age_band_of(header: pydicom.Dataset, options: DeidOptions) -> str | None:
    """Age band from PatientAge, else from birth and study dates (neither is kept)."""
    band = age_band(_policy_text(header, "PatientAge", options))
    if band is not None:
        return band
    birth = _parse_date(_derivation_text(header, "PatientBirthDate"))
    study = _parse_date(_derivation_text(header, "StudyDate"))
    if birth is None or study is None:
        return None
    years = _years_between(birth, study)
    return None if years is None else age_band(years)


def _check_tables(tables: Mapping[str, tuple[str, ...]]) -> None:
    for name, sources in tables.items():
        for keyword in sources:
            if not _is_keyword(keyword):
                raise ValueError(f"CASE_FIELDS[{name!r}]: {keyword!r} is not a DICOM keyword")


_check_tables(CASE_FIELDS)
