// medsearch: the query's image: its slices, windowed, on a canvas.
import { $, els, state, api, sentence } from "./page.js";
import { remember } from "./filters.js";
import { outline, regionHint } from "./region.js";

export async function showStudy(preview, query) {
  state.preview = preview;
  state.slices = new Map();
  if (!preview) { els.viewer.hidden = true; els.window.hidden = true; els.slicer.hidden = true; els.region.hidden = true; return; }
  const n = preview.slices.length;
  els.canvas.width = preview.columns;
  els.canvas.height = preview.rows;
  const [, dy, dx] = preview.spacing;
  els.canvas.style.aspectRatio = `${preview.columns * dx} / ${preview.rows * dy}`;
  buildPresets(preview);
  state.window = windowOf(state.preset, preview);
  els.slicer.hidden = n < 2;
  els.slice.max = String(n - 1);
  state.current = Math.floor((n - 1) / 2);
  els.slice.value = String(state.current);
  const parts = [query.modality || "", preview.n_slices > 1 ? `${preview.n_slices} slices` : "one image",
    `${preview.columns} × ${preview.rows} px`];
  if (n < preview.n_slices) parts.push(`${n} slices shown`);
  els.caption.textContent = parts.filter(Boolean).join(" · ");
  els.viewer.hidden = false;
  els.region.hidden = !(state.options && state.options.features && state.options.features.regions);
  els.slabRow.hidden = preview.n_slices < 2;
  for (const input of [els.slabFrom, els.slabTo]) input.max = String(preview.n_slices);
  regionHint();
  els.window.hidden = preview.format !== "int16";
  els.drop.classList.add("compact");
  $("drop-title").textContent = "Drop another study here";
  await drawSlice(state.current);
}

export function buildPresets(preview) {
  els.presets.textContent = "";
  const names = ["auto", ...Object.keys(preview.presets || {})];
  if (!names.includes(state.preset)) state.preset = "auto";
  for (const name of names) {
    const id = "preset-" + name.replace(/\W+/g, "-");
    const input = document.createElement("input");
    Object.assign(input, { type: "radio", name: "preset", id, value: name, checked: name === state.preset });
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = name === "auto" ? (preview.window.source === "header" ? "Auto (from the file)" : "Auto") : sentence(name);
    input.addEventListener("change", () => {
      state.preset = name;
      state.window = windowOf(name, preview);
      draw();
      remember(false);
    });
    els.presets.append(input, label);
  }
}

export function windowOf(name, preview) {
  const w = name !== "auto" && preview.presets && preview.presets[name] ? preview.presets[name] : preview.window;
  return { center: w.center, width: w.width };
}

export async function slicePixels(index) {
  if (!state.slices.has(index)) {
    const token = state.study;
    const buffer = await api(`/api/study/${encodeURIComponent(token)}/slice/${index}`);
    if (token !== state.study) return null;
    state.slices.set(index, state.preview.format === "int16" ? new Int16Array(buffer) : new Uint8Array(buffer));
  }
  return state.slices.get(index);
}

export async function drawSlice(index) {
  const pixels = await slicePixels(index);
  if (pixels === null || index !== state.current) return;
  draw();
  const p = state.preview;
  els.sliceOut.textContent = `${p.slices[index] + 1} of ${p.n_slices}`;
  regionHint();
  // the neighbours next, so that the slider moves without waiting
  for (const next of [index + 1, index - 1]) if (next >= 0 && next < p.slices.length) slicePixels(next).catch(() => {});
}

export function draw() {
  const p = state.preview;
  const pixels = p && state.slices.get(state.current);
  if (!pixels) return;
  const ctx = els.canvas.getContext("2d");
  const image = ctx.createImageData(p.columns, p.rows);
  const out = image.data;
  if (p.format === "int16") {
    // one lookup table over the 65,536 stored values, then one lookup per pixel
    const lut = new Uint8ClampedArray(65536);
    const low = state.window.center - state.window.width / 2;
    const span = Math.max(state.window.width, 1e-6);
    for (let s = 0; s < 65536; s++) lut[s] = (((s - 32768) * p.scale + p.offset - low) / span) * 255;
    for (let i = 0, j = 0; i < pixels.length; i++, j += 4) {
      const g = lut[pixels[i] + 32768];
      out[j] = g; out[j + 1] = g; out[j + 2] = g; out[j + 3] = 255;
    }
    const c = Math.round(state.window.center), w = Math.round(state.window.width);
    els.windowValue.textContent = `Level ${c}, width ${w}${p.modality === "CT" ? " HU" : ""}`;
  } else {
    for (let i = 0, j = 0; i < pixels.length; i += 3, j += 4) {
      out[j] = pixels[i]; out[j + 1] = pixels[i + 1]; out[j + 2] = pixels[i + 2]; out[j + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  outline(ctx);
  els.canvas.dataset.drawn = "true";
}
