// medsearch: the page of `medsearch serve`. Drop a study, see its most similar cases.
// Vanilla JavaScript modules, no library, no request to anywhere but this service: page.js (its
// elements, state, the service), filters.js, send.js, viewer.js, region.js, results.js; here the
// controls are wired to what they do.
import { $, els, CHOICES, state, api, showError } from "./page.js";
import { fillOptions, labelControls, applyParams } from "./filters.js";
import { sendFiles, fetchFromPacs, searchAgain, droppedFiles } from "./send.js";
import { buildPresets, windowOf, drawSlice, draw } from "./viewer.js";
import { fieldBox, regionHint, setDrawing, slabHere, imagePoint, dragTo, searchRegion, searchWhole } from "./region.js";
import { openQuery } from "./results.js";

function wire() {
  els.chooseFiles.addEventListener("click", () => els.files.click());
  els.chooseFolder.addEventListener("click", () => els.folder.click());
  for (const input of [els.files, els.folder]) {
    input.addEventListener("change", () => { const files = Array.from(input.files || []); input.value = ""; sendFiles(files); });
  }
  els.drop.addEventListener("dragover", (e) => { e.preventDefault(); els.drop.classList.add("over"); });
  els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
  els.drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    els.drop.classList.remove("over");
    sendFiles(await droppedFiles(e.dataTransfer));
  });
  // a file dropped anywhere else would make the browser leave the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  els.form.addEventListener("submit", (e) => { e.preventDefault(); searchAgain(true); });
  els.form.addEventListener("change", (e) => { if (e.target !== els.k || els.k.checkValidity()) searchAgain(true); });
  els.reset.addEventListener("click", () => {
    for (const name of CHOICES) $("f-" + name).value = "";
    els.ageMin.value = ""; els.ageMax.value = "";
    for (const control of labelControls()) control.value = "";
    els.exclude.checked = false; els.one.checked = false;
    searchAgain(true);
  });
  els.slice.addEventListener("input", () => { state.current = Number(els.slice.value); drawSlice(state.current).catch((e) => showError(e.message)); });
  els.viewerOpen.addEventListener("click", (e) => { if (state.drawing || state.drew) e.preventDefault(); else openQuery(); });
  els.canvas.addEventListener("pointerdown", (e) => {
    if (!state.drawing || !state.preview) return;
    e.preventDefault();
    els.canvas.setPointerCapture(e.pointerId);
    state.drag = imagePoint(e);
  });
  els.canvas.addEventListener("pointermove", (e) => { if (state.drag) dragTo(e); });
  for (const end of ["pointerup", "pointercancel"]) {
    els.canvas.addEventListener(end, (e) => {
      if (!state.drag) return;
      dragTo(e);
      state.drag = null;
      if (fieldBox()) setDrawing(false);
      state.drew = true;  // the click that ends a drag does not open the large view
      setTimeout(() => { state.drew = false; }, 0);
    });
  }
  els.drawBox.addEventListener("click", () => setDrawing(!state.drawing));
  els.slabStart.addEventListener("click", () => slabHere(false));
  els.slabEnd.addEventListener("click", () => slabHere(true));
  for (const input of [els.slabFrom, els.slabTo, els.box]) input.addEventListener("input", () => { draw(); regionHint(); });
  for (const input of [els.slabFrom, els.slabTo, els.box]) {
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); searchRegion(); } });
  }
  els.regionSearch.addEventListener("click", () => searchRegion());
  els.regionClear.addEventListener("click", () => searchWhole());
  els.pacs.addEventListener("submit", (e) => { e.preventDefault(); fetchFromPacs(els.studyUid.value.trim()); });
  window.addEventListener("popstate", () => restore());
}

async function restore() {
  const p = new URLSearchParams(location.search);
  applyParams(p);
  const token = p.get("study");
  if (token && token !== state.study) { state.study = token; state.preview = null; }
  if (!token) { state.study = null; return; }
  if (state.preview) { buildPresets(state.preview); state.window = windowOf(state.preset, state.preview); draw(); }
  await searchAgain(false);
}

async function start() {
  wire();
  try {
    fillOptions(await api("/api/options"));
  } catch (e) {
    showError(e.message);
    return;
  }
  await restore();
  document.body.dataset.ready = "true";
}

start();
