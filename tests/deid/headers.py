"""Values the deid tests share: the fixed test keys, the options with every option off, and a header
seeded with identifying values in every place they hide."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from medsearch.deid import DeidOptions

KEY_HEX = "5e" * 16 + "a7" * 16  # a fixed test key: results do not change between runs
OTHER_KEY_HEX = "c3" * 32

_NONE = DeidOptions(
    retain_device_identity=False,
    retain_patient_characteristics=False,
    longitudinal_dates=False,
    clean_descriptors=False,
)

# Seeded into the synthetic header; it may appear in no case_metadata output (see SECRETS).
LEAK_NAME = "Zzyzx^Leakcheck"


def _synthetic_header() -> Dataset:
    """A CT header seeded with distinctive identifying values in every place they hide."""
    ds = Dataset()
    ds.PatientName = LEAK_NAME
    ds.PatientID = "LEAK-ID-9931"
    ds.IssuerOfPatientID = "LEAK-ISSUER-Q"
    ds.OtherPatientIDs = "LEAK-ID-9931-B"
    ds.PatientBirthDate = "19530316"
    ds.PatientAddress = "17 Quxley Lane, Leakcheck Town"
    ds.PatientSex = "M"
    ds.PatientAge = "069Y"
    ds.PatientSize = "1.83"
    ds.PatientWeight = "81.7"
    ds.EthnicGroup = "Leakcheck"
    ds.StudyDate = "20230315"
    ds.StudyTime = "101502"
    ds.SeriesDate = "20230316"
    ds.ContentDate = "20230316"
    ds.AcquisitionDateTime = "20230316101502"
    ds.AccessionNumber = "ACC-LEAK-5521"
    ds.StudyID = "SID-LEAK-88"
    ds.InstitutionName = "Leakcheck Memorial Hospital"
    ds.InstitutionAddress = "17 Quxley Lane"
    ds.InstitutionalDepartmentName = "Leakcheck Radiology"
    ds.ReferringPhysicianName = "Quxley^Refdoc"
    ds.PerformingPhysicianName = "Wobbleton^Perf"
    ds.OperatorsName = "Frobisher^Op"
    ds.PhysiciansOfRecord = "Quxley^Record"
    ds.StationName = "LEAKSTATION01"
    ds.DeviceSerialNumber = "SN-LEAK-77321"
    ds.StudyDescription = "CT CHEST for Zzyzx Leakcheck"
    ds.SeriesDescription = "AX 5mm Leakcheck"
    ds.ProtocolName = "Leakcheck protocol CHEST"
    ds.ImageComments = "Patient Zzyzx asked for Dr Quxley"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.101"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.102"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.103"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.104"
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "ACME MEDICAL"
    ds.ManufacturerModelName = "Scanotron 9000"
    ds.PhotometricInterpretation = "MONOCHROME2"
    block = ds.private_block(0x0009, "LEAKCHECK CREATOR", create=True)
    block.add_new(0x10, "LO", "Zzyzx^Private")
    item = Dataset()
    item.PatientName = "Zzyzx^Nested"
    item.RequestedProcedureDescription = "Nested request for Leakcheck"
    ds.RequestAttributesSequence = Sequence([item])
    return ds
