"""The case table row: the non-identifying metadata kept beside each embedding.

:func:`case_metadata` builds the row of a case from one of its headers, with the keys of
:data:`CASE_METADATA_KEYS`; :data:`CASE_FIELDS` says which attributes each key may come from, and
:data:`DERIVED_FIELDS` which keys are computed without ever showing their inputs (a keyed hash, an
age band). Values are kept only in a reduced form: an age band (:func:`age_band`), rounded size and
weight, a CS-like body part token or a term of the body-part vocabulary, printable device names.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Mapping

import pydicom
from pydicom.uid import UID

from medsearch.deid.keys import SiteKey
from medsearch.deid.profile import DeidOptions, is_keyword
from medsearch.deid.pseudonyms import patient_pseudonym
from medsearch.deid.reading import clean_uid, derivation_text, policy_float, policy_text

__all__ = ["CASE_FIELDS", "CASE_METADATA_KEYS", "DERIVED_FIELDS", "age_band", "case_metadata"]

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
_DEFAULT_OPTIONS = DeidOptions()  # immutable (a frozen dataclass): safe as a default argument


def case_metadata(
    header: pydicom.Dataset, *, key: SiteKey, options: DeidOptions = _DEFAULT_OPTIONS
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
    row["modality"] = _cs_token(policy_text(header, "Modality", options))
    row["photometric"] = _cs_token(policy_text(header, "PhotometricInterpretation", options))

    sop_class = policy_text(header, "SOPClassUID", options)
    if sop_class:
        uid = UID(clean_uid(sop_class))
        # Only a class the standard names: a private class UID is an opaque string.
        row["sop_class"] = uid.name if uid.is_valid and uid.name != str(uid) else None

    body_part = policy_text(header, "BodyPartExamined", options)
    if options.clean_descriptors:
        texts = [body_part] + [
            policy_text(header, kw, options)
            for kw in ("StudyDescription", "SeriesDescription", "ProtocolName")
        ]
        row["body_part"] = _vocabulary_term([t for t in texts if t])
    else:
        row["body_part"] = _body_part_token(body_part)

    if options.retain_patient_characteristics:
        sex = (policy_text(header, "PatientSex", options) or "").strip().upper()
        row["sex"] = sex if sex in ("M", "F", "O") else None
        row["age_band"] = _age_band_of(header, options)
        size = policy_float(header, "PatientSize", options)
        if size is not None and 0 < size <= _MAX_SIZE_M:
            row["patient_size_m"] = _round_to(size, 0.1)
        weight = policy_float(header, "PatientWeight", options)
        if weight is not None and 0 < weight <= _MAX_WEIGHT_KG:
            row["patient_weight_kg"] = _round_to(weight, 5.0)

    if options.retain_device_identity:
        row["manufacturer"] = _printable(policy_text(header, "Manufacturer", options))
        row["model"] = _printable(policy_text(header, "ManufacturerModelName", options))

    if options.longitudinal_dates:
        study_date = _parse_date(policy_text(header, "StudyDate", options))
        if study_date is not None:
            shifted = study_date + _dt.timedelta(days=key.date_offset_days(patient))
            row["study_date_shifted"] = shifted.isoformat()
    return row


def _age_band_of(header: pydicom.Dataset, options: DeidOptions) -> str | None:
    """Age band from PatientAge, else from birth and study dates (neither is kept)."""
    band = age_band(policy_text(header, "PatientAge", options))
    if band is not None:
        return band
    birth = _parse_date(derivation_text(header, "PatientBirthDate"))
    study = _parse_date(derivation_text(header, "StudyDate"))
    if birth is None or study is None:
        return None
    years = _years_between(birth, study)
    return None if years is None else age_band(years)


def _check_tables(tables: Mapping[str, tuple[str, ...]]) -> None:
    for name, sources in tables.items():
        for keyword in sources:
            if not is_keyword(keyword):
                raise ValueError(f"CASE_FIELDS[{name!r}]: {keyword!r} is not a DICOM keyword")


_check_tables(CASE_FIELDS)
