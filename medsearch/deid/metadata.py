"""The case table row: the non-identifying metadata kept beside each embedding.

:func:`case_metadata` builds the row of a case from one of its headers, with the keys of
:data:`CASE_METADATA_KEYS`; :data:`CASE_FIELDS` says which attributes each key may come from, and
:data:`DERIVED_FIELDS` which keys are computed without ever showing their inputs (a keyed hash, an
age band). Values are kept only in a reduced form: an age band (:func:`age_band`), size and weight
bands (:func:`size_band`, :func:`weight_band`), and for text a term of a vocabulary of
:mod:`medsearch.deid.vocabulary` (body part, vendor, scanner model, modality, photometric
interpretation) or of the site's own lists, ``"OTHER"`` for any other value.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Callable, Mapping

import pydicom
from pydicom.uid import UID

from medsearch.deid.keys import SiteKey
from medsearch.deid.profile import DeidOptions, is_keyword
from medsearch.deid.pseudonyms import patient_pseudonym
from medsearch.deid.reading import clean_uid, derivation_text, policy_float, policy_text
from medsearch.deid.vocabulary import (
    NO_SITE_TERMS,
    OTHER,
    SiteTerms,
    body_part_in_text,
    body_part_term,
    looks_identifying,
    modality_term,
    model_term,
    photometric_term,
    vendor_term,
)

__all__ = [
    "CASE_FIELDS",
    "CASE_METADATA_KEYS",
    "DERIVED_FIELDS",
    "age_band",
    "case_metadata",
    "kept_value",
    "size_band",
    "weight_band",
]

# --------------------------------------------------------------------------------------------
# Values: age bands, rounding, tokens.
# --------------------------------------------------------------------------------------------

_AGE_STRING = re.compile(r"(\d{3})([DWMY])")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.2425 / 12, "Y": 365.2425}
# Plausible sizes and weights; beyond the top band edge values are pooled, beyond the maximum dropped.
_MIN_SIZE_M, _TOP_SIZE_M, _MAX_SIZE_M = 0.4, 2.2, 3.0
_MIN_WEIGHT_KG, _TOP_WEIGHT_KG, _MAX_WEIGHT_KG = 2, 250, 700.0


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


def size_band(metres: float | None) -> str | None:
    """The 10 cm band of a patient size in metres: ``"1.70-1.79"``.

    Sizes from 0.4 m up are kept: ``"0.40-0.49"`` is the first band and ``"2.20+"`` pools 2.2 m
    and over (up to 3 m); anything else (0, which scanners write for unknown, a negative value, a
    size under 0.4 m, or centimetres in a metres field) is ``None``.

    Examples
    --------
    >>> size_band(1.83), size_band(0.52), size_band(2.31), size_band(170), size_band(0)
    ('1.80-1.89', '0.50-0.59', '2.20+', None, None)
    """
    if metres is None or not math.isfinite(metres) or not _MIN_SIZE_M <= metres <= _MAX_SIZE_M:
        return None
    if metres >= _TOP_SIZE_M:
        return f"{_TOP_SIZE_M:.2f}+"
    low = math.floor(metres * 10 + 1e-9) / 10
    return f"{low:.2f}-{low + 0.09:.2f}"


def weight_band(kilograms: float | None) -> str | None:
    """The 10 kg band of a patient weight: ``"80-89"``.

    Weights from 2 kg up are kept, a newborn's included: ``"2-9"`` is the first band and ``"250+"``
    pools 250 kg and over (up to 700 kg); anything else (0 for unknown, a negative value, under
    2 kg, or a weight no person has) is ``None``.

    Examples
    --------
    >>> weight_band(81.7), weight_band(2.2), weight_band(312), weight_band(900), weight_band(0)
    ('80-89', '2-9', '250+', None, None)
    """
    if kilograms is None or not math.isfinite(kilograms) or not _MIN_WEIGHT_KG <= kilograms <= _MAX_WEIGHT_KG:
        return None
    if kilograms >= _TOP_WEIGHT_KG:
        return f"{_TOP_WEIGHT_KG}+"
    if kilograms < 10:
        return f"{_MIN_WEIGHT_KG}-9"
    low = int(kilograms // 10 * 10)
    return f"{low}-{low + 9}"


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
# Fields that hold a term of a vocabulary or of the site's lists.
_VOCABULARY_FIELDS = ("modality", "body_part", "manufacturer", "model", "photometric")

_DEFAULT_OPTIONS = DeidOptions()  # immutable (a frozen dataclass): safe as a default argument


def case_metadata(
    header: pydicom.Dataset,
    *,
    key: SiteKey,
    options: DeidOptions = _DEFAULT_OPTIONS,
    terms: SiteTerms = NO_SITE_TERMS,
) -> dict[str, str | float | int | None]:
    """Return the non-identifying metadata of the case ``header`` belongs to.

    Always the keys of :data:`CASE_METADATA_KEYS`, in that order, ``None`` where a value is
    unknown or not kept under ``options``. Only top-level standard attributes that the policy keeps
    or cleans are read (:func:`profile_action`); private tags and sequences are never read. Text
    values are terms of :mod:`medsearch.deid.vocabulary` (or of ``terms``), ``"OTHER"`` where the
    header holds something else; size and weight are bands (:func:`size_band`, :func:`weight_band`).

    Parameters
    ----------
    header
        A dataset of the case, as read by :mod:`medsearch.io`.
    key
        The site key, for the patient pseudonym and the date shift.
    options
        The PS3.15 options in force.
    terms
        The body parts, manufacturers and models the site adds to the vocabularies.

    Raises
    ------
    InvalidStudyError
        If the header has neither a PatientID nor a StudyInstanceUID.
    """
    patient = patient_pseudonym(key, header)
    row: dict[str, str | float | int | None] = dict.fromkeys(CASE_METADATA_KEYS)
    row["patient"] = patient
    row["modality"] = modality_term(policy_text(header, "Modality", options))
    row["photometric"] = photometric_term(policy_text(header, "PhotometricInterpretation", options))

    sop_class = policy_text(header, "SOPClassUID", options)
    if sop_class:
        uid = UID(clean_uid(sop_class))
        # Only a class the standard names: a private class UID is an opaque string.
        row["sop_class"] = uid.name if uid.is_valid and uid.name != str(uid) else None

    body_part = body_part_term(policy_text(header, "BodyPartExamined", options), terms)
    if options.clean_descriptors and body_part in (None, OTHER):
        texts = [policy_text(header, kw, options) for kw in ("StudyDescription", "SeriesDescription", "ProtocolName")]
        body_part = body_part_in_text([t for t in texts if t]) or body_part
    row["body_part"] = body_part

    if options.retain_patient_characteristics:
        sex = (policy_text(header, "PatientSex", options) or "").strip().upper()
        row["sex"] = sex if sex in ("M", "F", "O") else None
        row["age_band"] = _age_band_of(header, options)
        row["patient_size_m"] = size_band(policy_float(header, "PatientSize", options))
        row["patient_weight_kg"] = weight_band(policy_float(header, "PatientWeight", options))

    if options.retain_device_identity:
        row["manufacturer"] = vendor_term(policy_text(header, "Manufacturer", options), terms)
        row["model"] = model_term(policy_text(header, "ManufacturerModelName", options), terms)

    if options.longitudinal_dates:
        study_date = _parse_date(policy_text(header, "StudyDate", options))
        if study_date is not None:
            shifted = study_date + _dt.timedelta(days=key.date_offset_days(patient))
            row["study_date_shifted"] = shifted.isoformat()
    for name in _VOCABULARY_FIELDS:
        # The vocabularies hold no such value, and a site's list none either (SiteTerms refuses
        # them): a last guard, should either change.
        if looks_identifying(row[name], capitalized_names=False) is not None:
            row[name] = OTHER
    return row


_AGE_BAND_LABEL = re.compile(r"0|1-9|[1-8]0-[1-8]9|90\+")
_SIZE_BAND_LABEL = re.compile(r"\d\.\d0-\d\.\d9|2\.20\+")
_WEIGHT_BAND_LABEL = re.compile(r"2-9|\d{2,3}-\d{2,3}|250\+")
_SHIFTED_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PSEUDONYM = re.compile(r"p-[0-9a-f]{8,64}")


def kept_value(name: str, value: object, terms: SiteTerms = NO_SITE_TERMS) -> object:
    """A value of the case-table column ``name`` as :func:`case_metadata` keeps it now.

    For checking a stored table again before it leaves the site (an index built by an older
    medsearch, or edited): a vocabulary term or band stays as it is; any other text maps to its term
    (``"GE MEDICAL SYSTEMS"`` -> ``"GE"``) or to ``"OTHER"``, a number of size or weight to its band,
    and anything malformed to ``None``. Columns that are not metadata are returned as they are.

    Examples
    --------
    >>> kept_value("manufacturer", "Dr Quorbelle Imaging"), kept_value("body_part", "QUORBELLE")
    ('OTHER', 'OTHER')
    >>> kept_value("patient_weight_kg", 2.2), kept_value("patient_size_m", "1.80-1.89"), kept_value("sex", "Male")
    ('2-9', '1.80-1.89', None)
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if name not in CASE_FIELDS:
        return value
    if name in ("patient_size_m", "patient_weight_kg"):
        label, band = (_SIZE_BAND_LABEL, size_band) if name == "patient_size_m" else (_WEIGHT_BAND_LABEL, weight_band)
        if isinstance(value, str) and label.fullmatch(value):
            return value
        try:
            return band(float(str(value)))
        except ValueError:
            return None
    text = str(value)
    checks: dict[str, Callable[[str], object]] = {
        "modality": modality_term,
        "photometric": photometric_term,
        "body_part": lambda t: body_part_term(t, terms),
        "manufacturer": lambda t: vendor_term(t, terms),
        "model": lambda t: model_term(t, terms),
        "sex": lambda t: t if t in ("M", "F", "O") else None,
        "age_band": lambda t: t if _AGE_BAND_LABEL.fullmatch(t) else None,
        "study_date_shifted": lambda t: t if _SHIFTED_DATE.fullmatch(t) else None,
        "patient": lambda t: t if _PSEUDONYM.fullmatch(t) else None,
        "sop_class": lambda t: None if looks_identifying(t, capitalized_names=False) else t,
    }
    kept = checks[name](text)
    if name in _VOCABULARY_FIELDS and looks_identifying(kept, capitalized_names=False) is not None:
        return OTHER
    return kept


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
