"""Keyed pseudonyms of cases and patients: what stands in for their DICOM identifiers.

:func:`case_id` names a case (a series, or a part of one) from its study and series UIDs;
:func:`patient_pseudonym` names a patient from PatientID and IssuerOfPatientID, or from the
StudyInstanceUID when there is no PatientID. Both are HMACs under the :class:`SiteKey`.
"""

from __future__ import annotations

import pydicom

from medsearch.deid.keys import SiteKey
from medsearch.deid.reading import clean_uid, derivation_text
from medsearch.errors import InvalidStudyError

__all__ = ["case_id", "patient_pseudonym"]


def case_id(key: SiteKey, study_uid: str, series_uid: str, part: str = "") -> str:
    """Return the pseudonymous id of a case (a series, or a part of one): ``"c-..."``.

    Raises
    ------
    InvalidStudyError
        If the study or series UID is empty: cases without them would share one id.
    """
    study_uid, series_uid = clean_uid(study_uid), clean_uid(series_uid)
    if not study_uid or not series_uid:
        raise InvalidStudyError(
            "A case needs a StudyInstanceUID and a SeriesInstanceUID to get an id; "
            "check the files of this series"
        )
    return key.pseudonym(study_uid, series_uid, part, kind="case")


def patient_pseudonym(key: SiteKey, header: pydicom.Dataset) -> str:
    """Return the keyed pseudonym of the patient of ``header``: ``"p-..."``.

    Made from PatientID and IssuerOfPatientID; when PatientID is empty, from StudyInstanceUID
    (each study then counts as its own patient, which is the safe mistake).

    Raises
    ------
    InvalidStudyError
        If the header has neither a PatientID nor a StudyInstanceUID.
    """
    patient_id = derivation_text(header, "PatientID")
    if patient_id:
        issuer = derivation_text(header, "IssuerOfPatientID") or ""
        return key.pseudonym("id", issuer, patient_id, kind="patient")
    study_uid = clean_uid(derivation_text(header, "StudyInstanceUID") or "")
    if study_uid:
        return key.pseudonym("study", study_uid, kind="patient")
    raise InvalidStudyError(
        "A header has neither a PatientID nor a StudyInstanceUID, so no patient pseudonym can be "
        "made; check the files of this series"
    )

