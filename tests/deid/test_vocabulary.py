"""Tests of medsearch.deid.vocabulary: kept text comes from vocabularies, never from free text."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLE
from deid.headers import _synthetic_header

from medsearch.config import load_config
from medsearch.deid import OTHER, SiteTerms, case_metadata, looks_identifying
from medsearch.deid.vocabulary import (
    BODY_PARTS,
    MODALITIES,
    MODELS,
    PHOTOMETRIC_INTERPRETATIONS,
    VENDORS,
    body_part_term,
    modality_term,
    model_term,
    photometric_term,
    vendor_term,
)
from medsearch.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Tables of cases
# --------------------------------------------------------------------------------------------

# Manufacturer values as real headers write them (pydicom's test files, ../shared/data, vendors'
# conformance statements) -> the vendor kept.
VENDOR_CASES = [
    ("GE MEDICAL SYSTEMS", "GE"),
    ("GE Medical Systems", "GE"),
    ("G.E. Medical Systems", "GE"),
    ("GE Healthcare", "GE"),
    ("GE OEC Medical Systems", "GE"),
    ("SIEMENS", "Siemens"),
    ("Siemens HealthCare GmbH", "Siemens"),
    ("Siemens Healthineers", "Siemens"),
    ("Philips Medical Systems", "Philips"),
    ("Philips Medical Systems, Inc.", "Philips"),
    ("Philips", "Philips"),
    ("TOSHIBA", "Canon/Toshiba"),
    ("TOSHIBA_MEC", "Canon/Toshiba"),
    ("CANON_MEC", "Canon/Toshiba"),
    ("Canon Medical Systems", "Canon/Toshiba"),
    ("FUJI PHOTO FILM CO. LTD.", "Fujifilm"),
    ("FUJIFILM Corporation", "Fujifilm"),
    ("Agfa-Gevaert AG", "Agfa"),
    ("AGFA", "Agfa"),
    ("HOLOGIC, Inc.", "Hologic"),
    ("Carestream Health", "Carestream"),
    ("KODAK", "Carestream"),
    ("SAMSUNG MEDISON CO., LTD.", "Samsung"),
    ("Hitachi Medical Corporation", "Hitachi"),
    ("ALOKA CO., LTD.", "Hitachi"),
    ("KONICA MINOLTA", "Konica Minolta"),
    ("  siemens   ", "Siemens"),
    # not a vendor of the vocabulary
    ("Dr Quorbelle Imaging", OTHER),
    ("Acme Medical Devices", OTHER),
    ("GEMINI", OTHER),  # a word that starts with GE is not GE
    ("Doe^Jane", OTHER),
    ("", None),
    ("   ", None),
    (None, None),
]

BODY_PART_TERM_CASES = [
    ("CHEST", "CHEST"),
    ("chest", "CHEST"),
    ("C-SPINE", "CSPINE"),
    ("ABDOMEN_PELVIS", "ABDOMENPELVIS"),
    ("Whole Body", "WHOLEBODY"),
    ("THORAX", "CHEST"),
    ("LUNGS", "LUNG"),
    ("QUORBELLE", OTHER),
    ("SMITH", OTHER),
    ("DR QUORBELLE", OTHER),
    ("19530316", OTHER),
    ("", None),
    (None, None),
]

MODEL_CASES = [
    ("Discovery STE", "Discovery STE"),
    ("LightSpeed Ultra", "LightSpeed Ultra"),
    ("Sensation 16", "Sensation 16"),
    ("SOMATOM PLUS 4", "SOMATOM PLUS 4"),  # spelled as the header spells it, when the vocabulary has it
    ("sensation  16", "Sensation 16"),  # case and spaces aside
    ("Dr Quorbelle Imaging", OTHER),
    ("Scanotron 9000", OTHER),
    ("", None),
]

# (text, what it looks like)
IDENTIFYING_CASES = [
    ("Doe^Jane", "a person name"),
    ("DOE^JANE^^DR", "a person name"),
    ("Dr Quorbelle Imaging", "a person name"),
    ("Dr. Quorbelle", "a person name"),
    ("DR QUORBELLE", "a person name"),
    ("Prof Leakwell", "a person name"),
    ("Jane Doe", "a person name"),
    ("Mary Ann Smith", "a person name"),
    ("20190417", "a date"),
    ("scan of 2019-04-17", "a date"),
    ("17/04/2019", "a date"),
    ("04.17.2019", "a date"),
    ("1.2.840.113619.2.55.3.604688119", "a UID"),
    ("uid 1.2.826.0.1.3680043.8.498.101 here", "a UID"),
    ("someone@hospital.org", "an e-mail address"),
    # not identifying
    ("CHEST", None),
    ("Sensation 16", None),
    ("Emotion Duo", None),
    ("Acme Medical", None),  # a maker's word
    ("Lung Nodule", None),
    ("Ground Glass", None),
    ("MR Head", None),  # a modality, not a title
    ("TR 500 ms", None),
    ("60-69", None),
    ("5x0.977x0.977", None),
    ("ID_0000_AGE_0060_CONTRAST_1_CT.dcm", None),
    ("123456789", None),
    ("2.2", None),
    ("True", None),
    (True, None),
    (60, None),
    (None, None),
]


def _headers(paths: list[Path]) -> list[pydicom.Dataset]:
    out = []
    for path in paths:
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
    return out


# --------------------------------------------------------------------------------------------
# Terms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), VENDOR_CASES)
def test_vendor_term(value, expected):
    assert vendor_term(value) == expected


@pytest.mark.parametrize(("value", "expected"), BODY_PART_TERM_CASES)
def test_body_part_term(value, expected):
    assert body_part_term(value) == expected


@pytest.mark.parametrize(("value", "expected"), MODEL_CASES)
def test_model_term(value, expected):
    assert model_term(value) == expected


def test_terms_map_onto_themselves():
    """A kept value checked again (an export) stays as it is."""
    assert all(vendor_term(v) == v for v in VENDORS)
    assert all(model_term(m) == m for m in MODELS)
    assert all(body_part_term(b) == b for b in BODY_PARTS)
    assert all(modality_term(m) == m for m in MODALITIES)
    assert all(photometric_term(p) == p for p in PHOTOMETRIC_INTERPRETATIONS)
    assert [f(OTHER) for f in (vendor_term, model_term, body_part_term)] == [OTHER] * 3


def test_no_term_of_the_vocabularies_looks_identifying():
    terms = [*BODY_PARTS, *VENDORS, *MODELS, *MODALITIES, *PHOTOMETRIC_INTERPRETATIONS, OTHER]
    assert [t for t in terms if looks_identifying(t)] == []


def test_the_shipped_samples_keep_their_device_names():
    headers = _headers(sorted((SAMPLE / "tcga-luad-ct").glob("*.dcm")))
    assert headers
    for header in headers:
        assert model_term(header.ManufacturerModelName) == header.ManufacturerModelName
        assert vendor_term(header.Manufacturer) != OTHER
        assert body_part_term(header.BodyPartExamined) == header.BodyPartExamined


def test_the_shared_sets_keep_their_device_names(shared_dicom):
    headers = _headers([p for p in sorted(shared_dicom.rglob("*")) if p.is_file() and p.name != "LICENSE"])
    named = [h for h in headers if h.get("ManufacturerModelName")]
    assert len(named) > 100
    models = {str(h.ManufacturerModelName) for h in named}
    assert {"Discovery STE", "LightSpeed Ultra", "Sensation 16"} <= models
    assert {m for m in models if model_term(m) != m} == set()
    assert {str(h.Manufacturer) for h in named if vendor_term(str(h.Manufacturer)) == OTHER} == set()
    parts = {str(h.BodyPartExamined) for h in headers if h.get("BodyPartExamined")}
    assert {p for p in parts if body_part_term(p) == OTHER} == set()


def test_modality_and_photometric_terms():
    assert [modality_term(v) for v in ("CT", " mr ", "QUORBELLE", "", None)] == ["CT", "MR", "OT", None, None]
    assert [photometric_term(v) for v in ("MONOCHROME2", "palette color", "QUORBELLE")] == [
        "MONOCHROME2",
        "PALETTE COLOR",
        None,
    ]


# --------------------------------------------------------------------------------------------
# Values that look identifying
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), IDENTIFYING_CASES)
def test_looks_identifying(text, expected):
    assert looks_identifying(text) == expected


def test_capitalized_words_can_be_left_to_the_site():
    assert looks_identifying("Zorbax Quimby") == "a person name"
    assert looks_identifying("Zorbax Quimby", capitalized_names=False) is None
    assert looks_identifying("Doe^Jane", capitalized_names=False) == "a person name"


# --------------------------------------------------------------------------------------------
# The site's terms
# --------------------------------------------------------------------------------------------


def test_site_terms_are_kept_as_the_site_spells_them(key):
    terms = SiteTerms(body_parts=("leftlung",), manufacturers=("Acme Medical",), models=("Scanotron 9000",))
    assert terms.body_parts == ("LEFTLUNG",)
    header = _synthetic_header()  # ACME MEDICAL, Scanotron 9000
    header.BodyPartExamined = "LEFTLUNG"
    row = case_metadata(header, key=key, terms=terms)
    assert (row["manufacturer"], row["model"], row["body_part"]) == ("Acme Medical", "Scanotron 9000", "LEFTLUNG")
    plain = case_metadata(header, key=key)
    assert (plain["manufacturer"], plain["model"], plain["body_part"]) == (OTHER, OTHER, OTHER)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"manufacturers": ("Dr Quorbelle Imaging",)}, r"\[deid\] manufacturers: an entry looks like a person name"),
        ({"models": ("Doe^Jane",)}, "looks like a person name"),
        ({"models": ("built 20190417",)}, "looks like a date"),
        ({"models": ("1.2.840.113619.2.55.3",)}, "looks like a UID"),
        ({"manufacturers": ("x@y.org",)}, "looks like an e-mail address"),
        ({"body_parts": ("LEFT-LUNG",)}, "codes of up to 16 upper-case letters"),
        ({"body_parts": ("A" * 17,)}, "codes of up to 16"),
        ({"models": ("",)}, "1 to 64 printable ASCII characters"),
        ({"models": ("x" * 65,)}, "1 to 64 printable ASCII characters"),
        ({"models": ("Scan\x1b[31m",)}, "printable ASCII"),
        ({"models": (5,)}, "every entry must be text"),
        ({"models": "Scanotron"}, "must be a list of text entries"),
    ],
)
def test_site_terms_refuse_what_could_identify(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SiteTerms(**kwargs)


def test_site_terms_come_from_the_deid_section_of_a_config(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[deid]\nmanufacturers = ["Acme Medical"]\nmodels = ["Scanotron 9000"]\nbody_parts = ["LEFTLUNG"]\n')
    config = load_config(path)
    assert config.deid.manufacturers == ("Acme Medical",)
    assert config.to_dict()["deid"]["models"] == ["Scanotron 9000"]  # recorded in the index manifest
    assert SiteTerms(**asdict(config.deid)).model("scanotron 9000") == "Scanotron 9000"
    assert load_config("default").deid == load_config("default").deid.__class__()
    path.write_text('[deid]\nmodels = "Scanotron"\n')
    with pytest.raises(ConfigError, match="deid.models must be a list of text entries"):
        load_config(path)
    path.write_text('[deid]\nscanners = ["x"]\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[deid\]: scanners"):
        load_config(path)
