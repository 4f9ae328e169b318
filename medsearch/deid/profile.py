"""The de-identification policy as tables: DICOM PS3.15 Annex E and the options medsearch applies.

The policy follows the Basic Application Level Confidentiality Profile, with the Retain Patient
Characteristics, Retain Device Identity, Retain Longitudinal Temporal Information with Modified
Dates and Clean Descriptors options as :class:`DeidOptions` selects them. :data:`ATTRIBUTE_ACTIONS`
holds the action of each attribute medsearch lists under the Basic Profile alone,
:data:`OPTION_ACTIONS` what each option changes, and :data:`STRICTER_THAN_PROFILE` where medsearch
is stricter than the profile and why. :func:`profile_action` reads the tables for one attribute.

Action codes are those of PS3.15 Table E.1-1: ``X`` remove, ``Z`` zero length, ``D`` dummy value,
``K`` keep, ``C`` clean, ``U`` replace UID. In the case table, any action other than ``K`` or ``C``
means the value never leaves the header.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pydicom.datadict import keyword_for_tag, tag_for_keyword

__all__ = [
    "ATTRIBUTE_ACTIONS",
    "OPTION_ACTIONS",
    "STRICTER_THAN_PROFILE",
    "DeidOptions",
    "is_keyword",
    "profile_action",
]


@dataclass(frozen=True)
class DeidOptions:
    """Which PS3.15 Annex E options apply on top of the Basic Profile.

    Attributes
    ----------
    retain_device_identity
        Keep manufacturer and model name (Retain Device Identity Option), as terms of the vendor and
        model vocabularies. Serial numbers, station names and other ids of one machine are never kept.
    retain_patient_characteristics
        Keep sex, an age band, and size and weight in bands (Retain Patient Characteristics
        Option).
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
    "PatientSize": "X",  # (0010,1020) X; K with Retain Patient Characteristics (we band it: C)
    "PatientWeight": "X",  # (0010,1030) X; K with Retain Patient Characteristics (we band it: C)
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
    "BodyPartExamined": "C",  # (0018,0015) not in E.1-1 (K); kept only as a defined term
}

# What each option of DeidOptions changes, keyed by the option's field name. Attributes the profile
# would let an option keep but medsearch does not are absent: they stay as ATTRIBUTE_ACTIONS says.
OPTION_ACTIONS: dict[str, dict[str, str]] = {
    "retain_device_identity": {
        "Manufacturer": "C",  # make of the device, as a vendor of the vocabulary
        "ManufacturerModelName": "C",  # model of the device, as a model of the vocabulary
    },
    "retain_patient_characteristics": {
        "PatientSex": "K",  # M, F or O only
        "PatientAge": "C",  # decade band, 90 and over pooled
        "PatientSize": "C",  # a 10 cm band
        "PatientWeight": "C",  # a 10 kg band
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
    "Manufacturer": "device identity: kept only with retain_device_identity, as a vendor of the vocabulary",
    "ManufacturerModelName": "device identity: kept only with retain_device_identity, as a known model",
    "BodyPartExamined": "kept only as a Body Part Examined defined term (or the site's), else OTHER",
    "PatientAge": "kept only as a decade band; ages of 90 and over are pooled",
    "PatientSize": "kept only as a 10 cm band from 0.4 m, 2.2 m and over pooled",
    "PatientWeight": "kept only as a 10 kg band from 2 kg, 250 kg and over pooled",
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


def is_keyword(name: str) -> bool:
    """Whether ``name`` is a DICOM keyword pydicom knows (``"PatientName"``)."""
    # tag_for_keyword("") finds a retired element whose keyword is empty; round-trip instead.
    tag = tag_for_keyword(name) if name else None
    return tag is not None and keyword_for_tag(tag) == name


def _add_tag_keys(table: dict[tuple[int, int] | str, str]) -> None:
    """Let the table be looked up by (group, element) as well as by keyword."""
    for keyword, action in list(table.items()):
        tag = tag_for_keyword(str(keyword)) if is_keyword(str(keyword)) else None
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
    elif isinstance(keyword, str) and is_keyword(keyword):
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
