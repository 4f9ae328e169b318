"""Result sheets over the shipped sample index: PNG and HTML, placeholders, no identifying values, CLI."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import PreprocessConfig, config_from_dict
from medsearch.errors import ConfigError, IndexNotFoundError, InvalidStudyError
from medsearch.io import load_study
from medsearch.io.dicom.window import display_window
from medsearch.search import Searcher
from medsearch.sheets import CAPTION_FIELDS, _notes, make_sheet, render_sheet
from medsearch.store import IndexStore
from medsearch.transforms import make_thumbnail

SAMPLE = Path(__file__).resolve().parents[1] / "medsearch" / "data" / "sample"
QUERY = SAMPLE / "tcga-luad-ct" / "ID_0070_AGE_0074_CONTRAST_0_CT.dcm"
K = 4
# Header elements that identify a patient or a study; none of their values may reach a sheet.
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientAge", "AccessionNumber", "StudyDate",
               "StudyTime", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID",
               "InstitutionName", "ReferringPhysicianName", "StudyDescription", "SeriesDescription")


@pytest.fixture(scope="module")
def searcher(sample_index) -> Searcher:
    return Searcher(sample_index)


@pytest.fixture(scope="module")
def result(searcher):
    return searcher.search(QUERY, k=K)


@pytest.fixture(scope="module")
def sheet(result, searcher):
    return make_sheet(result, searcher)


@pytest.fixture(scope="module")
def page(sheet) -> str:
    return sheet.to_html()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"{path} is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _identifying_values() -> set[str]:
    values = set()
    for f in sorted((SAMPLE / "tcga-luad-ct").glob("*.dcm")):
        header = pydicom.dcmread(f, stop_before_pixels=True)
        for keyword in IDENTIFYING:
            value = str(header.get(keyword, "") or "").strip()
            if len(value) >= 4:
                values.add(value)
    return values


# -- PNG ------------------------------------------------------------------------------------------------


def test_png_is_written_and_shows_the_pictures(tmp_path, result, searcher):
    out = render_sheet(result, searcher, tmp_path / "sheet.png")
    path = tmp_path / "sheet.png"
    width, height = _png_size(path)
    assert path.stat().st_size > 30_000  # five CT pictures, not an empty canvas
    assert width >= 1000 and 300 <= height <= width
    assert out.query.image is not None and all(m.image is not None for m in out.matches)


def test_query_picture_is_windowed_like_the_index(sheet, searcher, sample_index):
    # The query is the index's own case ranked first: its picture equals the stored thumbnail.
    store = IndexStore.open(sample_index)
    row = list(store.cases["case_id"]).index(sheet.matches[0].fields["case id"])
    np.testing.assert_array_equal(sheet.query.image, store.thumbnails[row])
    assert store.thumbnails.shape[1:] == (256, 256)  # the default size (issue 17: it was 96)
    # a lung CT whose only window of its own is the soft-tissue one is shown in the lung window
    case, volume = load_study(QUERY)
    assert (case.header.BodyPartExamined, case.header.WindowWidth) == ("LUNG", 400)
    assert volume.window == display_window(case.header) == (-600.0, 1500.0)
    preprocess = config_from_dict({"preprocess": store.manifest.config["preprocess"]}).preprocess
    expected = make_thumbnail(volume.pixels, config=preprocess, modality="CT", rgb=False,
                              spacing=volume.spacing, size=store.thumbnails.shape[1], window=(-600.0, 1500.0))
    np.testing.assert_array_equal(sheet.query.image, expected)
    soft = make_thumbnail(volume.pixels, config=preprocess, modality="CT", rgb=False,
                          spacing=volume.spacing, size=store.thumbnails.shape[1])
    assert not np.array_equal(sheet.query.image, soft)  # not the soft-tissue 40/400 of the encoder
    center, width = preprocess.ct_window
    assert f"center {center:g} HU, width {width:g} HU" in sheet.notes[0]
    assert "brain 40/80, lung -600/1500, bone 400/1800 HU" in sheet.notes[0]


def test_html_shows_the_query_at_its_own_resolution(page, sheet):
    """Issue 17: the HTML showed the query at thumbnail size; it shows its slice pixel for pixel."""
    assert sheet.query.full is not None and sheet.query.full.shape == (512, 512)
    assert '<img alt="query" width="512" height="512"' in page
    assert page.count('width="256" height="256"') == K  # the results' stored thumbnails, at their size


def test_notes_say_first_not_1th():
    notes = _notes(PreprocessConfig(), {"MR"}, "")
    assert "1st to 99th percentile" in notes[0] and "1th" not in notes[0]


def test_head_ct_is_shown_in_a_brain_window(shared_dicom):
    """Issue 17: a head CT in the 40/400 soft-tissue window was flat gray."""
    case, volume = load_study(shared_dicom / "ct-head-ge-gantry-tilt" / "In" / "GE")
    assert volume.window == (35.0, 100.0)  # the file's own (a brain window)
    header = case.header.copy()
    del header.WindowCenter, header.WindowWidth
    assert display_window(header) == (40.0, 80.0)  # its body part's, HEAD
    picture = make_thumbnail(volume.pixels, config=PreprocessConfig(), modality="CT", rgb=False,
                             spacing=volume.spacing, size=128, window=volume.window)
    flat = make_thumbnail(volume.pixels, config=PreprocessConfig(), modality="CT", rgb=False,
                          spacing=volume.spacing, size=128)
    brain = picture[40:90, 40:90]
    assert float(brain.std()) > 2 * float(flat[40:90, 40:90].std())  # grey and white matter apart


def test_captions_carry_rank_distance_metadata_and_labels(sheet, result):
    assert [m.heading for m in sheet.matches] == [f"#{r}" for r in range(1, K + 1)]
    for item, match in zip(sheet.matches, result.results, strict=True):
        assert f"distance {match.distance:.4f}" in item.lines
        assert match.case_id in item.lines
        assert any(f"Contrast: {match.metadata['Contrast']}" == line for line in item.lines)
        assert any(str(match.metadata["age_band"]) in line for line in item.lines)
        assert str(match.metadata["model"]) in item.lines


# -- HTML -----------------------------------------------------------------------------------------------


def test_html_holds_captions_and_one_inline_picture_per_tile(page, result):
    assert page.count('src="data:image/png;base64,') == K + 1  # the query and k results
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    for match in result.results:
        for text in (match.case_id, f"{match.distance:.4f}", str(match.metadata["model"])):
            assert f"<td>{text}</td>" in page
    for heading in ("rank", "distance", "case id", "modality", "body part", "sex", "age band", "model", "Contrast"):
        assert f"<th>{heading}</th>" in page


def test_html_file_is_written(tmp_path, result, searcher):
    render_sheet(result, searcher, html=tmp_path / "out" / "sheet.html")
    text = (tmp_path / "out" / "sheet.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")


def test_no_identifying_header_value_reaches_the_sheet(page, sheet):
    values = _identifying_values()
    assert values, "the sample files should carry identifying values to look for"
    # the pictures' base64 text is left out: a short value (an age, "080Y") turns up in it by chance
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)
    captions = " ".join([text, *(line for item in [sheet.query, *sheet.matches] for line in item.lines)])
    assert sorted(v for v in values if v in captions) == []
    assert QUERY.name not in captions and str(QUERY.parent) not in captions


def test_caption_fields_are_metadata_allowed_in_the_index():
    from medsearch.deid import CASE_METADATA_KEYS

    assert set(CAPTION_FIELDS) <= set(CASE_METADATA_KEYS)


# -- placeholders ---------------------------------------------------------------------------------------


def test_index_without_thumbnails_renders_placeholders(tmp_path, result, sample_index):
    # An index as built with index.thumbnail_size = 0: no thumbnails file in the manifest.
    copy = tmp_path / "index"
    shutil.copytree(sample_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / manifest["files"].pop("thumbnails")["name"]).unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert IndexStore.open(copy).thumbnails is None

    sheet = render_sheet(result, copy, tmp_path / "s.png", html=tmp_path / "s.html")
    assert all(m.image is None and "keeps none" in m.placeholder for m in sheet.matches)
    assert sheet.query.image is not None  # the query is drawn from the study itself
    page = (tmp_path / "s.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    assert page.count('class="placeholder"') == K
    assert _png_size(tmp_path / "s.png")[0] >= 1000


def test_blank_or_unknown_case_gets_a_placeholder(result, sample_index):
    store = IndexStore.open(sample_index)
    first = list(store.cases["case_id"]).index(result.results[0].case_id)
    store.thumbnails = store.thumbnails.copy()
    store.thumbnails[first] = 0  # the store keeps black thumbnails for cases added without one
    stranger = replace(result.results[1], case_id="c-0000000000000000")
    sheet = make_sheet(replace(result, results=[result.results[0], stranger, *result.results[2:]]), store)
    assert sheet.matches[0].image is None and "no thumbnail stored" in sheet.matches[0].placeholder
    assert sheet.matches[1].image is None and "not in this index" in sheet.matches[1].placeholder
    assert all(m.image is not None for m in sheet.matches[2:])


def test_result_without_a_query_path_gets_a_query_placeholder(searcher, tmp_path):
    vector = searcher.store.vectors()[:1]
    result = searcher.search_vector(vector[0], k=2)
    sheet = render_sheet(result, searcher, tmp_path / "v.png")
    assert sheet.query.image is None and "query_study" in sheet.query.placeholder
    assert (tmp_path / "v.png").stat().st_size > 5_000


# -- errors ---------------------------------------------------------------------------------------------

BAD_OUTPUTS = [
    ({"path": "sheet.jpg"}, ConfigError, r"sheet\.jpg must end in \.png; give a name like sheet\.png"),
    ({"html": "sheet.txt"}, ConfigError, r"must end in \.html or \.htm"),
    ({}, ConfigError, r"needs a PNG path or html="),
]


@pytest.mark.parametrize(("files", "error", "message"), BAD_OUTPUTS)
def test_bad_output_names_are_refused_before_any_work(tmp_path, result, files, error, message):
    files = {k: tmp_path / v for k, v in files.items()}
    with pytest.raises(error, match=message):
        render_sheet(result, tmp_path / "no-index-needed", **files)


def test_unwritable_file_is_a_config_error(tmp_path, result, searcher):
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(ConfigError, match=r"cannot write sheet .*taken\.png"):
        render_sheet(result, searcher, tmp_path / "taken.png")


def test_unreadable_query_and_missing_index_raise(tmp_path, result, searcher):
    (tmp_path / "note.dcm").write_text("not dicom")
    with pytest.raises(InvalidStudyError):
        make_sheet(result, searcher, query_study=tmp_path / "note.dcm")
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        make_sheet(result, tmp_path / "nowhere")


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_query_writes_sheet_and_html(runner, tmp_path, sample_index):
    png, page = tmp_path / "q.png", tmp_path / "q.html"
    out = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "-k", "3", "--json",
                              "--sheet", str(png), "--html", str(page)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["results"][0]["rank"] == 1  # stdout stays pure JSON
    assert f"wrote result sheet {png}" in out.stderr
    assert _png_size(png)[0] > 500
    assert page.read_text().count("data:image/png;base64,") == 4


def test_cli_query_with_sheet_decodes_the_query_once(runner, tmp_path, sample_index, monkeypatch):
    from medsearch.io.dicom import study as dicom

    calls = []
    real = dicom.load_volume
    monkeypatch.setattr(dicom, "load_volume", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    page = tmp_path / "q.html"
    out = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "-k", "2", "--json", "--html", str(page)])
    assert out.exit_code == 0, out.output
    assert len(calls) == 1  # one decode serves the search and the sheet's picture of the query
    assert json.loads(out.stdout)["query"]["path"] == str(QUERY)
    assert page.read_text().count("data:image/png;base64,") == 3  # the query's picture and two results


def test_cli_query_bad_sheet_name_is_one_line_error(runner, tmp_path, sample_index):
    out = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "--sheet", str(tmp_path / "q.gif")])
    assert out.exit_code == 2
    assert "must end in .png" in out.stderr and "Traceback" not in out.output
    assert not (tmp_path / "q.gif").exists()


def test_cli_demo_sheet(runner, tmp_path, sample_index, sample_key):
    # Reuse the session's index and key so that the demo finds every case already indexed.
    demo = tmp_path / "demo"
    shutil.copytree(sample_index, demo / "index")
    shutil.copy(sample_key.path, demo / "site.key")
    out = runner.invoke(app, ["demo", "--out", str(demo), "-k", "3", "--sheet", str(tmp_path / "d.png")])
    assert out.exit_code == 0, out.output
    assert "wrote result sheet" in out.stderr
    assert _png_size(tmp_path / "d.png")[0] > 500


def test_a_sheet_draws_the_slices_that_matched(phantom_index, tmp_path):
    """The query picture is the query slice that matched the first result; a result resolved through the
    link table shows its best-matching slice, read from its files; without them, its thumbnail, captioned."""
    from medsearch import query

    archive, index = phantom_index
    result = query(archive / "s1", index, k=2, slices="14:20")
    resolved = result.resolve(index.parent / "links.csv")
    top = resolved.results[0].location
    sheet = make_sheet(resolved, index, query_study=archive / "s1")
    assert f"slice {top['query_slice'] + 1} of 24 (matched #1)" in sheet.query.lines
    assert any(line.startswith(f"best slice {top['best_slice'] + 1} of 24") for line in sheet.matches[0].lines)
    volume = load_study(archive / "s1")[1]
    expected = make_thumbnail(volume.pixels[top["best_slice"]:top["best_slice"] + 1], config=PreprocessConfig(),
                              modality="CT", rgb=False, spacing=volume.spacing, size=sheet.matches[0].image.shape[0],
                              window=volume.window)
    np.testing.assert_array_equal(sheet.matches[0].image, expected)  # the matching slice, not the middle one
    assert not np.array_equal(sheet.matches[0].image, IndexStore.open(index).thumbnails[0])
    unresolved = make_sheet(result, index, query_study=archive / "s1")
    assert any("(picture: middle slice)" in line for line in unresolved.matches[0].lines)


def test_a_sheet_outlines_the_query_box_and_the_tile_each_result_matched(phantom_index, tmp_path):
    from medsearch import query
    from medsearch.config import load_config
    from medsearch.indexing import build_index
    from medsearch.sheets import _BOX_RGB

    archive, _ = phantom_index
    config = load_config("default").replace(preprocess={"slice_spacing_mm": 2.5}, index={"crop_grid": 2})
    build_index(archive, tmp_path / "ix", config=config, links=tmp_path / "links.csv")
    result = query(archive / "s1", tmp_path / "ix", k=2, slices="12", roi="40,40,56,56").resolve(tmp_path / "links.csv")
    tile = result.results[0].location["best_box"]
    sheet = make_sheet(result, tmp_path / "ix", query_study=archive / "s1")
    size = sheet.matches[0].image.shape[0]
    # 64 px slices of square pixels on a square thumbnail: pixel boxes scale by size / 64
    assert sheet.matches[0].box == pytest.approx(tuple(v * size / 64 for v in tile))
    assert sheet.query.box == pytest.approx((40 * size / 64, 40 * size / 64, 56 * size / 64, 56 * size / 64))
    assert sheet.query.full_box == (40, 40, 56, 56) and "box 40,40,56,56" in sheet.query.lines[-1]
    assert any(f"box {tile[0]},{tile[1]},{tile[2]},{tile[3]}" in line for line in sheet.matches[0].lines)
    page = render_sheet(result, tmp_path / "ix", tmp_path / "s.png", html=tmp_path / "s.html", query_study=archive / "s1").to_html()
    assert (tmp_path / "s.png").stat().st_size > 0 and page.count("data:image/png") == 3
    from medsearch.sheets import _outlined

    drawn = _outlined(sheet.matches[0].image, sheet.matches[0].box)
    x0, y0 = (int(round(v)) for v in sheet.matches[0].box[:2])
    assert tuple(drawn[y0, x0]) == _BOX_RGB and drawn.shape == (*sheet.matches[0].image.shape, 3)
