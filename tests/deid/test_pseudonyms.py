"""Tests of medsearch.deid.pseudonyms: the keyed ids of cases and patients."""

from __future__ import annotations

import pytest
from deid.headers import LEAK_NAME, _synthetic_header
from pydicom.dataset import Dataset

from medsearch.deid import case_id, patient_pseudonym
from medsearch.errors import InvalidStudyError

# Several cases set invalid values on purpose; pydicom warns about each as it is set.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
]


def test_case_id(key):
    base = case_id(key, "1.2.3", "1.2.3.4")
    assert base.startswith("c-")
    assert case_id(key, "1.2.3", "1.2.3.4", part="1") != base
    assert case_id(key, "1.2.3 ", "1.2.3.4\x00") == base  # DICOM padding is not part of a UID
    assert case_id(key, "1.2.3", "1.2.3.5") != base


@pytest.mark.parametrize(("study", "series"), [("", "1.2"), ("1.2", ""), (" ", "1.2")])
def test_case_id_needs_both_uids(key, study, series):
    with pytest.raises(InvalidStudyError, match="needs a StudyInstanceUID and a SeriesInstanceUID"):
        case_id(key, study, series)


def test_patient_pseudonym(key):
    header = _synthetic_header()
    first = patient_pseudonym(key, header)
    assert first.startswith("p-")

    other_issuer = _synthetic_header()
    other_issuer.IssuerOfPatientID = "ANOTHER-HOSPITAL"
    assert patient_pseudonym(key, other_issuer) != first

    no_id = _synthetic_header()
    no_id.PatientID = ""
    fallback = patient_pseudonym(key, no_id)
    assert fallback.startswith("p-") and fallback != first
    # A patient whose ID is some study's UID must not share that study's fallback pseudonym.
    uid_as_id = _synthetic_header()
    uid_as_id.PatientID = no_id.StudyInstanceUID
    uid_as_id.IssuerOfPatientID = ""
    assert patient_pseudonym(key, uid_as_id) != fallback


def test_patient_pseudonym_needs_an_id_or_a_study(key):
    header = Dataset()
    header.PatientName = LEAK_NAME
    header.PatientID = ""
    with pytest.raises(
        InvalidStudyError, match="neither a PatientID nor a StudyInstanceUID"
    ) as info:
        patient_pseudonym(key, header)
    assert "Zzyzx" not in str(info.value)
