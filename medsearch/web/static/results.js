// medsearch: the results: a card each, and the large view of a case or of the query.
import { els, HEADINGS, state, showError, sentence } from "./page.js";
import { drawSlice } from "./viewer.js";
import { describeRegion } from "./region.js";

export function showResults(answer) {
  const results = answer.results || [];
  els.results.textContent = "";
  els.empty.hidden = results.length > 0;
  if (!results.length) els.empty.textContent = "No case of the index matches these filters. Clear a filter to see more.";
  const labels = answer.labels || [];
  for (const match of results) els.results.append(card(match, labels));
  const excluded = (answer.query && answer.query.excluded) || {};
  const left = [];
  if (excluded.same_patient) left.push(`${excluded.same_patient} of the same patient`);
  if (excluded.other_cases_of_patient) left.push(`${excluded.other_cases_of_patient} more of a patient already shown`);
  if (excluded.copies) left.push(`${excluded.copies} exact ${excluded.copies === 1 ? "copy" : "copies"}`);
  const shown = results.length === 1 ? "1 case" : `${results.length} cases`;
  const matching = answer.query && answer.query.matching_cases !== undefined
    ? ` of ${answer.query.matching_cases} matching the filters` : "";
  const region = answer.query && answer.query.region;
  const of = region ? ` · like ${describeRegion(region.slices, region.roi)} of the query` : "";
  els.summary.textContent = results.length ? `${shown}${matching}, closest first${of}` : "";
  const notes = [];
  const rerank = (answer.query && answer.query.rerank) || {};
  if (rerank.crop_note) notes.push(sentence(rerank.crop_note) + ".");
  if (rerank.layout) notes.push("Slices were matched whole and tile by tile, each tile with the one at the same place.");
  if (left.length) notes.push(`Left out: ${left.join(", ")}.`);
  notes.push(`Distance: ${answer.distance}.`);
  const slices = ((state.options && state.options.features) || {}).case_slices && results.some((m) => m.best_slice !== undefined);
  notes.push(slices ? "Pictures are the slice of each case that matched best (the box it matched outlined), read from the archive; case ids are keyed pseudonyms."
    : "Pictures are the thumbnails the index stored; case ids are keyed pseudonyms.");
  els.note.textContent = notes.join(" ");
}

export function card(match, labels) {
  const li = document.createElement("li");
  li.className = "card";
  li.setAttribute("data-testid", "result");
  const open = document.createElement("button");
  open.type = "button";
  open.className = "thumb";
  open.setAttribute("aria-label", `Case ${match.rank}: open larger`);
  const slice = matchedSlice(match);
  const picture = thumbnail(match, slice ? `Slice ${match.best_slice + 1} of case ${match.case_id}, where it matched best`
    : `Thumbnail of case ${match.case_id}`, slice);
  open.append(picture);
  open.addEventListener("click", () => openDetail(match, labels));
  const head = document.createElement("div");
  head.className = "card-head";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${match.rank}`;
  const distance = document.createElement("span");
  distance.className = "distance";
  distance.setAttribute("data-testid", "distance");
  distance.title = "distance to the query: lower is closer";
  distance.textContent = Number(match.distance).toFixed(4);
  head.append(rank, distance);
  const meta = match.metadata || {};
  const lines = document.createElement("dl");
  lines.className = "card-fields";
  const add = (term, value) => {
    if (value === null || value === undefined || value === "") return;
    const dt = document.createElement("dt"); dt.textContent = term;
    const dd = document.createElement("dd"); dd.textContent = shownValue(value);
    lines.append(dt, dd);
  };
  add("Study", [meta.modality, meta.body_part].filter(Boolean).join(" · "));
  add("Patient", [meta.sex, meta.age_band ? `${meta.age_band} y` : ""].filter(Boolean).join(" · "));
  add("Scanner", meta.model);
  for (const name of labels) add(name, meta[name]);
  const best = bestSlice(match);
  if (best) add("Best slice", best);
  if (match.best_box) add("Matched box", boxText(match.best_box));
  const id = document.createElement("p");
  id.className = "case-id";
  id.textContent = match.case_id;
  li.append(open, head, lines);
  const show = showQuerySlice(match);
  if (show) li.append(show);
  li.append(id);
  return li;
}

// A button that shows, in the viewer, the query's slice this result matched (a series query).
export function showQuerySlice(match) {
  const p = state.preview;
  if (!p || p.n_slices < 2 || match.query_slice === undefined || match.query_slice === null) return null;
  const at = p.slices.indexOf(match.query_slice);
  if (at < 0) return null;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "quiet small show-slice";
  button.textContent = `Show query slice ${match.query_slice + 1}`;
  button.addEventListener("click", () => {
    state.current = at;
    els.slice.value = String(at);
    drawSlice(at).catch((e) => showError(e.message));
    els.viewer.scrollIntoView({ block: "nearest" });
  });
  return button;
}

// A value as the index's case table and its filters write it (True, not true).
export function shownValue(value) {
  return typeof value === "boolean" ? (value ? "True" : "False") : String(value);
}

// For a series: which slice of the result matched best (when the service says so).
export function bestSlice(match) {
  if (match.best_slice === undefined || match.best_slice === null) return "";
  const of = match.metadata && match.metadata.n_slices ? ` of ${match.metadata.n_slices}` : "";
  const query = match.query_slice !== undefined && match.query_slice !== null ? ` (query slice ${match.query_slice + 1})` : "";
  return `${match.best_slice + 1}${of}${query}`;
}

export function boxText([x0, y0, x1, y1]) { return `${x0},${y0}–${x1},${y1} px`; }

// The slice of a result that matched best, read from the archive by the service (when it has the
// index's link table), with the tile it matched outlined; null: the stored thumbnail is shown.
export function matchedSlice(match) {
  const features = (state.options && state.options.features) || {};
  if (!features.case_slices || match.best_slice === undefined || match.best_slice === null) return null;
  const box = match.best_box ? `?box=${match.best_box.join(",")}` : "";
  return `/api/case/${encodeURIComponent(match.case_id)}/slice/${match.best_slice}${box}`;
}

// A result's picture: `first` (its matched slice) when given, else or when that cannot be read its stored thumbnail.
export function thumbnail(match, alt, first) {
  const img = document.createElement("img");
  img.alt = alt;
  img.decoding = "async";
  img.addEventListener("error", () => {
    if (first && match.thumbnail && img.getAttribute("src") !== match.thumbnail) {
      img.alt = `Thumbnail of case ${match.case_id} (its matched slice cannot be read)`;
      img.src = match.thumbnail;
      return;
    }
    const none = document.createElement("span");
    none.className = "no-picture";
    none.textContent = "no picture stored";
    img.replaceWith(none);
  });
  const src = first || match.thumbnail;
  if (src) img.src = src; else img.dispatchEvent(new Event("error"));
  return img;
}

export function openDetail(match, labels) {
  els.detailTitle.textContent = `#${match.rank} · case ${match.case_id} · distance ${Number(match.distance).toFixed(4)}`;
  els.detailPicture.textContent = "";
  const slice = matchedSlice(match);
  els.detailPicture.append(thumbnail(match, slice ? `Case ${match.case_id}, its best-matching slice, larger` : `Case ${match.case_id}, larger`, slice));
  els.detailFields.textContent = "";
  const meta = match.metadata || {};
  const names = [...labels, ...Object.keys(meta).filter((n) => !labels.includes(n))];
  for (const name of names) {
    const value = meta[name];
    if (value === null || value === undefined || value === "") continue;
    const dt = document.createElement("dt"); dt.textContent = HEADINGS[name] || name;
    const dd = document.createElement("dd"); dd.textContent = shownValue(value);
    els.detailFields.append(dt, dd);
  }
  const best = bestSlice(match);
  if (best) {
    const dt = document.createElement("dt"); dt.textContent = "Best-matching slice";
    const dd = document.createElement("dd"); dd.textContent = best;
    els.detailFields.append(dt, dd);
  }
  if (match.best_box) {
    const dt = document.createElement("dt"); dt.textContent = "Best-matching box (on that slice)";
    const dd = document.createElement("dd"); dd.textContent = boxText(match.best_box);
    els.detailFields.append(dt, dd);
  }
  els.detailNote.textContent = slice
    ? "The picture is the slice of this case that matched best, read from the archive" + (match.best_box ? ", with the box it matched outlined." : ".")
    : "The picture is the thumbnail the index stored for this case (its middle slice, windowed as at indexing).";
  els.detail.showModal();
}

export function openQuery() {
  if (!state.preview) return;
  els.detailTitle.textContent = "Query study, full resolution";
  els.detailPicture.textContent = "";
  const copy = document.createElement("canvas");
  copy.width = els.canvas.width;
  copy.height = els.canvas.height;
  copy.className = "full";
  copy.style.aspectRatio = els.canvas.style.aspectRatio;
  copy.getContext("2d").drawImage(els.canvas, 0, 0);
  copy.setAttribute("role", "img");
  copy.setAttribute("aria-label", "The query image at full resolution");
  els.detailPicture.append(copy);
  els.detailFields.textContent = "";
  els.detailNote.textContent = els.caption.textContent + (els.windowValue.textContent ? " · " + els.windowValue.textContent : "");
  els.detail.showModal();
}
