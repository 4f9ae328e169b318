"""Links back to the source: a viewer URL for a case that came from a DICOMweb server.

:func:`viewer_url` fills a template with the server's DICOMweb root and the case's Study and
Series UIDs. Three templates are built in:

- ``ohif``: ``{base}/viewer?StudyInstanceUIDs={study_uid}``, the OHIF viewer served at the root of
  the archive's host (``{base}`` is the DICOMweb root's scheme, host and port);
- ``orthanc``: ``{base}/ui/app/#/filtered-studies?StudyInstanceUID={study_uid}&expand=study``,
  Orthanc Explorer 2. (The older Orthanc Explorer, ``app/explorer.html``, names a study by an
  Orthanc id made from the PatientID, which a link back must not need, so it is not a default.)
- ``stone``: ``{base}/stone-webviewer/index.html?study={study_uid}``, Orthanc's Stone Web viewer.

Any other value is a template of your own with the fields ``{root}`` (the DICOMweb root),
``{base}``, ``{study_uid}`` and ``{series_uid}``, e.g.
``https://pacs.example.org/viewer?study={study_uid}&series={series_uid}``. These URLs are shown
only from the site-only link table (``query --resolve``); the index never holds UIDs.
"""

from __future__ import annotations

import string
from urllib.parse import quote, urlsplit, urlunsplit

from medsearch.errors import ConfigError

__all__ = ["VIEWERS", "viewer_url"]

VIEWERS = {
    "ohif": "{base}/viewer?StudyInstanceUIDs={study_uid}",
    "orthanc": "{base}/ui/app/#/filtered-studies?StudyInstanceUID={study_uid}&expand=study",
    "stone": "{base}/stone-webviewer/index.html?study={study_uid}",
}
_FIELDS = frozenset({"root", "base", "study_uid", "series_uid"})


def viewer_url(template: str, *, root: str, study_uid: str, series_uid: str = "") -> str:
    """The viewer URL of a study (and series) on the DICOMweb server ``root``, from a template or a built-in name.

    >>> viewer_url("ohif", root="http://pacs:8042/dicom-web", study_uid="1.2.3")
    'http://pacs:8042/viewer?StudyInstanceUIDs=1.2.3'

    Raises
    ------
    ConfigError
        The template names a field other than ``root``, ``base``, ``study_uid`` and ``series_uid``.
    """
    pattern = VIEWERS.get(template.lower(), template)
    names = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    unknown = sorted(names - _FIELDS)
    if unknown or "" in names:
        raise ConfigError(
            f"--viewer template has field(s) {', '.join(repr(n) for n in unknown) or '{}'}; use {{root}}, {{base}}, "
            "{study_uid} and {series_uid}, or one of: " + ", ".join(sorted(VIEWERS))
        )
    parts = urlsplit(root)
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    return pattern.format(root=root.rstrip("/"), base=base, study_uid=quote(study_uid, safe="."),
                          series_uid=quote(series_uid, safe="."))
