"""The vocabularies the kept text fields come from, and the check for values that look identifying.

A kept text field of the case table is never free text from a header: it is a term of one of these
vocabularies, or a term the site allow-lists (:class:`SiteTerms`), or ``"OTHER"``:

* body part: the Body Part Examined defined terms (PS3.3 C.7.3.1, PS3.16 Annex L, CID 4031),
  :data:`BODY_PARTS`, with a few common spellings (:func:`body_part_term`);
* manufacturer: a vendor name of :data:`VENDORS`, whatever the header's spelling of it
  (``"GE MEDICAL SYSTEMS"`` and ``"G.E. Medical Systems"`` are both ``"GE"``; :func:`vendor_term`);
* model: a scanner model of :data:`MODELS`, as spelled there (:func:`model_term`);
* modality and photometric interpretation: the DICOM defined terms (:data:`MODALITIES`,
  :data:`PHOTOMETRIC_INTERPRETATIONS`).

:func:`looks_identifying` says whether a text looks like a person name, a date, a UID or an e-mail
address. No such value passes into a kept field, an allow-list (:class:`SiteTerms` refuses it) or,
at export, a label column.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from medsearch.errors import ConfigError

__all__ = [
    "BODY_PARTS",
    "MODALITIES",
    "MODELS",
    "NO_SITE_TERMS",
    "OTHER",
    "PHOTOMETRIC_INTERPRETATIONS",
    "VENDORS",
    "SiteTerms",
    "body_part_term",
    "looks_identifying",
    "modality_term",
    "model_term",
    "photometric_term",
    "vendor_term",
]

#: What a kept field holds when the header has a value that is in no vocabulary.
OTHER = "OTHER"

# --------------------------------------------------------------------------------------------
# Body parts: the Body Part Examined defined terms (PS3.16 Annex L, "Correspondence of Anatomic
# Region Codes and Body Part Examined Defined Terms", the CS values of the regions of CID 4031).
# --------------------------------------------------------------------------------------------

# fmt: off
BODY_PARTS: frozenset[str] = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "ACJOINT", "ADRENAL", "AMNIOTICFLUID", "ANKLE", "ANUS", "AORTA",
    "APPENDIX", "ARM", "AXILLA", "BACK", "BILEDUCT", "BLADDER", "BRAIN", "BRAINSTEM", "BREAST",
    "BRONCHUS", "BUTTOCK", "CALCANEUS", "CALF", "CAROTID", "CEREBELLUM", "CERVIX", "CHEEK",
    "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "CIRCLEOFWILLIS", "CLAVICLE", "COCCYX", "COLON",
    "CORNEA", "CORONARYARTERY", "CSPINE", "CTSPINE", "DUODENUM", "EAR", "ELBOW", "ESOPHAGUS",
    "EXTREMITY", "EYE", "EYELID", "FACE", "FEMUR", "FINGER", "FOOT", "FOREARM", "GALLBLADDER",
    "HAND", "HEAD", "HEADNECK", "HEART", "HIP", "HUMERUS", "IAC", "ILEUM", "ILIUM", "JAW",
    "JEJUNUM", "KIDNEY", "KNEE", "LARYNX", "LEG", "LIVER", "LSPINE", "LSSPINE", "LUNG", "MAXILLA",
    "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE",
    "ORBIT", "OVARY", "PANCREAS", "PAROTID", "PATELLA", "PELVIS", "PENIS", "PHARYNX", "PROSTATE",
    "RECTUM", "RIB", "SACRUM", "SCAPULA", "SCLERA", "SCROTUM", "SELLA", "SHOULDER", "SKULL",
    "SPINE", "SPLEEN", "SSPINE", "STERNUM", "STOMACH", "SUBMANDIBULAR", "TESTIS", "THIGH",
    "THUMB", "THYMUS", "THYROID", "TIBIA", "TLSPINE", "TMJ", "TOE", "TONGUE", "TRACHEA", "TSPINE",
    "URETER", "URETHRA", "UTERUS", "VAGINA", "VULVA", "WHOLEBODY", "WRIST", "ZYGOMA",
})
# fmt: on
# Words of headers and descriptions that mean one of the terms.
_BODY_PART_SYNONYMS = {
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
    "MAMMA": "BREAST",
    "WHOLE BODY": "WHOLEBODY",
    "CERVICAL SPINE": "CSPINE",
    "THORACIC SPINE": "TSPINE",
    "LUMBAR SPINE": "LSPINE",
}
# Several regions named together: the combined term, where the vocabulary has one.
_COMBINED = {
    frozenset({"CHEST", "ABDOMEN"}): "CHESTABDOMEN",
    frozenset({"ABDOMEN", "PELVIS"}): "ABDOMENPELVIS",
    frozenset({"CHEST", "ABDOMEN", "PELVIS"}): "CHESTABDPELVIS",
    frozenset({"HEAD", "NECK"}): "HEADNECK",
    frozenset({"NECK", "CHEST"}): "NECKCHEST",
    frozenset({"NECK", "CHEST", "ABDOMEN"}): "NECKCHESTABDOMEN",
    frozenset({"NECK", "CHEST", "ABDOMEN", "PELVIS"}): "NECKCHESTABDPELV",
}

# --------------------------------------------------------------------------------------------
# Modality (PS3.3 C.7.3.1.1.1, current and retired defined terms) and photometric interpretation
# (PS3.3 C.7.6.3.1.2).
# --------------------------------------------------------------------------------------------

# fmt: off
MODALITIES: frozenset[str] = frozenset({
    "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DMS", "DG",
    "DOC", "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL",
    "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "M3D", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM",
    "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG",
    "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD",
    "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG",
    "US", "VA", "XA", "XAPROTOCOL", "XC",
    # retired
    "AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS",
    "OPR", "ST", "VF",
})
PHOTOMETRIC_INTERPRETATIONS: frozenset[str] = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
    # retired
    "ARGB", "CMYK", "HSV", "YBR_PARTIAL_422",
})
# fmt: on

# --------------------------------------------------------------------------------------------
# Vendors: the name kept, and how headers spell it (the first words of the Manufacturer value,
# letters and digits only, upper case). Makers taken over by another keep their own name where
# their equipment is still in use under it; Toshiba's imaging became Canon's.
# --------------------------------------------------------------------------------------------

VENDORS: dict[str, tuple[str, ...]] = {
    "GE": ("GE", "G E", "GEMS", "GENERAL ELECTRIC"),
    "Siemens": ("SIEMENS",),
    "Philips": ("PHILIPS", "ADAC", "MARCONI", "PICKER"),
    "Canon/Toshiba": ("CANON", "TOSHIBA"),
    "Fujifilm": ("FUJIFILM", "FUJI", "SONOSITE"),
    "Agfa": ("AGFA",),
    "Hologic": ("HOLOGIC", "LORAD"),
    "Carestream": ("CARESTREAM", "KODAK"),
    "Samsung": ("SAMSUNG",),
    "Hitachi": ("HITACHI", "ALOKA"),
    "Konica Minolta": ("KONICA",),
    "United Imaging": ("UNITED IMAGING", "UIH", "SHANGHAI UNITED IMAGING"),
    "Neusoft": ("NEUSOFT",),
    "Shimadzu": ("SHIMADZU",),
    "Esaote": ("ESAOTE",),
    "Mindray": ("MINDRAY",),
    "Elscint": ("ELSCINT",),
    "Imatron": ("IMATRON",),
    "Varian": ("VARIAN",),
    "Elekta": ("ELEKTA",),
    "Accuray": ("ACCURAY",),
    "Bruker": ("BRUKER",),
    "Planmeca": ("PLANMECA",),
    "Sirona": ("SIRONA", "DENTSPLY SIRONA"),
    "Vatech": ("VATECH",),
    "Ziehm": ("ZIEHM",),
    "Mediso": ("MEDISO",),
    "Digirad": ("DIGIRAD",),
    "Spectrum Dynamics": ("SPECTRUM DYNAMICS",),
    "Mortara": ("MORTARA",),
    "Swissray": ("SWISSRAY",),
    "iCAD": ("ICAD",),
    "Analogic": ("ANALOGIC",),
    "Medtronic": ("MEDTRONIC",),
    "Carl Zeiss": ("CARL ZEISS", "ZEISS"),
    "Topcon": ("TOPCON",),
    "Heidelberg Engineering": ("HEIDELBERG ENGINEERING",),
    "Leica": ("LEICA",),
    "Hamamatsu": ("HAMAMATSU",),
    "Aperio": ("APERIO",),
    "Ventana": ("VENTANA",),
}

# --------------------------------------------------------------------------------------------
# Scanner models, as their makers spell them (and as headers write them).
# --------------------------------------------------------------------------------------------

# fmt: off
MODELS: frozenset[str] = frozenset({
    # GE
    "Discovery ST", "Discovery STE", "Discovery LS", "Discovery RX", "Discovery 600",
    "Discovery 610", "Discovery 690", "Discovery 710", "Discovery MI", "Discovery CT750 HD",
    "Discovery CT590 RT", "Discovery MR450", "Discovery MR750", "Discovery MR750w",
    "Discovery NM/CT 670", "HiSpeed", "HiSpeed CT/i", "HiSpeed Dual", "HiSpeed LX/i",
    "HiSpeed QX/i", "HiSpeed NX/i", "HiSpeed FX/i", "LightSpeed Plus", "LightSpeed QX/i",
    "LightSpeed Ultra", "LightSpeed Pro 16", "LightSpeed Pro 32", "LightSpeed VCT",
    "LightSpeed RT", "LightSpeed RT16", "LightSpeed16", "LightSpeed 16", "LightSpeed4",
    "BrightSpeed", "Optima CT520", "Optima CT540", "Optima CT660", "Optima MR360", "Optima MR450w",
    "Revolution", "Revolution CT", "Revolution EVO", "Revolution HD", "Revolution Frontier",
    "Revolution Apex", "SIGNA Pioneer", "SIGNA Premier", "SIGNA Architect", "SIGNA Artist",
    "SIGNA Explorer", "SIGNA Creator", "SIGNA Voyager", "Signa HDxt", "Signa HDx", "SIGNA HDe",
    "SIGNA EXCITE", "Genesis_Signa", "GENESIS_SIGNA", "Signa Infinity", "Senographe DS",
    "Senographe Essential", "Senographe Pristina", "Senographe 2000D", "MILLENNIUM MG",
    "Infinia", "Discovery NM630", "Optima NM/CT 640", "LOGIQ 700", "LOGIQ E9", "LOGIQ E10",
    "LOGIQ S8", "Vivid E9", "Vivid E95", "Vivid 7", "Voluson E8", "Voluson E10",
    "Definium 8000", "Revolution XR/d", "Precision 500D", "Innova 2100", "Innova 3100",
    # Siemens
    "SOMATOM PLUS 4", "SOMATOM Plus 4", "SOMATOM Emotion", "SOMATOM Definition",
    "SOMATOM Definition AS", "SOMATOM Definition AS+", "SOMATOM Definition Flash",
    "SOMATOM Definition Edge", "SOMATOM Force", "SOMATOM Drive", "SOMATOM Perspective",
    "SOMATOM Scope", "SOMATOM go.Up", "SOMATOM go.Top", "SOMATOM X.cite", "SOMATOM Sensation 64",
    "Sensation 4", "Sensation 10", "Sensation 16", "Sensation 40", "Sensation 64",
    "Sensation Cardiac 64", "Sensation Open", "Volume Zoom", "Emotion", "Emotion 6",
    "Emotion 16", "Emotion Duo", "Definition", "Definition AS", "Definition AS+",
    "Definition Flash", "Definition Edge", "Biograph 6", "Biograph 16", "Biograph 40",
    "Biograph 64", "Biograph128", "Biograph mCT", "Biograph Vision", "Biograph_mMR",
    "Avanto", "Avanto_fit", "Aera", "Skyra", "Skyra_fit", "Prisma", "Prisma_fit", "Trio",
    "TrioTim", "Verio", "Espree", "Symphony", "SymphonyTim", "Sonata", "Harmony", "Impact",
    "Expert", "Vision", "Amira", "Sola", "Vida", "Spectra", "Altea", "Lumina", "Free.Max",
    "MAGNETOM Vida", "MAGNETOM Sola", "MAGNETOM Skyra", "MAGNETOM Prisma", "MAGNETOM Aera",
    "MAGNETOM Avanto", "MAGNETOM Verio", "MAGNETOM Trio", "MAGNETOM Altea", "MAGNETOM Lumina",
    "Mammomat Inspiration", "MAMMOMAT Inspiration", "MAMMOMAT Revelation", "Symbia T",
    "Symbia T2", "Symbia T6", "Symbia T16", "Symbia Intevo", "e.cam", "ACUSON S2000",
    "ACUSON S3000", "ACUSON Sequoia", "AXIOM Artis", "Artis zee", "Ysio", "Luminos dRF",
    # Philips
    "Brilliance 16", "Brilliance 40", "Brilliance 64", "Brilliance iCT", "Brilliance Big Bore",
    "iCT 256", "IQon - Spectral CT", "Ingenuity CT", "Ingenuity Core", "Ingenuity Core128",
    "Ingenuity TF", "Incisive CT", "Gemini TF", "Gemini GXL", "Mx8000", "Mx8000 IDT",
    "Mx8000 IDT 16", "Achieva", "Achieva dStream", "Ingenia", "Ingenia CX", "Ingenia Elition X",
    "Ingenia Ambition X", "Intera", "Gyroscan Intera", "Panorama", "Multiva", "Eclipse 1.5T",
    "Vereos", "iU22", "EPIQ 5G", "EPIQ 7G", "EPIQ 7C", "Affiniti 70", "CX50", "DigitalDiagnost",
    "MammoDiagnost", "Allura Xper", "Azurion",
    # Canon / Toshiba
    "Aquilion", "Aquilion ONE", "Aquilion PRIME", "Aquilion 16", "Aquilion 32", "Aquilion 64",
    "Aquilion Lightning", "Aquilion CX", "Aquilion LB", "Aquilion Precision", "Asteion",
    "Activion 16", "Alexion", "Galan 3T", "Vantage Galan 3T", "Vantage Titan", "Titan 3T",
    "Vantage Orian", "Vantage Elan", "Excelart Vantage", "MRT50H1", "Aplio 500", "Aplio i800",
    "Xario", "Infinix",
    # Fujifilm
    "FCR", "FCR CAPSULA", "FDR D-EVO", "FDR Smart X", "Amulet", "Amulet Innovality", "IRS",
    "FCR5000", "SonoSite Edge", "M-Turbo", "Turbo",
    # Agfa
    "ADC_5146", "ADC_5145", "ADC_5148", "CR 35-X", "CR 85-X", "DX-D 300", "DX-D 500", "DX-D 600",
    # Hologic
    "Selenia", "Selenia Dimensions", "Lorad Selenia", "3Dimensions", "Horizon", "Discovery A",
    "Discovery W",
    # Carestream / Kodak
    "DRX-1", "DRX-Evolution", "DRX-Revolution", "DRX-Ascend", "CR 975", "DirectView CR 975",
    # Samsung
    "GC85A", "GM85", "GF50", "RS80A", "RS85", "HS70A", "WS80A",
    # Hitachi / Aloka
    "Supria", "Scenaria", "ECHELON", "Echelon Oval", "Airis", "Oasis", "Aperto", "Eclos",
    "Presto", "SSD-4000", "ProSound Alpha 7",
    # Konica Minolta
    "REGIUS", "AeroDR", "CS-7",
    # United Imaging
    "uCT 760", "uCT 780", "uMR 570", "uMR 780", "uEXPLORER", "uMI 780",
    # Mortara
    "ELI 250", "el250",
})
# fmt: on

# Words of the vocabularies and of common label values: two capitalized words made of these are
# not a person name ("Lung Nodule", "Sensation Cardiac").
_COMMON_WORDS = frozenset({
    "abnormal", "absent", "acute", "adenocarcinoma", "anterior", "applied", "axial", "benign",
    "bilateral", "both", "cancer", "carcinoma", "case", "cell", "chronic", "class", "consolidation",
    "contrast", "control", "coronal", "corporation", "devices", "healthcare", "imaging",
    "instruments", "medical", "products", "scanner", "systems", "technologies", "cyst", "disease", "effusion", "emphysema", "enhanced",
    "false", "fibrosis", "fracture", "glass", "grade", "ground", "high", "inferior", "large",
    "left", "lesion", "lobe", "low", "lower", "malignant", "mass", "medium", "metastasis", "middle",
    "mild", "moderate", "negative", "no", "nodule", "none", "normal", "opacity", "other",
    "pleural", "pneumonia", "pneumothorax", "positive", "posterior", "present", "right",
    "sagittal", "severe", "small", "squamous", "stage", "superior", "test", "train", "true",
    "tumor", "tumour", "type", "unknown", "upper", "validation", "yes",
})


def _vocabulary_words() -> frozenset[str]:
    words: set[str] = set(_COMMON_WORDS)
    for text in (*BODY_PARTS, *_BODY_PART_SYNONYMS, *VENDORS, *MODELS):
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    for aliases in VENDORS.values():
        for alias in aliases:
            words.update(w.lower() for w in alias.split())
    return frozenset(words)


_KNOWN_WORDS = _vocabulary_words()

# --------------------------------------------------------------------------------------------
# Values that look identifying.
# --------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
# A DICOM UID or an OID: five or more dot-separated numbers.
_UID = re.compile(r"(?<![\d.])\d+(\.\d+){4,}(?![\d.])")
# Calendar dates: 19xx or 20xx with a valid month and day, as DICOM (YYYYMMDD), ISO and common
# written forms; a date inside a longer run of digits is not counted.
_YEAR = r"(?:19|20)\d{2}"
_MONTH = r"(?:0?[1-9]|1[0-2])"
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_DATES = [
    re.compile(rf"(?<!\d){_YEAR}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)"),
    re.compile(rf"(?<!\d){_YEAR}[-./]{_MONTH}[-./]{_DAY}(?!\d)"),
    re.compile(rf"(?<!\d){_DAY}[-./]{_MONTH}[-./]{_YEAR}(?!\d)"),
    re.compile(rf"(?<!\d){_MONTH}[-./]{_DAY}[-./]{_YEAR}(?!\d)"),
]
# DICOM PN: family^given^middle^prefix^suffix.
_PERSON_NAME_PN = re.compile(r"[^\W\d_][\w'.-]*\^|\^[^\W\d_]")
# A title before a capitalized word ("Dr Quorbelle"); case-sensitive, so that "MR Head" (a modality)
# and "5 ms" (a unit) are not titles.
_HONORIFIC = re.compile(r"(?<![\w.])(Dr|DR|Mr|Mrs|Ms|Miss|Mx|Prof|Professor|Sir|Dame)\.?\s+[A-Z]")
# Two or three capitalized words and nothing else ("Jane Doe", "Mary Ann Smith").
_CAPITALIZED_WORDS = re.compile(r"[A-Z][a-z'-]+(?:\s+[A-Z][a-z'-]+){1,2}")


def looks_identifying(text: object, *, capitalized_names: bool = True) -> str | None:
    """What ``text`` looks like if it could identify someone, else ``None``.

    ``"a person name"`` for a DICOM person name (``Doe^Jane``), a title and a word (``Dr Smith``)
    or, with ``capitalized_names``, two or three capitalized words none of which is a word of the
    vocabularies; ``"a date"``, ``"a UID"`` or ``"an e-mail address"`` for those anywhere in the text.

    Examples
    --------
    >>> [looks_identifying(t) for t in ("Doe^Jane", "Dr Quorbelle Imaging", "Jane Doe", "Lung Nodule")]
    ['a person name', 'a person name', 'a person name', None]
    >>> [looks_identifying(t) for t in ("20190417", "scan of 2019-04-17", "1.2.840.113619.2.55.3", "a@b.org")]
    ['a date', 'a date', 'a UID', 'an e-mail address']
    >>> [looks_identifying(t) for t in ("CHEST", "Sensation 16", "5x0.977x0.977", True, 73)]
    [None, None, None, None, None]
    """
    if not isinstance(text, str):
        return None
    found = _marked_identifying(text)
    if found is not None or not capitalized_names:
        return found
    stripped = " ".join(text.split())
    if _CAPITALIZED_WORDS.fullmatch(stripped):
        if not any(word.lower() in _KNOWN_WORDS for word in stripped.split()):
            return "a person name"
    return None


def _marked_identifying(text: str) -> str | None:
    """The unmistakable signs: a PN value, a title, a date, a UID, an e-mail address."""
    if _EMAIL.search(text):
        return "an e-mail address"
    if _UID.search(text):
        return "a UID"
    if any(pattern.search(text) for pattern in _DATES):
        return "a date"
    if _PERSON_NAME_PN.search(text) or _HONORIFIC.search(text):
        return "a person name"
    return None


# --------------------------------------------------------------------------------------------
# The site's own terms.
# --------------------------------------------------------------------------------------------

_TERM = re.compile(r"[ -~]{1,64}")


@dataclass(frozen=True)
class SiteTerms:
    """Terms a site adds to the vocabularies: body parts, manufacturers and models it keeps as written.

    An allow-listed manufacturer or model is kept with the spelling given here when a header's
    value matches it (case and runs of spaces aside); a body part must be a CS-like code (upper
    case letters, digits, spaces, ``_``). Configured as the ``[deid]`` section of a config file.

    Raises
    ------
    ConfigError
        A term is empty, longer than 64 characters, not printable ASCII, not a code (body parts), or
        looks like a person name, a date, a UID or an e-mail address.

    Examples
    --------
    >>> SiteTerms(manufacturers=("Acme Medical",)).manufacturer("ACME  MEDICAL")
    'Acme Medical'
    >>> SiteTerms(models=("Doe^Jane",))
    Traceback (most recent call last):
    ...
    medsearch.errors.ConfigError: [deid] models: an entry looks like a person name; allow-list only device and body-part terms
    """

    body_parts: tuple[str, ...] = ()
    manufacturers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("body_parts", "manufacturers", "models"):
            values = getattr(self, name)
            if isinstance(values, str) or not isinstance(values, Iterable):
                raise ConfigError(f"[deid] {name} must be a list of text entries")
            cleaned = tuple(_checked_term(name, value) for value in values)
            object.__setattr__(self, name, cleaned)

    def manufacturer(self, text: str) -> str | None:
        """The allow-listed manufacturer ``text`` names, as spelled in the list, or ``None``."""
        return _match(self.manufacturers, text)

    def model(self, text: str) -> str | None:
        """The allow-listed model ``text`` names, as spelled in the list, or ``None``."""
        return _match(self.models, text)

    def body_part(self, text: str) -> str | None:
        """The allow-listed body part ``text`` names, or ``None``."""
        return _match(self.body_parts, text)


NO_SITE_TERMS = SiteTerms()


def _checked_term(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"[deid] {name}: every entry must be text, got a {type(value).__name__}")
    text = " ".join(value.split())
    if not _TERM.fullmatch(text):
        raise ConfigError(f"[deid] {name}: entries must be 1 to 64 printable ASCII characters")
    if name == "body_parts":
        text = text.upper()
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", text):
            raise ConfigError(
                "[deid] body_parts: entries must be codes of up to 16 upper-case letters, digits, spaces or _, like CHEST"
            )
    # The site names its own devices here ("Acme Medical"): only the unmistakable signs are refused.
    what = looks_identifying(text, capitalized_names=False)
    if what is not None:
        raise ConfigError(f"[deid] {name}: an entry looks like {what}; allow-list only device and body-part terms")
    return text


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _match(terms: tuple[str, ...], text: str) -> str | None:
    wanted = _key(text)
    return next((term for term in terms if _key(term) == wanted), None)


# --------------------------------------------------------------------------------------------
# From a header value to a term.
# --------------------------------------------------------------------------------------------

# A header's spelling when the vocabulary has it exactly; else the first, in sorted order, of the
# spellings that differ from it only by case and spaces (the same on every run).
_MODEL_KEYS: dict[str, str] = {}
for _model in sorted(MODELS):
    _MODEL_KEYS.setdefault(_key(_model), _model)
# Longest aliases first, so that "GE OEC" is tried before "GE".
_VENDOR_ALIASES = sorted(
    ((alias, vendor) for vendor, aliases in VENDORS.items() for alias in aliases), key=lambda pair: -len(pair[0])
)


def _text(value: str | None) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def modality_term(value: str | None) -> str | None:
    """The Modality defined term ``value`` holds (``"ct"`` -> ``"CT"``), ``"OT"`` for any other value.

    Examples
    --------
    >>> modality_term(" mr "), modality_term("QUORBELLE"), modality_term("")
    ('MR', 'OT', None)
    """
    text = _text(value)
    if text is None:
        return None
    return text.upper() if text.upper() in MODALITIES else "OT"


def photometric_term(value: str | None) -> str | None:
    """The Photometric Interpretation defined term ``value`` holds, else ``None``."""
    text = _text(value)
    return text.upper() if text is not None and text.upper() in PHOTOMETRIC_INTERPRETATIONS else None


def vendor_term(value: str | None, terms: SiteTerms = NO_SITE_TERMS) -> str | None:
    """The vendor a Manufacturer value names, an allow-listed manufacturer, or ``"OTHER"``.

    Examples
    --------
    >>> [vendor_term(v) for v in ("GE MEDICAL SYSTEMS", "G.E. Medical Systems", "TOSHIBA_MEC", "SIEMENS")]
    ['GE', 'GE', 'Canon/Toshiba', 'Siemens']
    >>> vendor_term("Dr Quorbelle Imaging"), vendor_term("GENERIC"), vendor_term(" ")
    ('OTHER', 'OTHER', None)
    """
    text = _text(value)
    if text is None:
        return None
    allowed = terms.manufacturer(text)
    if allowed is not None:
        return allowed
    words = " ".join(re.sub(r"[^A-Z0-9]+", " ", text.upper()).split())
    for alias, vendor in _VENDOR_ALIASES:
        if words == alias or words.startswith(alias + " "):
            return vendor
    return OTHER


def model_term(value: str | None, terms: SiteTerms = NO_SITE_TERMS) -> str | None:
    """The scanner model a ManufacturerModelName value names, as :data:`MODELS` spells it, or an
    allow-listed model, or ``"OTHER"``.

    Examples
    --------
    >>> model_term("Discovery STE"), model_term("sensation  16"), model_term("Dr Quorbelle Imaging")
    ('Discovery STE', 'Sensation 16', 'OTHER')
    """
    text = _text(value)
    if text is None:
        return None
    allowed = terms.model(text)
    if allowed is not None:
        return allowed
    if text in MODELS:
        return text
    return _MODEL_KEYS.get(_key(text), OTHER)


def body_part_term(value: str | None, terms: SiteTerms = NO_SITE_TERMS) -> str | None:
    """The Body Part Examined defined term ``value`` holds, an allow-listed one, or ``"OTHER"``.

    Case, spaces, hyphens and underscores aside (``"C-SPINE"``, ``"Whole Body"``); a common synonym
    (``"THORAX"``) maps to its term.

    Examples
    --------
    >>> [body_part_term(v) for v in ("chest", "C-SPINE", "ABDOMEN_PELVIS", "THORAX", "QUORBELLE", "")]
    ['CHEST', 'CSPINE', 'ABDOMENPELVIS', 'CHEST', 'OTHER', None]
    """
    text = _text(value)
    if text is None:
        return None
    allowed = terms.body_part(text)
    if allowed is not None:
        return allowed
    words = " ".join(re.sub(r"[^A-Z]+", " ", text.upper()).split())
    letters = words.replace(" ", "")
    if letters in BODY_PARTS:
        return letters
    synonym = _BODY_PART_SYNONYMS.get(words)
    return synonym if synonym is not None else OTHER


def body_part_in_text(texts: Iterable[str]) -> str | None:
    """The one body-part term named in ``texts`` (descriptions), tried in order; never any other word.

    Examples
    --------
    >>> body_part_in_text(["CT Thorax w/o contrast for Someone"]), body_part_in_text(["CT chest abdomen pelvis"])
    ('CHEST', 'CHESTABDPELVIS')
    >>> body_part_in_text(["CT liver and chest"]) is None
    True
    """
    for text in texts:
        letters_only = re.sub(r"[^A-Z]", "", text.upper())
        if letters_only in BODY_PARTS:  # "C-SPINE", "Chest_Abdomen" and the like
            return letters_only
        found: list[str] = []
        for word in re.findall(r"[A-Z]+", text.upper()):
            term = _BODY_PART_SYNONYMS.get(word, word)
            if term in BODY_PARTS and term not in found:
                found.append(term)
        if len(found) == 1:
            return found[0]
        if found:
            return _COMBINED.get(frozenset(found))
    return None
