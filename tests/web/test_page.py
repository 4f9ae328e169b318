"""The page in a real browser (headless Chromium, driven by Playwright), against the service on a loopback port.

A clinician's path: drop a CT slice and see k results in order of distance; filter, change k, reload the
shared address; a text file gives a message in the page; a series gets a slice slider; the window
presets; a region of a series (a slab from the slider, a box dragged on the image) is searched as
``query --slices/--roi``; the page works with the keyboard and at a tablet's width; with
credentials, the page asks to sign in. A screenshot of the result page is saved (into $MEDSEARCH_SCREENSHOTS when set: the
README's picture is made so).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from web.pages import QUERY, SECRET, USER, live_server, make_series

from medsearch.search import Searcher
from medsearch.serve import create_app
from medsearch.web import Credentials

pytestmark = pytest.mark.slow

RESULTS = "[data-testid=result]"


@pytest.fixture(scope="module")
def server(sample_index, page_searcher):
    """``medsearch serve`` on the sample index, on a free loopback port."""
    with live_server(create_app(sample_index, searcher=page_searcher)) as url:
        yield url


def _ready(page) -> None:
    page.wait_for_selector("body[data-ready=true]")


def _upload(page, *paths: Path, expect: int | None = None) -> None:
    page.set_input_files("#files", [str(p) for p in paths])
    if expect is not None:
        _wait_for_results(page, expect)


def _wait_for_results(page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('[data-testid=result]').length === n && !document.body.classList.contains('working')",
        arg=count,
    )


def _distances(page) -> list[float]:
    return [float(t) for t in page.locator("[data-testid=distance]").all_inner_texts()]


def _case_ids(page) -> list[str]:
    return page.locator(f"{RESULTS} .case-id").all_inner_texts()


def _only_this_service(page, url: str) -> None:
    others = [r for r in page.requests if not (r.startswith(url + "/") or r.startswith(("data:", "blob:")))]
    assert not others, f"the page asked for something elsewhere: {others}"
    assert not page.problems, page.problems


def test_a_ct_slice_gives_k_results_in_order_of_distance(server, open_page, page_searcher, tmp_path):
    page = open_page(server + "/")
    _ready(page)
    _upload(page, QUERY, expect=10)
    distances = _distances(page)
    assert len(distances) == 10 and distances == sorted(distances) and distances[0] == pytest.approx(0.0, abs=1e-4)
    assert _case_ids(page) == [m.case_id for m in page_searcher.search(QUERY, k=10).results]
    assert page.locator("#image").get_attribute("data-drawn") == "true"
    assert page.locator("[data-testid=error]").is_hidden()
    assert "study" in parse_qs(urlsplit(page.url).query)
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=result] img')].every(i => i.complete && i.naturalWidth > 0)")
    target = Path(os.environ.get("MEDSEARCH_SCREENSHOTS", tmp_path))
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / "web-page.png"))
    assert (target / "web-page.png").stat().st_size > 10_000
    _only_this_service(page, server)


def test_a_study_dropped_on_the_page(server, open_page, tmp_path):
    """The drop zone takes the files of a drag and drop (here a DataTransfer made in the page)."""
    paths = make_series(tmp_path / "series", slices=2)
    page = open_page(server + "/")
    _ready(page)
    page.evaluate("""files => {
        const transfer = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name, {type: "application/dicom"}));
        }
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""", [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in paths])
    _wait_for_results(page, 10)
    assert page.locator("#viewer-caption").inner_text().startswith("CT · 2 slices")


def test_filters_and_k_are_kept_in_the_address(server, open_page):
    page = open_page(server + "/")
    _ready(page)
    _upload(page, QUERY, expect=10)
    page.get_by_label("Sex").select_option("M")
    _wait_for_results(page, 7)  # the sample has 7 men
    assert all("M ·" in t for t in page.locator(f"{RESULTS} dd").filter(has_text=re.compile(r"^[MF] ·")).all_inner_texts())
    page.get_by_label("Results").fill("4")
    page.get_by_label("Results").press("Enter")
    _wait_for_results(page, 4)
    shown = _case_ids(page)
    query = parse_qs(urlsplit(page.url).query)
    assert query["k"] == ["4"] and query["sex"] == ["M"]
    # the address, opened again (a reload, or a colleague's browser), shows the same page
    again = open_page(page.url)
    _ready(again)
    _wait_for_results(again, 4)
    assert _case_ids(again) == shown and again.get_by_label("Sex").input_value() == "M"
    assert again.get_by_label("Results").input_value() == "4"
    assert again.locator("#image").get_attribute("data-drawn") == "true"
    # a label column and the age range
    again.get_by_label("Contrast").select_option("True")
    again.get_by_label("Age from").fill("70")
    again.get_by_label("Age from").press("Enter")
    again.wait_for_function("() => new URL(location).searchParams.get('age_min') === '70' && !document.body.classList.contains('working')")
    for card in again.locator(RESULTS).all():
        text = card.inner_text()
        assert "M ·" in text and re.search(r"\b[7-9]0-[7-9]9 y", text) and re.search(r"Contrast\s+True", text)


def test_leaving_out_the_same_patient(server, open_page, page_searcher):
    page = open_page(server + "/")
    _ready(page)
    _upload(page, QUERY, expect=10)
    assert _distances(page)[0] == pytest.approx(0.0, abs=1e-4)  # the query's own case
    page.get_by_label("Leave out the same patient").check()
    page.wait_for_function("() => new URL(location).searchParams.get('exclude_same_patient') === '1' "
                           "&& !document.body.classList.contains('working')")
    own = page_searcher.patient_of(QUERY)
    expected = page_searcher.search(QUERY, k=10, exclude_same_patient=True)
    assert all(m.metadata["patient"] != own for m in expected.results)
    assert _case_ids(page) == [m.case_id for m in expected.results]
    assert "of the same patient" in page.locator("#note").inner_text()


def test_a_text_file_gives_a_message_in_the_page(server, open_page, tmp_path):
    page = open_page(server + "/")
    _ready(page)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image, just a note\n" * 20)
    _upload(page, notes)
    error = page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    assert re.match(r"The uploaded file is not a DICOM file", error.inner_text())
    assert "Traceback" not in page.content() and "/tmp" not in error.inner_text()
    assert page.locator(RESULTS).count() == 0


def test_a_series_gets_a_slice_slider_and_the_window_presets(server, open_page, tmp_path):
    paths = make_series(tmp_path / "series", slices=3)
    page = open_page(server + "/")
    _ready(page)
    _upload(page, *paths, expect=10)
    slider = page.get_by_label(re.compile(r"^Slice\b"))
    assert slider.is_visible() and slider.get_attribute("max") == "2"
    assert page.locator("#slice-out").inner_text() == "2 of 3"
    slider.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('#slice-out').textContent === '3 of 3'")
    page.get_by_text("Lung", exact=True).click()
    assert page.locator("#window-value").inner_text() == "Level -600, width 1500 HU"
    assert parse_qs(urlsplit(page.url).query)["window"] == ["lung"]
    # a result opens larger, and closes with Escape
    page.locator(f"{RESULTS} .thumb").first.click()
    assert page.locator("#detail").is_visible() and "#1" in page.locator("#detail-title").inner_text()
    page.keyboard.press("Escape")
    assert page.locator("#detail").is_hidden()


@pytest.fixture(scope="module")
def tiled(phantom_index, tmp_path_factory):
    """The phantom series indexed with crop vectors (``crop_grid = 2``): (archive, index)."""
    from medsearch.config import load_config
    from medsearch.indexing import build_index

    archive, _ = phantom_index
    index = tmp_path_factory.mktemp("tiled") / "index"
    build_index(archive, index, config=load_config("default").replace(preprocess={"slice_spacing_mm": 2.5}, index={"crop_grid": 2}),
                links=index.parent / "links.csv")
    return archive, index


def test_a_region_drawn_on_the_page_is_searched_as_query_slices_roi(tiled, open_page, tmp_path):
    """Slices chosen with the slider, a box dragged on the image: the results are those of
    ``medsearch query --slices --roi``, each naming its matched tile and showing the slice it
    matched (the service has the link table); "Whole study" goes back."""
    archive, index = tiled
    searcher = Searcher(index)
    paths = sorted((archive / "s1").glob("*.dcm"))
    whole = [m.case_id for m in searcher.search(archive / "s1", k=3).results]
    with live_server(create_app(index, searcher=searcher, links=index.parent / "links.csv")) as url:
        page = open_page(url + "/?k=3")
        _ready(page)
        _upload(page, *paths, expect=3)
        region = page.get_by_role("group", name="Search a region of this study")
        assert region.is_visible() and _case_ids(page) == whole
        page.locator("#slice").fill("8")
        page.get_by_role("button", name="Start here").click()
        page.locator("#slice").fill("13")
        page.get_by_role("button", name="End here").click()
        assert (page.get_by_label("Slices", exact=True).input_value(), page.get_by_label("Slices to").input_value()) == ("9", "14")
        page.get_by_role("button", name="Draw on the image").click()
        frame = page.locator("#image").bounding_box()
        page.mouse.move(frame["x"] + 0.25 * frame["width"], frame["y"] + 0.3 * frame["height"])
        page.mouse.down()
        page.mouse.move(frame["x"] + 0.55 * frame["width"], frame["y"] + 0.6 * frame["height"], steps=6)
        page.mouse.up()
        roi = page.get_by_label("Box (px)").input_value()
        x0, y0, x1, y1 = (int(v) for v in roi.split(","))
        assert (x0, y0) == pytest.approx((16, 19), abs=1) and (x1, y1) == pytest.approx((36, 39), abs=1)
        assert page.locator("#detail").is_hidden()  # the drag did not open the large view
        assert page.get_by_role("button", name="Draw on the image").get_attribute("aria-pressed") == "false"
        page.get_by_role("button", name="Search this region").click()
        page.wait_for_function("() => document.querySelector('#summary').textContent.includes('like slices 9–14')"
                               " && !document.body.classList.contains('working')")
        expected = searcher.search(archive / "s1", k=3, slices="8:14", roi=roi)
        assert _case_ids(page) == [m.case_id for m in expected.results]
        x0, y0, x1, y1 = expected.results[0].location["best_box"]
        assert page.locator(f"{RESULTS} .card-fields").first.inner_text().endswith(f"Matched box\n{x0},{y0}–{x1},{y1} px")
        assert "Dashed: what the encoder saw" in page.locator("#region-hint").inner_text()
        # each card shows the slice that matched, with its tile, read from the archive
        page.wait_for_function("() => [...document.querySelectorAll('[data-testid=result] img')].every(i => i.complete && i.naturalWidth > 0)")
        first = page.locator(f"{RESULTS} img").first
        assert first.get_attribute("src") == (f"/api/case/{expected.results[0].case_id}/slice/"
                                              f"{expected.results[0].location['best_slice']}?box={x0},{y0},{x1},{y1}")
        assert "slice of each case that matched best" in page.locator("#note").inner_text()
        # the query's slice that a result matched, shown in the viewer
        query_slice = expected.results[0].location["query_slice"]
        page.locator(RESULTS).first.get_by_role("button", name=f"Show query slice {query_slice + 1}").click()
        page.wait_for_function("t => document.querySelector('#slice-out').textContent === t", arg=f"{query_slice + 1} of 24")
        target = Path(os.environ.get("MEDSEARCH_SCREENSHOTS", tmp_path))
        target.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target / "web-region.png"), full_page=True)
        page.get_by_role("button", name="Whole study").click()
        page.wait_for_function("() => !document.querySelector('#summary').textContent.includes('like')"
                               " && !document.body.classList.contains('working')")
        assert _case_ids(page) == whole and page.get_by_label("Box (px)").input_value() == ""
        # a slab alone, on an index with tiles: matched in layout, as query --slices matches it
        page.get_by_label("Slices", exact=True).fill("9")
        page.get_by_label("Slices to").fill("14")
        page.get_by_role("button", name="Search this region").click()
        page.wait_for_function("() => document.querySelector('#summary').textContent.includes('like slices 9–14')"
                               " && !document.body.classList.contains('working')")
        slab = searcher.search(archive / "s1", k=3, slices="8:14")
        assert slab.query["rerank"]["layout"] is True and _case_ids(page) == [m.case_id for m in slab.results]
        assert "matched whole and tile by tile" in page.locator("#note").inner_text()
        _only_this_service(page, url)


def test_a_case_whose_files_are_gone_shows_its_stored_thumbnail(tiled, open_page, tmp_path):
    archive, index = tiled
    moved = tmp_path / "links.csv"
    moved.write_text((index.parent / "links.csv").read_text().replace(str(archive), str(tmp_path / "gone")))
    with live_server(create_app(index, links=moved)) as url:
        page = open_page(url + "/?k=2")
        _ready(page)
        _upload(page, *sorted((archive / "s0").glob("*.dcm")), expect=2)
        page.wait_for_function("() => [...document.querySelectorAll('[data-testid=result] img')].every(i => i.complete && i.naturalWidth > 0)")
        sources = [img.get_attribute("src") for img in page.locator(f"{RESULTS} img").all()]
        assert all(src.startswith("/api/thumbnail/") for src in sources), sources
        assert "cannot be read" in page.locator(f"{RESULTS} img").first.get_attribute("alt")


def test_the_keyboard_reaches_every_control(server, open_page):
    page = open_page(server + "/")
    _ready(page)
    reached = []
    for _ in range(30):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()"))
    for control in ("choose-files", "choose-folder", "k", "f-modality", "f-body_part", "f-sex", "age-min", "age-max",
                    "l-Contrast", "exclude", "apply"):
        assert control in reached, f"{control} is not reached with Tab: {reached}"
    # every form control has a name a screen reader says
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]):not([hidden]), select, button')]
        .filter(e => e.offsetParent !== null)
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unnamed == []


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (820, 1180)])
def test_readable_on_a_desktop_and_a_tablet(server, open_page, width, height):
    page = open_page(server + "/", width=width, height=height)
    _ready(page)
    _upload(page, QUERY, expect=10)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width  # no sideways scrolling
    box = page.locator(RESULTS).first.bounding_box()
    assert box is not None and box["width"] >= 150  # a result picture large enough to judge
    size = page.evaluate("() => parseFloat(getComputedStyle(document.querySelector('.card-fields')).fontSize)")
    assert size >= 12.5


def test_with_credentials_the_page_asks_to_sign_in(sample_index, page_searcher, open_page):
    with live_server(create_app(sample_index, searcher=page_searcher, credentials=Credentials({USER: SECRET}))) as url:
        assert httpx.get(url + "/api/options").status_code == 401
        assert httpx.get(url + "/api/options", headers={"Authorization": f"Bearer {SECRET}"}).status_code == 200
        page = open_page(url + "/?k=3")
        page.wait_for_url(re.compile(r"/login\?next="))
        assert page.locator(RESULTS).count() == 0
        page.get_by_label("Name").fill(USER)
        page.get_by_label("Secret").fill("a-wrong-secret-here")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("do not match").wait_for()
        page.get_by_label("Name").fill(USER)
        page.get_by_label("Secret").fill(SECRET)
        page.get_by_role("button", name="Sign in").click()
        _ready(page)
        assert urlsplit(page.url).path == "/" and page.get_by_label("Results").input_value() == "3"
        assert page.get_by_text(f"Signed in as {USER}").is_visible()
        _upload(page, QUERY, expect=3)
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(re.compile(r"/login"))
        _only_this_service(page, url)
