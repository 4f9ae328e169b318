"""``medsearch demo``: index the sample archive shipped with medsearch and query one of its cases.

The sample (``medsearch/data/sample``) is a few real chest CT slices from TCGA-LUAD (TCIA, CC BY 3.0);
see its ATTRIBUTION.md. Everything runs offline.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medsearch.deid import SiteKey
from medsearch.indexing import IndexReport, build_index
from medsearch.search import QueryResult, query

__all__ = ["run_demo", "sample_archive"]

DEMO_QUERY = "ID_0070_AGE_0074_CONTRAST_0_CT.dcm"


def sample_archive() -> Path:
    """The folder of the sample archive (DICOM files and ``labels.csv``)."""
    return Path(str(resources.files("medsearch") / "data" / "sample"))


def run_demo(out: str | Path = "medsearch-demo", *, k: int = 5, progress: bool = False) -> tuple[IndexReport, QueryResult]:
    """Build ``out/index`` from the sample archive (with a demo key in ``out/site.key``) and query it.

    Running it again reuses the index: nothing is added twice.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample = sample_archive()
    key = SiteKey.load(out / "site.key", create=True)
    report = build_index(
        sample / "tcga-luad-ct",
        out / "index",
        labels=sample / "labels.csv",
        key=key,
        progress=progress,
        workers=0,  # 13 files: starting worker processes would take longer than the work
    )
    result = query(sample / "tcga-luad-ct" / DEMO_QUERY, out / "index", k=k)
    return report, result
