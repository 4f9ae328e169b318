from __future__ import annotations

import json
import shutil
import stat

import pandas as pd
import pytest
from conftest import SAMPLE
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.errors import ConfigError, WriteError
from medsearch.indexing import build_index
from medsearch.search import query
from medsearch.sharing import LinkTable, NotShareableError, export_index, shareability_problems
from medsearch.store import VERIFIED_CACHE, IndexStore

ARCHIVE = SAMPLE / "tcga-luad-ct"
QUERY = ARCHIVE / "ID_0063_AGE_0073_CONTRAST_0_CT.dcm"


@pytest.fixture(scope="module")
def linked_index(tmp_path_factory):
    from medsearch.deid import SiteKey

    root = tmp_path_factory.mktemp("linked")
    key = SiteKey.load(root / "site.key", create=True)
    build_index(ARCHIVE, root / "index", key=key, labels=SAMPLE / "labels.csv", links=root / "private" / "links.csv")
    return root


def test_link_table_is_owner_only_and_resolves_results(linked_index):
    links = linked_index / "private" / "links.csv"
    assert stat.S_IMODE(links.stat().st_mode) == 0o600
    table = pd.read_csv(links)
    assert len(table) == 12 and list(table.columns) == ["case_id", "study_instance_uid", "series_instance_uid", "part", "files",
                                                        "dicomweb_root"]
    result = query(QUERY, linked_index / "index", k=2).resolve(links)
    assert result.results[0].source["files"] == [str(QUERY.resolve())]
    assert result.results[0].source["study_instance_uid"].startswith("1.")
    assert "source" in result.to_dict()["results"][0]
    # without the link table, results carry no source at all
    assert "source" not in query(QUERY, linked_index / "index", k=1).to_dict()["results"][0]


def test_link_table_without_the_dicomweb_column_still_reads(linked_index, tmp_path):
    """A link table written before cases could come from a PACS (five columns) resolves as before."""
    old = tmp_path / "old-links.csv"
    pd.read_csv(linked_index / "private" / "links.csv").drop(columns=["dicomweb_root"]).to_csv(old, index=False)
    result = query(QUERY, linked_index / "index", k=1).resolve(old)
    assert result.results[0].source["files"] == [str(QUERY.resolve())] and result.results[0].source["dicomweb_root"] == ""


def test_link_table_never_goes_inside_the_index(linked_index):
    with pytest.raises(ConfigError, match="would be inside the index directory"):
        LinkTable.for_index(linked_index / "index" / "links.csv", linked_index / "index")


def test_cli_resolve_shows_where_results_live(linked_index):
    result = CliRunner().invoke(
        app, ["query", str(QUERY), "--index", str(linked_index / "index"), "-k", "2", "--resolve", str(linked_index / "private" / "links.csv")]
    )
    assert result.exit_code == 0, result.output
    assert "source (from the link table)" in result.stdout and QUERY.name[:20] in result.stdout.replace("\n", "")
    missing = CliRunner().invoke(app, ["query", str(QUERY), "--index", str(linked_index / "index"), "--resolve", "/nope.csv"])
    assert missing.exit_code == 2 and "link table /nope.csv does not exist" in missing.stderr


def test_export_copies_only_what_is_shareable(linked_index, tmp_path):
    report = export_index(linked_index / "index", tmp_path / "copy")
    names = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert names == sorted(report.files)
    assert "skipped.csv" not in names and not any(n.startswith("thumbs") for n in names)
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    assert "index_dir" not in manifest["last_run"]
    copy = IndexStore.open(tmp_path / "copy")
    assert len(copy) == 12 and copy.thumbnails is None
    assert query(QUERY, tmp_path / "copy", k=1).results[0].distance < 1e-4
    # the local checksum cache (this machine's file ids) stays behind, and the check of the copy leaves none
    assert (linked_index / "index" / VERIFIED_CACHE).exists() and "checksum cache" in report.left_out[VERIFIED_CACHE]
    assert VERIFIED_CACHE not in names
    with_thumbs = export_index(linked_index / "index", tmp_path / "copy2", with_thumbnails=True)
    assert any(n.startswith("thumbs") for n in with_thumbs.files)


def _copy(linked_index, tmp_path):
    target = tmp_path / "index"
    shutil.copytree(linked_index / "index", target)
    return target


def test_export_refuses_a_link_table_or_key_inside(linked_index, tmp_path):
    index = _copy(linked_index, tmp_path)
    shutil.copy(linked_index / "private" / "links.csv", index / "my-table.csv")
    shutil.copy(linked_index / "site.key", index / "site.key")
    problems = shareability_problems(index)
    assert any("my-table.csv is a link table" in p for p in problems)
    assert any("site.key looks like a key file" in p for p in problems)
    with pytest.raises(NotShareableError, match="refusing to export"):
        export_index(index, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("Contrast", "1.2.840.113619.2.55.3.604688119", "look like a UID"),
        ("Contrast", "20190417", "look like a date"),
        ("Contrast", "someone@hospital.org", "look like an e-mail address"),
        ("Contrast", "Doe^Jane", "look like a person name"),
        ("Contrast", "Dr Quorbelle Imaging", "look like a person name"),
        ("Contrast", "Jane Doe", "look like a person name"),
        ("PatientName", "Doe^Jane", "neither metadata nor declared labels"),
    ],
)
def test_export_refuses_identifying_values_in_the_case_table(linked_index, tmp_path, column, value, message):
    index = _copy(linked_index, tmp_path)
    store = IndexStore.open(index)
    if column in store.cases:
        store.cases[column] = store.cases[column].astype(object)
    store.cases.loc[0, column] = value
    store.commit()
    with pytest.raises(NotShareableError, match=message) as raised:
        export_index(index, tmp_path / "out")
    assert value not in str(raised.value)  # the message counts the values, it never quotes one


def test_cli_export(linked_index, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["export-index", str(linked_index / "index"), str(tmp_path / "copy"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert "manifest.json" in json.loads(ok.stdout)["files"]
    again = runner.invoke(app, ["export-index", str(linked_index / "index"), str(tmp_path / "copy")])
    assert again.exit_code == 2 and "exists and is not empty" in again.stderr


def test_export_manifest_is_the_source_manifest_without_local_paths(linked_index, tmp_path):
    export_index(linked_index / "index", tmp_path / "copy")
    source = json.loads((linked_index / "index" / "manifest.json").read_text())
    copy = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    source["files"].pop("thumbnails")
    source["last_run"].pop("index_dir")
    # the case table is the generalized one (its own checksum), and the manifest says how
    assert copy["files"].pop("cases")["name"] == source["files"].pop("cases")["name"]
    assert copy.pop("export")["k_anonymity"]["k"] == 5
    assert copy == source
    with pytest.raises(WriteError, match="exists and is not empty; give a new folder for the export"):
        export_index(linked_index / "index", tmp_path / "copy")


def test_a_link_table_that_cannot_be_written_says_where(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    table = LinkTable(tmp_path / "a-file" / "links.csv")
    table.add("c-1", study_uid="1.2.3", series_uid="1.2.4", part="", files=[])
    with pytest.raises(WriteError, match=r"cannot write link table .*links\.csv: .*check the folder and its permissions"):
        table.save()


# --------------------------------------------------------------------------------------------
# Finding 2: quasi-identifiers. The exported case table is k-anonymous over patients.
# --------------------------------------------------------------------------------------------


def _smallest_group(cases: pd.DataFrame, columns: list[str]) -> int:
    """An independent count: distinct patients per combination of the columns, by pandas."""
    present = [c for c in columns if c in cases and cases[c].notna().any()]
    table = cases.astype(object).fillna("<missing>")
    return int(table.groupby(present)["patient"].nunique().min()) if present else table["patient"].nunique()


QUASI = ["sex", "age_band", "patient_size_m", "patient_weight_kg", "manufacturer", "model", "spacing_mm"]


@pytest.mark.parametrize("k", [2, 5, 11])
def test_export_generalizes_until_every_group_holds_k_patients(linked_index, tmp_path, k):
    source = IndexStore.open(linked_index / "index").cases.copy()
    assert _smallest_group(source, QUASI) == 1  # 11 patients of the sample: every one alone
    report = export_index(linked_index / "index", tmp_path / "copy", k=k)
    copy = IndexStore.open(tmp_path / "copy").cases
    assert _smallest_group(copy, QUASI) >= k
    plan = report.k_anonymity
    assert (plan["k"], plan["reached"]) == (k, True)
    assert plan["before"]["smallest_group"] == 1 and plan["before"]["patients"] == 11
    assert plan["after"]["smallest_group"] == _smallest_group(copy, QUASI)
    assert plan["generalized"]  # something had to give
    for column, what in plan["generalized"].items():
        if what == "dropped":
            assert copy[column].isna().all()
    # the rest of the table, and the local index, are as they were
    pd.testing.assert_frame_equal(IndexStore.open(linked_index / "index").cases, source)
    same = [c for c in source.columns if c not in plan["generalized"]]
    pd.testing.assert_frame_equal(copy[same], source[same], check_dtype=False)
    assert query(QUERY, tmp_path / "copy", k=1).results[0].case_id == query(QUERY, linked_index / "index", k=1).results[0].case_id


def test_export_with_k_of_one_generalizes_nothing(linked_index, tmp_path):
    report = export_index(linked_index / "index", tmp_path / "copy", k=1)
    assert report.k_anonymity["generalized"] == {}
    pd.testing.assert_frame_equal(IndexStore.open(tmp_path / "copy").cases, IndexStore.open(linked_index / "index").cases)


def test_export_refuses_fewer_patients_than_k(linked_index, tmp_path):
    with pytest.raises(NotShareableError, match=r"holds 11 patient\(s\), fewer than k = 12, so no case table of it is k-anonymous"):
        export_index(linked_index / "index", tmp_path / "copy", k=12)
    assert not (tmp_path / "copy").exists()
    with pytest.raises(ConfigError, match="k-anonymity must be a whole number of at least 1"):
        export_index(linked_index / "index", tmp_path / "copy", k=0)


def test_export_checks_metadata_again(linked_index, tmp_path):
    """An index written before the vocabularies (or edited) leaves with terms and bands only."""
    index = _copy(linked_index, tmp_path)
    store = IndexStore.open(index)
    for column in ("body_part", "manufacturer", "model", "patient_size_m", "patient_weight_kg"):
        store.cases[column] = store.cases[column].astype(object)
    store.cases.loc[0, ["body_part", "manufacturer", "model"]] = ["QUORBELLE", "Dr Quorbelle Imaging", "Dr Quorbelle Imaging"]
    store.cases.loc[1, ["manufacturer", "patient_size_m", "patient_weight_kg"]] = ["GE MEDICAL SYSTEMS", 2.31, 312.0]
    store.cases.loc[2, "patient_weight_kg"] = 2.2
    store.commit()
    report = export_index(index, tmp_path / "out", k=1)
    assert report.replaced == {"body_part": 1, "manufacturer": 2, "model": 1, "patient_size_m": 1, "patient_weight_kg": 2}
    copy = IndexStore.open(tmp_path / "out").cases
    assert list(copy.loc[0, ["body_part", "manufacturer", "model"]]) == ["OTHER", "OTHER", "OTHER"]
    assert list(copy.loc[1, ["manufacturer", "patient_size_m", "patient_weight_kg"]]) == ["GE", "2.20+", "250+"]
    assert copy.loc[2, "patient_weight_kg"] == "2-9"
    exported = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    assert b"quorbelle" not in exported.lower()
    assert report.labels_below_k == []  # with k = 1 no value is too rare


def test_cli_export_and_info_report_k_anonymity(linked_index, tmp_path):
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(linked_index / "index"), "--k-anonymity", "3"])
    assert info.exit_code == 0, info.output
    assert "k-anonymity: smallest group 1 patient(s) over " in info.stdout
    assert "11 of 11 patient(s) in groups below k = 3" in info.stdout
    data = json.loads(runner.invoke(app, ["info", str(linked_index / "index"), "--json"]).stdout)
    assert data["k_anonymity"]["smallest_group"] == 1 and data["k_anonymity"]["k"] == 5
    out = runner.invoke(app, ["export-index", str(linked_index / "index"), str(tmp_path / "copy"), "--k-anonymity", "3"])
    assert out.exit_code == 0, out.output
    assert "before: smallest group 1 patient(s)" in out.stdout
    assert "0 of 11 patient(s) in groups below k = 3" in out.stdout
    assert "generalized: " in out.stdout and "dropped" in out.stdout
    as_json = runner.invoke(app, ["export-index", str(linked_index / "index"), str(tmp_path / "copy2"), "--json"])
    assert json.loads(as_json.stdout)["k_anonymity"]["after"]["smallest_group"] >= 5
    refused = runner.invoke(app, ["export-index", str(linked_index / "index"), str(tmp_path / "copy3"), "--k-anonymity", "50"])
    assert refused.exit_code == 2 and "fewer than k = 50" in refused.stderr
    bad = runner.invoke(app, ["export-index", str(linked_index / "index"), str(tmp_path / "copy4"), "--k-anonymity", "0"])
    assert bad.exit_code == 2


@pytest.mark.slow
def test_ct100_export_is_k_anonymous(shared_dicom, tmp_path):
    """The probe's set: 54 patients, every one alone over the quasi-identifiers; the export has none alone."""
    from medsearch.deid import SiteKey

    ct100 = shared_dicom / "tcga-luad-ct100"
    key = SiteKey.load(tmp_path / "site.key", create=True)
    build_index(ct100 / "dicom_dir", tmp_path / "index", key=key, labels=ct100 / "labels.csv", workers=0)
    before = IndexStore.open(tmp_path / "index").cases
    assert before["patient"].nunique() == 54
    assert _smallest_group(before, ["sex", "age_band", "manufacturer", "model", "spacing_mm"]) == 1
    report = export_index(tmp_path / "index", tmp_path / "copy")
    assert report.k_anonymity["after"]["unique_patients"] == 0
    assert _smallest_group(IndexStore.open(tmp_path / "copy").cases, QUASI) >= 5
    assert "Age" in report.labels_below_k  # the set's own labels carry the exact age
    assert "tiff_name" not in report.labels_below_k  # file names are not labels (issue 17)
