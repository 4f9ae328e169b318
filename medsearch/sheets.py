"""Result sheets: a query image beside its nearest cases, as a PNG or a self-contained HTML page.

People judge retrieval by looking. A sheet shows the query's middle slice and the stored thumbnail of
each retrieved case, each captioned with its rank, distance and non-identifying metadata::

    from medsearch import query
    from medsearch.sheets import render_sheet

    result = query("study.dcm", "my-index", k=5)
    render_sheet(result, "my-index", "sheet.png", html="sheet.html")

What is shown, and what is not:

* The query picture is made from the study with :func:`~medsearch.transforms.make_thumbnail`, as
  the index made its thumbnails: a CT in its body part's window (brain, lung, bone; the file's own
  values where it carries a window of that kind), else in its own window, else in the index's CT
  window (:func:`~medsearch.io.dicom.window.display_window`); other modalities scaled to their
  percentiles. The HTML page shows the query at its own resolution
  too. The result pictures are the thumbnails the index stored when it was built
  (``index.thumbnail_size``, 256 px by default); an index without them, or a case without one,
  gets a labelled placeholder instead.
* Where the result says where each case matched (its slice vectors, :mod:`medsearch.rerank`), the
  query picture is the query slice that matched the first result, and a result's picture is its
  best-matching slice when its source files can be read (a result resolved through the link table,
  ``query --resolve``); otherwise the stored thumbnail, captioned with the slice that matched.
* Captions sit outside the pictures. Nothing is drawn on a picture: the pixels are the source
  pixels, windowed. Text burned into the source pixels by a scanner or a workstation is the
  archive's to clean before indexing; medsearch neither adds nor removes it.
* Captions carry the case id (a keyed pseudonym), rank and distance, and only the fields of
  :data:`CAPTION_FIELDS` plus the index's label columns. The query's file path is not shown.

This module sits above :mod:`medsearch.search`: it reads an index and a :class:`QueryResult`; the
CLI's ``query --sheet/--html`` and ``demo --sheet`` call :func:`render_sheet`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.config import PreprocessConfig, config_from_dict
from medsearch.errors import ConfigError, IndexCorruptError
from medsearch.io import CaseRef, Volume, load_study, load_volume, scan
from medsearch.io.dicom.window import BODY_PART_WINDOWS, WINDOWS, display_window
from medsearch.search import QueryResult, Searcher
from medsearch.store import IndexStore
from medsearch.transforms import make_thumbnail, middle_picture, picture_box

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["CAPTION_FIELDS", "ResultSheet", "SheetItem", "make_sheet", "matched_picture", "render_sheet", "scanned_case"]

#: Metadata fields a caption shows (besides rank, distance, case id and the index's labels).
CAPTION_FIELDS = ("modality", "body_part", "sex", "age_band", "model")

_HEADINGS = {"modality": "modality", "body_part": "body part", "sex": "sex", "age_band": "age band", "model": "model"}
_PER_ROW = 5  # results per row of the PNG
_TILE_IN = 2.3  # width and picture height of one tile, inches
_GAP_IN = 0.25  # between result tiles
_QUERY_GAP_IN = 0.6  # between the query and the first result
_MARGIN_IN = 0.2
_ROW_GAP_IN = 0.35
_FONT_PT = 10.5  # caption size: about 15 px at the PNG's 100 dpi
_LINE_IN = _FONT_PT * 1.45 / 72
_MAX_CHARS = 26  # longer caption values are shortened in the PNG (the HTML has them whole)
_DPI = 100
_QUERY_SIZE = 256  # query thumbnail size when the index stores none to match


@dataclass(frozen=True)
class SheetItem:
    """One tile of a sheet: the query or one retrieved case.

    Attributes
    ----------
    heading : str
        ``"query"`` or ``"#<rank>"``.
    lines : tuple of str
        Caption lines under the picture (PNG).
    fields : dict
        Column name -> value for the HTML table (empty values as ``""``).
    image : numpy.ndarray or None
        ``(T, T)`` uint8 gray picture, or None where there is none.
    placeholder : str
        Why there is no picture (empty when there is one).
    full : numpy.ndarray or None
        The query's middle slice at its own resolution (uint8), for the HTML page; None for results.
    box, full_box : tuple of float or None
        A box outlined on ``image`` and on ``full`` (x0, y0, x1, y1 in their pixels): the query's
        region, or the tile a result matched it on.
    """

    heading: str
    lines: tuple[str, ...]
    fields: dict[str, str]
    image: np.ndarray | None = field(default=None, repr=False)
    placeholder: str = ""
    full: np.ndarray | None = field(default=None, repr=False)
    box: tuple[float, float, float, float] | None = None
    full_box: tuple[float, float, float, float] | None = None


@dataclass
class ResultSheet:
    """A query and its retrieved cases, ready to save as a PNG or HTML (or to show in a notebook).

    Made by :func:`make_sheet`. In Jupyter, a sheet displays itself as its PNG.

    Attributes
    ----------
    query : SheetItem
    matches : list of SheetItem
        In rank order.
    columns : tuple of str
        The HTML table's columns after the picture.
    notes : tuple of str
        How the pictures are windowed and what the distance means.
    """

    query: SheetItem
    matches: list[SheetItem]
    columns: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        n = len(self.matches)
        return f"Query and its {n} most similar case{'s' if n != 1 else ''}"

    # -- PNG --------------------------------------------------------------------------------------

    def figure(self) -> Figure:
        """The sheet as a matplotlib Figure on an Agg canvas (no display, pyplot's backend untouched)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        per_row = max(1, min(len(self.matches), _PER_ROW))
        rows = max(1, math.ceil(len(self.matches) / per_row))
        n_lines = max(len(item.lines) for item in [self.query, *self.matches])
        caption_in = (n_lines + 0.6) * _LINE_IN
        header_in = 0.35 + _LINE_IN * (1 + len(self.notes))
        results_left = _MARGIN_IN + _TILE_IN + _QUERY_GAP_IN
        width = results_left + per_row * (_TILE_IN + _GAP_IN) + _MARGIN_IN
        height = header_in + rows * (_TILE_IN + caption_in + _ROW_GAP_IN) - _ROW_GAP_IN + _MARGIN_IN
        fig = Figure(figsize=(width, height), dpi=_DPI)
        FigureCanvasAgg(fig)
        fig.patch.set_facecolor("white")

        fig.text(_MARGIN_IN / width, 1 - 0.15 / height, self.title, fontsize=_FONT_PT + 3, weight="bold", va="top")
        for i, note in enumerate(self.notes):
            fig.text(_MARGIN_IN / width, 1 - (0.25 + _LINE_IN * (1.3 + i)) / height, note, fontsize=_FONT_PT - 0.5,
                     va="top", color="#333333")

        def place(item: SheetItem, row: int, col: int, *, emphasis: bool) -> None:
            # Tile geometry in inches, converted to figure fractions; the query column is set apart.
            left = _MARGIN_IN if col == 0 else results_left + (col - 1) * (_TILE_IN + _GAP_IN)
            top = header_in + row * (_TILE_IN + caption_in + _ROW_GAP_IN)
            image_ax = fig.add_axes((left / width, 1 - (top + _TILE_IN) / height, _TILE_IN / width, _TILE_IN / height))
            _draw_picture(image_ax, item)
            lines = [item.heading, *item.lines]
            for j, line in enumerate(lines):
                y = 1 - (top + _TILE_IN + 0.05 + j * _LINE_IN) / height
                fig.text(left / width, y, _shorten(line, _MAX_CHARS), fontsize=_FONT_PT, va="top",
                         weight="bold" if j == 0 else "normal", color="#9c2d00" if emphasis and j == 0 else "black")

        place(self.query, 0, 0, emphasis=True)
        for i, item in enumerate(self.matches):
            place(item, i // per_row, 1 + i % per_row, emphasis=False)
        return fig

    def to_png(self) -> bytes:
        """The PNG file's bytes."""
        buffer = BytesIO()
        self.figure().savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
        return buffer.getvalue()

    def save_png(self, path: str | Path) -> Path:
        """Write the sheet as a PNG file.

        Raises
        ------
        ConfigError
            The path does not end in ``.png``, or cannot be written.
        """
        return _write(path, (".png",), self.to_png())

    def _repr_png_(self) -> bytes:
        return self.to_png()

    # -- HTML -------------------------------------------------------------------------------------

    def to_html(self) -> str:
        """A self-contained HTML page: one table row per picture, thumbnails inline as base64 PNG."""
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in ("picture", *self.columns))
        rows = []
        for item in [self.query, *self.matches]:
            shown, box = (item.full, item.full_box) if item.full is not None else (item.image, item.box)
            if shown is not None:
                # each picture at its own size: the query's slice at full resolution, thumbnails as stored
                height, width = shown.shape[:2]
                picture = (f'<img alt="{esc(item.heading)}" width="{width}" height="{height}" '
                           f'src="data:image/png;base64,{_png_base64(shown, box)}">')
            else:
                picture = f'<div class="placeholder">{esc(item.placeholder)}</div>'
            cells = "".join(f"<td>{esc(item.fields.get(c, ''))}</td>" for c in self.columns)
            css = ' class="query"' if item is self.query else ""
            rows.append(f"<tr{css}><td>{picture}</td>{cells}</tr>")
        notes = "".join(f"<p>{esc(n)}</p>" for n in self.notes)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{esc(self.title)}</h1>\n{notes}\n"
            f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>\n"
            "<p class=\"small\">Pictures are source pixels, windowed; medsearch draws nothing on them. "
            "The query is shown at its own resolution. Case ids are keyed pseudonyms.</p>\n</body>\n</html>\n"
        )

    def save_html(self, path: str | Path) -> Path:
        """Write the sheet as a self-contained HTML page.

        Raises
        ------
        ConfigError
            The path does not end in ``.html`` or ``.htm``, or cannot be written.
        """
        return _write(path, (".html", ".htm"), self.to_html().encode("utf-8"))


def make_sheet(
    result: QueryResult,
    index: str | Path | IndexStore | Searcher,
    *,
    query_study: str | Path | Volume | None = None,
) -> ResultSheet:
    """Gather the pictures and captions of a result sheet.

    Parameters
    ----------
    result : QueryResult
        From :func:`medsearch.query` or :meth:`Searcher.search` on ``index``.
    index : str, Path, IndexStore or Searcher
        The index the result came from: its stored thumbnails and preprocessing settings are used.
    query_study : str, Path or Volume, optional
        The query (a DICOM file, a series folder, or a loaded volume); default: the path recorded in
        ``result.query``. Without one the query tile is a placeholder.

    Returns
    -------
    ResultSheet

    Raises
    ------
    InvalidStudyError
        The query study cannot be read.
    IndexNotFoundError, IndexCorruptError
        ``index`` is not a readable index, or its manifest records no preprocessing.
    """
    store = _open_store(index)
    preprocess = _preprocess_config(store)
    thumbs = store.thumbnails
    size = int(thumbs.shape[1]) if thumbs is not None else _QUERY_SIZE

    study = query_study if query_study is not None else result.query.get("path")
    first = result.results[0].location if result.results else None
    region_box = (result.query.get("region") or {}).get("roi")
    query_item = _query_item(study, preprocess, size, first["query_slice"] if first else None, region_box)

    rows = {cid: i for i, cid in enumerate(store.cases["case_id"])} if len(store.cases) else {}
    labels = list(result.labels)
    columns = ("rank", "distance", "case id", *(_HEADINGS[f] for f in CAPTION_FIELDS), *labels)
    matches = []
    for m in result.results:
        row = rows.get(m.case_id)
        image, why = None, ""
        if thumbs is None:
            why = "no thumbnail: this index keeps none (index.thumbnail_size = 0)"
        elif row is None:
            why = "no thumbnail: the case is not in this index"
        elif not thumbs[row].any():
            why = "no thumbnail stored for this case"
        else:
            image = thumbs[row]
        where, box = "", None
        if m.location is not None:
            best = int(m.location["best_slice"])
            drawn = _source_slice(m.source, best, preprocess, size)
            of = f" of {m.metadata['n_slices']}" if m.metadata.get("n_slices") else ""
            where = f"best slice {best + 1}{of}" + ("" if drawn is not None else " (picture: middle slice)")
            tile = m.location.get("best_box")
            if tile:
                where += f", box {tile[0]},{tile[1]},{tile[2]},{tile[3]}"
            if drawn is not None:
                image, why = drawn[0], ""
                box = picture_box(tile, drawn[1], drawn[2], size) if tile else None
        values = {f: _text(m.metadata.get(f)) for f in CAPTION_FIELDS}
        label_values = {name: _text(m.metadata.get(name)) for name in labels}
        fields = {"rank": str(m.rank), "distance": f"{m.distance:.4f}", "case id": m.case_id,
                  **{_HEADINGS[f]: v for f, v in values.items()}, **label_values}
        lines = [
            f"distance {m.distance:.4f}",
            m.case_id,
            _join(values["modality"], values["body_part"]),
            _join(f"sex {values['sex']}" if values["sex"] else "", f"age {values['age_band']}" if values["age_band"] else ""),
            values["model"],
            where,
            *(f"{name}: {value}" for name, value in label_values.items() if value),
        ]
        if where:
            fields["matched at"] = where
        matches.append(SheetItem(heading=f"#{m.rank}", lines=tuple(x for x in lines if x), fields=fields,
                                 image=image, placeholder=why, box=box))

    modalities = {query_item.fields.get("modality", "")} | {m.fields.get("modality", "") for m in matches}
    return ResultSheet(query=query_item, matches=matches, columns=columns,
                       notes=_notes(preprocess, modalities - {""}, result.distance))


def render_sheet(
    result: QueryResult,
    index: str | Path | IndexStore | Searcher,
    path: str | Path | None = None,
    *,
    html: str | Path | None = None,
    query_study: str | Path | Volume | None = None,
) -> ResultSheet:
    """Write a result sheet as a PNG (``path``) and/or a self-contained HTML page (``html``).

    Parameters
    ----------
    result, index, query_study
        As for :func:`make_sheet`.
    path : str or Path, optional
        PNG file to write.
    html : str or Path, optional
        HTML file to write.

    Returns
    -------
    ResultSheet
        The sheet written.

    Raises
    ------
    ConfigError
        Neither file is given, a suffix is wrong (``.png``; ``.html``/``.htm``), or a file cannot be
        written.
    InvalidStudyError, IndexNotFoundError, IndexCorruptError
        As for :func:`make_sheet`.
    """
    if path is None and html is None:
        raise ConfigError("render_sheet needs a PNG path or html=...; give at least one file to write")
    for given, suffixes in ((path, (".png",)), (html, (".html", ".htm"))):
        if given is not None:
            _check_suffix(Path(given), suffixes)
    sheet = make_sheet(result, index, query_study=query_study)
    if path is not None:
        sheet.save_png(path)
    if html is not None:
        sheet.save_html(html)
    return sheet


# -- helpers ----------------------------------------------------------------------------------------

_CSS = (
    "body{font-family:system-ui,sans-serif;font-size:15px;margin:1.5em;color:#111}"
    "h1{font-size:20px}p{margin:.3em 0}table{border-collapse:collapse;margin-top:1em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}"
    "th{background:#f2f2f2}tr.query td{background:#fff4ec}img{display:block;image-rendering:auto}"
    ".placeholder{width:192px;height:192px;display:flex;align-items:center;justify-content:center;"
    "text-align:center;background:#e6e6e6;color:#444;font-size:13px;padding:8px;box-sizing:border-box}"
    ".small{font-size:13px;color:#444;margin-top:1em}"
)


def _open_store(index: str | Path | IndexStore | Searcher) -> IndexStore:
    if isinstance(index, IndexStore):
        return index
    if isinstance(index, Searcher):
        return index.store
    return IndexStore.open(index)


def _preprocess_config(store: IndexStore) -> PreprocessConfig:
    data = (store.manifest.config or {}).get("preprocess") or store.manifest.preprocess
    if not data:
        raise IndexCorruptError(f"index {store.path} records no preprocessing settings; rebuild the index")
    return config_from_dict({"preprocess": dict(data)}, source=f"index {store.path}").preprocess


def matched_picture(
    source: dict[str, Any] | None, index: int, preprocess: PreprocessConfig, size: int,
    box: Sequence[float] | None = None, *, case: CaseRef | None = None,
) -> np.ndarray | None:
    """Slice ``index`` of a result's case, read from its source files (``source``: a link table's
    row, :meth:`QueryResult.resolve`), as a sheet draws it: a ``size`` px thumbnail windowed as the
    sheet windows, with ``box`` (a tile, in pixels of the slice) outlined, then RGB. None where the
    files are not given or cannot be read. ``case``: the files already scanned
    (:func:`scanned_case`), so that only the slice is read."""
    drawn = _source_slice(source, index, preprocess, size, case)
    if drawn is None:
        return None
    image, shape, spacing = drawn
    return _outlined(image, picture_box(box, shape, spacing, size)) if box else image


def scanned_case(source: dict[str, Any] | None) -> CaseRef | None:
    """The case of a link table's row, its headers read (not its pixels); None where its files are
    not given, not all there, not all readable, or not one case (a slice number of the case would
    then name another slice)."""
    listed = [Path(f) for f in (source or {}).get("files", [])]
    files = [f for f in listed if f.is_file()]
    if not files or len(files) < len(listed):
        return None
    try:
        found = scan(files)
    except Exception:  # noqa: BLE001 - a picture is a courtesy: the stored thumbnail stands in
        return None
    return found.cases[0] if len(found.cases) == 1 and len(found.cases[0].files) == len(files) else None


def _source_slice(
    source: dict[str, Any] | None, index: int, preprocess: PreprocessConfig, size: int, case: CaseRef | None = None
) -> tuple[np.ndarray, tuple[int, int], tuple[float, ...]] | None:
    """Slice ``index`` of a result's case, read from its source files (from the link table, or as
    ``case`` scanned them), as a thumbnail, with the slice's shape and the volume's spacing; None
    where the files are not given or cannot be read (the stored thumbnail is drawn)."""
    case = case if case is not None else scanned_case(source)
    if case is None:
        return None
    try:
        volume, _ = load_volume(case, select=lambda depth: [index] if index < depth else [])
        if index >= volume.pixels.shape[0]:
            return None
        picture = make_thumbnail(volume.pixels[index:index + 1], config=preprocess, modality=volume.modality, rgb=volume.rgb,
                                 spacing=volume.spacing, size=size, window=display_window(case.header))
        shape = (int(volume.pixels.shape[1]), int(volume.pixels.shape[2]))
        return picture, shape, tuple(float(v) for v in volume.spacing)
    except Exception:  # noqa: BLE001 - a picture is a courtesy: the stored thumbnail stands in
        return None


def _query_item(
    study: str | Path | Volume | None, preprocess: PreprocessConfig, size: int, matched: int | None = None,
    region_box: Sequence[int] | None = None,
) -> SheetItem:
    if study is None:
        return SheetItem(heading="query", lines=(), fields={"rank": "query"},
                         placeholder="no query picture: give query_study")
    if isinstance(study, Volume):
        volume, window = study, study.window
    else:
        case, volume = load_study(study)
        window = display_window(case.header)
    n = int(volume.pixels.shape[0])
    # the slice that matched the first result, else the middle one
    pixels = volume.pixels[matched:matched + 1] if matched is not None and 0 <= matched < n else volume.pixels
    image = make_thumbnail(pixels, config=preprocess, modality=volume.modality, rgb=volume.rgb,
                           spacing=volume.spacing, size=size, window=window)
    full = middle_picture(pixels, config=preprocess, modality=volume.modality, rgb=volume.rgb,
                          spacing=volume.spacing, window=window)
    where = "1 image" if n == 1 else f"middle of {n} slices"
    if n > 1 and matched is not None and pixels is not volume.pixels:
        where = f"slice {matched + 1} of {n} (matched #1)"
    modality = str(volume.modality or "")
    box = full_box = None
    if region_box:  # the query's box, outlined where it was drawn
        shape = (int(volume.pixels.shape[1]), int(volume.pixels.shape[2]))
        box = picture_box(region_box, shape, volume.spacing, size)
        full_box = picture_box(region_box, shape, volume.spacing)
        where += f", box {','.join(str(int(v)) for v in region_box)}"
    return SheetItem(heading="query", lines=tuple(x for x in (modality, where) if x),
                     fields={"rank": "query", "modality": modality}, image=image, full=full, box=box, full_box=full_box)


def _notes(preprocess: PreprocessConfig, modalities: set[str], distance: str) -> tuple[str, ...]:
    shown = []
    if "CT" in modalities:
        center, width = preprocess.ct_window
        kinds = ", ".join(f"{name} {c:g}/{w:g}" for name, (c, w) in WINDOWS.items() if (c, w) in BODY_PART_WINDOWS.values())
        shown.append(
            f"CT in its body part's window ({kinds} HU) or its file's own, else the index's window: "
            f"center {center:g} HU, width {width:g} HU"
        )
    if modalities - {"CT"} or not modalities:
        low, high = preprocess.percentiles
        shown.append(f"other modalities scaled to their {_ordinal(low)} to {_ordinal(high)} percentile")
    notes = ["; ".join(shown) + "; the middle slice of each case, or the slice its caption says matched"]
    if distance:
        notes.append(f"distance = {distance}")
    return tuple(notes)


def _ordinal(value: float) -> str:
    """``1`` -> ``1st``, ``2`` -> ``2nd``, ``11`` -> ``11th``, ``99`` -> ``99th``, ``2.5`` -> ``2.5th``.

    >>> [_ordinal(v) for v in (1, 2, 3, 4, 11, 12, 13, 21, 99, 2.5)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', '99th', '2.5th']
    """
    if not float(value).is_integer():
        return f"{value:g}th"
    n = int(value)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _draw_picture(ax: Any, item: SheetItem) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if item.image is not None:
        ax.imshow(item.image, cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
        if item.box is not None:
            from matplotlib.patches import Rectangle

            x0, y0, x1, y1 = item.box
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=_BOX_RGB_HEX, linewidth=1.5))
        return
    ax.set_facecolor("#e6e6e6")
    ax.text(0.5, 0.5, _wrap(item.placeholder, 20), ha="center", va="center", fontsize=_FONT_PT - 1,
            color="#444444", transform=ax.transAxes)


def _png_base64(image: np.ndarray, box: tuple[float, float, float, float] | None = None) -> str:
    from matplotlib.image import imsave

    buffer = BytesIO()
    if box is not None:
        image = _outlined(image, box)
    imsave(buffer, image, cmap="gray", vmin=0, vmax=255, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_BOX_RGB = (255, 140, 0)  # the outline of a box: orange, apart from any gray level
_BOX_RGB_HEX = "#ff8c00"


def _outlined(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """A gray picture as RGB, with ``box`` outlined 2 px wide (clipped to the picture)."""
    rgb = np.repeat(image[:, :, None], 3, axis=2).astype(np.uint8)
    height, width = image.shape[:2]
    x0, y0 = (max(0, min(int(round(v)), limit - 1)) for v, limit in ((box[0], width), (box[1], height)))
    x1, y1 = (max(0, min(int(round(v)) - 1, limit - 1)) for v, limit in ((box[2], width), (box[3], height)))
    for edge in (rgb[y0:y0 + 2, x0:x1 + 1], rgb[max(y1 - 1, 0):y1 + 1, x0:x1 + 1],
                 rgb[y0:y1 + 1, x0:x0 + 2], rgb[y0:y1 + 1, max(x1 - 1, 0):x1 + 1]):
        edge[...] = _BOX_RGB
    return rgb


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _join(*parts: str) -> str:
    return " · ".join(p for p in parts if p)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _check_suffix(path: Path, suffixes: Sequence[str]) -> None:
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"sheet file {path} must end in {' or '.join(suffixes)}; give a name like sheet{suffixes[0]}")


def _write(path: str | Path, suffixes: Sequence[str], data: bytes) -> Path:
    path = Path(path)
    _check_suffix(path, suffixes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise ConfigError(f"cannot write sheet {path} ({e.strerror}); give a writable path") from e
    return path
