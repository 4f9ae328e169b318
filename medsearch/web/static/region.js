// medsearch: a region of the study: a slab of slices and a box drawn on the image.
import { els, state, showError } from "./page.js";
import { queryString } from "./filters.js";
import { formOf, post, searchAgain } from "./send.js";
import { drawSlice, draw } from "./viewer.js";

// The boxes on the slice shown: the box of the fields (solid), and what the encoder saw of the box
// searched, where the service widened it to its index's tiles (dashed).
export function outline(ctx) {
  const p = state.preview, stack = p.slices[state.current];
  const line = Math.max(1, Math.round(Math.max(p.columns, p.rows) / 256));
  const r = state.region;
  if (r && r.embedded_box && within(r.slices, stack) && String(r.embedded_box) !== String(r.roi)) {
    stroke(ctx, r.embedded_box, "#5ec8f2", line, [4 * line, 3 * line]);
  }
  const box = fieldBox();
  const slab = fieldSlab();
  if (box && (!slab || (stack >= slab[0] && stack < slab[1]))) stroke(ctx, box, "#ffd23f", line, []);
}

export function within(slices, stack) { return !slices || (stack >= slices[0] && stack < slices[1]); }

export function stroke(ctx, [x0, y0, x1, y1], color, line, dash) {
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = line;
  ctx.setLineDash(dash);
  ctx.strokeRect(x0 + line / 2, y0 + line / 2, Math.max(1, x1 - x0 - line), Math.max(1, y1 - y0 - line));
  ctx.restore();
}

// The box of its field, when it reads as four whole numbers (else null).
export function fieldBox() {
  const v = els.box.value.split(/[\s,]+/).filter(Boolean).map(Number);
  return v.length === 4 && v.every(Number.isInteger) ? v : null;
}

// The slab of the fields as stack slices [start, stop) from 0, when given (one field: one slice).
export function fieldSlab() {
  const from = els.slabFrom.value.trim(), to = els.slabTo.value.trim();
  if (els.slabRow.hidden || (from === "" && to === "")) return null;
  const a = Number(from !== "" ? from : to), b = Number(to !== "" ? to : from);
  return [a - 1, b];
}

// The region of the fields as the service takes it ({slices: "START:STOP", roi: "X0,Y0,X1,Y1"}); an
// Error says what to change. A box without slices lies on the slice shown.
export function regionAsked() {
  const p = state.preview;
  const slab = fieldSlab();
  const out = {};
  if (slab) {
    const [a, b] = slab;
    if (!Number.isInteger(a) || !Number.isInteger(b) || a < 0 || b > p.n_slices || a >= b) {
      throw new Error(`give the slices as two numbers from 1 to ${p.n_slices}, the first not above the second`);
    }
    out.slices = `${a}:${b}`;
  }
  if (els.box.value.trim()) {
    const box = fieldBox();
    if (!box) throw new Error("give the box as four whole pixel numbers x0,y0,x1,y1 (x across, y down), or draw it on the image");
    const [x0, y0, x1, y1] = box;
    if (!(x0 >= 0 && x0 < x1 && x1 <= p.columns && y0 >= 0 && y0 < y1 && y1 <= p.rows)) {
      throw new Error(`the box must lie within the ${p.columns} × ${p.rows} px image, with x0 below x1 and y0 below y1`);
    }
    out.roi = box.join(",");
    if (!out.slices) out.slices = `${p.slices[state.current]}:${p.slices[state.current] + 1}`;
  }
  if (!out.slices) throw new Error("choose slices (Start here, End here) or draw a box on the image first");
  return out;
}

export function describeRegion(slices, roi) {
  const parts = [];
  if (slices) parts.push(slices[1] - slices[0] === 1 ? `slice ${slices[0] + 1}` : `slices ${slices[0] + 1}–${slices[1]}`);
  if (roi) parts.push(`box ${roi[0]},${roi[1]}–${roi[2]},${roi[3]} px`);
  return parts.join(", ");
}

export function regionHint() {
  if (!state.preview) return;
  let text;
  if (state.drawing) {
    text = "Drag on the image to draw the box.";
  } else {
    const slab = fieldSlab(), box = fieldBox();
    if (!slab && !box) {
      text = state.preview.n_slices > 1 ? "Choose slices with Start here and End here, or draw a box." : "Draw a box on the image.";
    } else {
      const shown = state.preview.slices[state.current];
      text = "Will search " + describeRegion(slab || (box ? [shown, shown + 1] : null), box) + (!slab && box && state.preview.n_slices > 1 ? " (the slice shown)." : ".");
    }
  }
  const r = state.region;
  if (r && r.embedded_box && String(r.embedded_box) !== String(r.roi)) {
    text += " Dashed: what the encoder saw of the box searched (widened to the tiles the index keeps).";
  }
  els.regionHint.textContent = text;
}

export function showRegion(region) {
  state.region = region;
  if (region.slices) { els.slabFrom.value = String(region.slices[0] + 1); els.slabTo.value = String(region.slices[1]); }
  els.box.value = region.roi ? region.roi.join(",") : "";
  if (region.roi && region.slices && region.slices[1] - region.slices[0] === 1) {
    const at = state.preview ? state.preview.slices.indexOf(region.slices[0]) : -1;  // show the slice the box was drawn on
    if (at >= 0 && at !== state.current) { state.current = at; els.slice.value = String(at); drawSlice(at).catch(() => {}); }
  }
  draw();
  regionHint();
}

export function clearRegion() {
  els.slabFrom.value = ""; els.slabTo.value = ""; els.box.value = "";
  state.region = null;
  setDrawing(false);
}

export function setDrawing(on) {
  state.drawing = on;
  state.drag = null;
  els.drawBox.setAttribute("aria-pressed", String(on));
  els.viewer.classList.toggle("drawing", on);
  regionHint();
}

export function slabHere(end) {
  const s = state.preview.slices[state.current] + 1;
  const from = Number(els.slabFrom.value), to = Number(els.slabTo.value);
  if (end) {
    els.slabTo.value = String(s);
    if (els.slabFrom.value === "" || from > s) els.slabFrom.value = String(s);
  } else {
    els.slabFrom.value = String(s);
    if (els.slabTo.value === "" || to < s) els.slabTo.value = String(s);
  }
  draw();
  regionHint();
}

// A pointer's place on the image, in image pixels (the canvas may be letterboxed on a narrow screen).
export function imagePoint(e) {
  const p = state.preview;
  const rect = els.canvas.getBoundingClientRect();
  let sx = rect.width / p.columns, sy = rect.height / p.rows, ox = 0, oy = 0;
  if (getComputedStyle(els.canvas).objectFit === "contain") {
    const s = Math.min(sx, sy);
    ox = (rect.width - p.columns * s) / 2; oy = (rect.height - p.rows * s) / 2; sx = s; sy = s;
  }
  const x = (e.clientX - rect.left - ox) / sx, y = (e.clientY - rect.top - oy) / sy;
  return [Math.min(Math.max(x, 0), p.columns), Math.min(Math.max(y, 0), p.rows)];
}

export function dragTo(e) {
  const [ax, ay] = state.drag, [bx, by] = imagePoint(e);
  const x0 = Math.floor(Math.min(ax, bx)), x1 = Math.ceil(Math.max(ax, bx));
  const y0 = Math.floor(Math.min(ay, by)), y1 = Math.ceil(Math.max(ay, by));
  if (x1 - x0 < 2 || y1 - y0 < 2) return;  // a click, not a box
  els.box.value = `${x0},${y0},${x1},${y1}`;
  draw();
}

export async function searchRegion() {
  let region;
  try {
    region = regionAsked();
  } catch (e) {
    showError(e.message);
    return;
  }
  if (!state.source) {
    showError("The service keeps no file of a study: drop the study again (or fetch it again) to search a region of it.");
    return;
  }
  const q = queryString();
  q.set("slices", region.slices);
  if (region.roi) q.set("roi", region.roi);
  setDrawing(false);
  if (state.source.files) {
    await post(q, formOf(state.source.files), "Sending the study again and searching the region…");
  } else {
    q.set("study_uid", state.source.uid);
    await post(q, undefined, "Fetching the study from the PACS again and searching the region…");
  }
}

export async function searchWhole() {
  const searched = state.region !== null;
  clearRegion();
  draw();
  if (!searched) return;
  if (state.wholeStudy) {
    state.study = state.wholeStudy;
    await searchAgain(true);
  } else if (state.source && state.source.files) {
    await post(queryString(), formOf(state.source.files), "Sending the study again and searching…");
  } else if (state.source) {
    const q = queryString();
    q.set("study_uid", state.source.uid);
    await post(q, undefined, "Fetching the study from the PACS again and searching…");
  } else {
    showError("The service keeps no file of a study: drop the study again to search it whole.");
  }
}
