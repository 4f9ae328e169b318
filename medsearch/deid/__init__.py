"""De-identification: the one place that decides what leaves a DICOM header.

medsearch keeps, for each case, a row of metadata beside its embedding. That row, and every id,
log line, message and report, must carry nothing that identifies a patient. The policy follows
DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile, with the options
:class:`DeidOptions` selects; where medsearch is stricter than the profile,
:data:`STRICTER_THAN_PROFILE` says where and why.

    profile.py     the policy as tables (ATTRIBUTE_ACTIONS, OPTION_ACTIONS), profile_action, DeidOptions
    keys.py        SiteKey: the secret behind every pseudonym, and its key file
    pseudonyms.py  case_id and patient_pseudonym, the keyed names of cases and patients
    metadata.py    case_metadata, the case table row (CASE_METADATA_KEYS), age, size and weight bands
    vocabulary.py  the terms kept text comes from (body parts, vendors, models...), SiteTerms (the
                   site's own), looks_identifying (names, dates, UIDs, e-mail addresses)
    kanon.py       k-anonymity: groups of patients over the quasi-identifiers, and generalization
    reading.py     how a header is read: only kept attributes, or the few a pseudonym is derived from
"""

from __future__ import annotations

from medsearch.deid.kanon import QUASI_IDENTIFIERS, GroupMeasure, KAnonymityPlan, measure_groups, plan_generalization
from medsearch.deid.keys import SiteKey
from medsearch.deid.metadata import (
    CASE_FIELDS,
    CASE_METADATA_KEYS,
    DERIVED_FIELDS,
    age_band,
    case_metadata,
    kept_value,
    size_band,
    weight_band,
)
from medsearch.deid.profile import ATTRIBUTE_ACTIONS, OPTION_ACTIONS, STRICTER_THAN_PROFILE, DeidOptions, profile_action
from medsearch.deid.pseudonyms import case_id, patient_pseudonym
from medsearch.deid.vocabulary import NO_SITE_TERMS, OTHER, SiteTerms, looks_identifying

__all__ = [
    "ATTRIBUTE_ACTIONS",
    "CASE_FIELDS",
    "CASE_METADATA_KEYS",
    "DERIVED_FIELDS",
    "NO_SITE_TERMS",
    "OPTION_ACTIONS",
    "OTHER",
    "QUASI_IDENTIFIERS",
    "STRICTER_THAN_PROFILE",
    "DeidOptions",
    "GroupMeasure",
    "KAnonymityPlan",
    "SiteKey",
    "SiteTerms",
    "age_band",
    "case_id",
    "case_metadata",
    "kept_value",
    "looks_identifying",
    "measure_groups",
    "patient_pseudonym",
    "plan_generalization",
    "profile_action",
    "size_band",
    "weight_band",
]
