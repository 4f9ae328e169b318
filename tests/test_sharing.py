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
    assert len(table) == 12 and list(table.columns) == ["case_id", "study_instance_uid", "series_instance_uid", "part", "files"]
    result = query(QUERY, linked_index / "index", k=2).resolve(links)
    assert result.results[0].source["files"] == [str(QUERY.resolve())]
    assert result.results[0].source["study_instance_uid"].startswith("1.")
    assert "source" in result.to_dict()["results"][0]
    # without the link table, results carry no source at all
    assert "source" not in query(QUERY, linked_index / "index", k=1).to_dict()["results"][0]


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
    with pytest.raises(NotShareableError, match=message):
        export_index(index, tmp_path / "out")


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
    assert copy == source
    with pytest.raises(WriteError, match="exists and is not empty; give a new folder for the export"):
        export_index(linked_index / "index", tmp_path / "copy")


def test_a_link_table_that_cannot_be_written_says_where(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    table = LinkTable(tmp_path / "a-file" / "links.csv")
    table.add("c-1", study_uid="1.2.3", series_uid="1.2.4", part="", files=[])
    with pytest.raises(WriteError, match=r"cannot write link table .*links\.csv: .*check the folder and its permissions"):
        table.save()
