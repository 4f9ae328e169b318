// medsearch: the page of `medsearch serve`. Drop a study, see its most similar cases.
// Vanilla JavaScript, no library, no request to anywhere but this service.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    drop: $("drop"), files: $("files"), folder: $("folder"), chooseFiles: $("choose-files"), chooseFolder: $("choose-folder"),
    pacs: $("pacs"), studyUid: $("study-uid"), viewer: $("viewer"), canvas: $("image"), viewerOpen: $("viewer-open"), caption: $("viewer-caption"),
    window: $("window"), presets: $("presets"), windowValue: $("window-value"),
    slicer: $("slicer"), slice: $("slice"), sliceOut: $("slice-out"),
    region: $("region"), slabRow: $("slab-row"), slabFrom: $("slab-from"), slabTo: $("slab-to"), slabStart: $("slab-start"),
    slabEnd: $("slab-end"), box: $("box"), drawBox: $("draw-box"), regionHint: $("region-hint"), regionSearch: $("region-search"),
    regionClear: $("region-clear"),
    form: $("query"), k: $("k"), ageMin: $("age-min"), ageMax: $("age-max"), labelFields: $("label-fields"),
    exclude: $("exclude"), excludeLabel: $("exclude-label"), one: $("one"), oneLabel: $("one-label"), reset: $("reset"),
    error: $("error"), status: $("status"), empty: $("empty"), results: $("results"), note: $("note"), summary: $("summary"),
    info: $("index-info"), signout: $("signout"), user: $("user"),
    detail: $("detail"), detailTitle: $("detail-title"), detailPicture: $("detail-picture"), detailFields: $("detail-fields"),
    detailNote: $("detail-note"),
  };
  const CHOICES = ["modality", "body_part", "sex"];
  const HEADINGS = {
    modality: "Modality", body_part: "Body part", sex: "Sex", age_band: "Age", model: "Scanner model",
    manufacturer: "Manufacturer", n_slices: "Slices", spacing_mm: "Spacing (mm)", rows: "Rows", columns: "Columns",
    patient_size_m: "Size (m)", patient_weight_kg: "Weight (kg)", sop_class: "Kind of image", photometric: "Photometric",
    patient: "Patient (pseudonym)", n_files: "Files", study_date_shifted: "Study date (shifted)",
  };
  const state = {
    options: null,
    study: null,        // token of the study the service keeps
    preview: null,      // how to draw it
    slices: new Map(),  // preview slice index -> typed array
    current: 0,         // preview slice shown
    window: null,       // {center, width}
    preset: "auto",
    busy: 0,
    lastQuery: "",
    source: null,       // what was sent, to send again for a region: {files} or {uid} (the service keeps no file)
    wholeStudy: null,   // token of the whole study's query, when the page sent it
    region: null,       // the region the results are for: {slices: [start, stop], roi, embedded_box}, as the answer says
    drawing: false,     // whether a drag on the image draws the box
    drag: null,         // where a drag started, in image pixels
    drew: false,        // a drag just ended (its click is not a click on the image)
  };

  // -- talking to the service ------------------------------------------------------------------

  async function api(url, init) {
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", ...init });
    } catch (e) {
      throw new Error("The medsearch service does not answer. Check that `medsearch serve` is running, then try again.");
    }
    if (response.status === 401) {
      window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
      throw new Error("Please sign in again.");
    }
    const type = response.headers.get("content-type") || "";
    if (!response.ok) {
      let message = `The service answered ${response.status}.`;
      if (type.includes("application/json")) {
        const body = await response.json().catch(() => null);
        if (body && typeof body.error === "string") message = body.error;
      }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return type.includes("application/json") ? response.json() : response.arrayBuffer();
  }

  function showError(message) {
    els.error.textContent = message ? sentence(message) : "";
    els.error.hidden = !message;
  }

  function sentence(text) {
    const t = String(text).trim();
    return t.charAt(0).toUpperCase() + t.slice(1);
  }

  function setStatus(text) { els.status.textContent = text || ""; }

  // -- filters and the URL ----------------------------------------------------------------------

  function fillOptions(options) {
    state.options = options;
    const tally = options.cases === 1 ? "1 case" : `${options.cases.toLocaleString()} cases`;
    els.info.textContent = `${tally} · encoder ${options.encoder}`;
    els.empty.textContent = `Drop a study to see the cases of this index (${tally}) that look most like it.`;
    els.k.max = String(options.k.max);
    for (const name of CHOICES) {
      const select = $("f-" + name);
      const values = (options.fields || {})[name] || [];
      for (const [value, count] of values) select.append(new Option(`${value} (${count})`, value));
      select.closest(".field").hidden = values.length === 0;
    }
    if (options.age) {
      for (const input of [els.ageMin, els.ageMax]) { input.min = "0"; input.max = String(options.age.max + 10); }
    } else {
      els.ageMin.closest("fieldset").hidden = true;
    }
    for (const [name, values] of Object.entries(options.labels || {})) {
      const wrap = document.createElement("div");
      wrap.className = "field";
      const id = "l-" + name.replace(/[^A-Za-z0-9_-]/g, "_");
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = name;
      let control;
      if (values) {
        control = document.createElement("select");
        control.append(new Option("any", ""));
        for (const [value, count] of values) control.append(new Option(`${value} (${count})`, value));
      } else {
        control = document.createElement("input");
        control.placeholder = "any";
      }
      control.id = id;
      control.dataset.label = name;
      wrap.append(label, control);
      els.labelFields.append(wrap);
    }
    const features = options.features || {};
    els.excludeLabel.hidden = !features.exclude_same_patient;
    els.oneLabel.hidden = !features.one_per_patient;
    els.pacs.hidden = !features.dicomweb;
    if (options.user) {
      els.user.textContent = `Signed in as ${options.user}`;
      els.signout.hidden = false;
    }
  }

  function labelControls() { return Array.from(els.labelFields.querySelectorAll("[data-label]")); }

  // The query as URL parameters: what the address bar keeps, so a result page can be shared and reloaded.
  function formParams() {
    const p = new URLSearchParams();
    if (state.study) p.set("study", state.study);
    p.set("k", String(clampK(els.k.value)));
    for (const name of CHOICES) { const v = $("f-" + name).value; if (v) p.set(name, v); }
    if (els.ageMin.value !== "") p.set("age_min", els.ageMin.value);
    if (els.ageMax.value !== "") p.set("age_max", els.ageMax.value);
    for (const control of labelControls()) if (control.value.trim()) p.set("label." + control.dataset.label, control.value.trim());
    if (els.exclude.checked && !els.excludeLabel.hidden) p.set("exclude_same_patient", "1");
    if (els.one.checked && !els.oneLabel.hidden) p.set("one_per_patient", "1");
    if (state.preset !== "auto") p.set("window", state.preset);
    return p;
  }

  function applyParams(p) {
    if (p.has("k")) els.k.value = String(clampK(p.get("k")));
    for (const name of CHOICES) {
      const select = $("f-" + name);
      const v = p.get(name) || "";
      if (v && !Array.from(select.options).some((o) => o.value === v)) select.append(new Option(v, v));
      select.value = v;
    }
    els.ageMin.value = p.get("age_min") || "";
    els.ageMax.value = p.get("age_max") || "";
    for (const control of labelControls()) {
      const v = p.get("label." + control.dataset.label) || "";
      if (control.tagName === "SELECT" && v && !Array.from(control.options).some((o) => o.value === v)) control.append(new Option(v, v));
      control.value = v;
    }
    els.exclude.checked = p.get("exclude_same_patient") === "1";
    els.one.checked = p.get("one_per_patient") === "1";
    state.preset = p.get("window") || "auto";
  }

  function clampK(value) {
    const max = state.options ? state.options.k.max : 1000;
    const n = Math.round(Number(value));
    return Number.isFinite(n) ? Math.min(Math.max(n, 1), max) : 10;
  }

  // The filters as `where` terms, as `medsearch query --where` takes them.
  function queryString() {
    const q = new URLSearchParams();
    q.set("k", String(clampK(els.k.value)));
    for (const name of CHOICES) { const v = $("f-" + name).value; if (v) q.append("where", `${name}=${v}`); }
    if (els.ageMin.value !== "") q.append("where", `age>=${Number(els.ageMin.value)}`);
    if (els.ageMax.value !== "") q.append("where", `age<=${Number(els.ageMax.value)}`);
    for (const control of labelControls()) {
      const v = control.value.trim();
      if (v) q.append("where", `${control.dataset.label}=${v}`);
    }
    if (els.exclude.checked && !els.excludeLabel.hidden) q.set("exclude_same_patient", "true");
    if (els.one.checked && !els.oneLabel.hidden) q.set("one_per_patient", "true");
    return q;
  }

  function remember(push) {
    const url = location.pathname + "?" + formParams().toString();
    if (url === location.pathname + location.search) return;
    if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  }

  // -- sending a study -------------------------------------------------------------------------

  async function sendFiles(files) {
    files = files.filter((f) => f && f.size > 0);
    if (!files.length) { showError("No file was dropped: drop a DICOM file, several files, or a series folder."); return; }
    const total = files.reduce((sum, f) => sum + f.size, 0);
    const limit = state.options ? state.options.max_upload_bytes : Infinity;
    if (total > limit) {
      showError(`These files hold ${mb(total)}, more than the ${mb(limit)} this service accepts; give one series.`);
      return;
    }
    const what = files.length === 1 ? `1 file (${mb(total)})` : `${files.length} files (${mb(total)})`;
    state.source = { files };
    await post(queryString(), formOf(files), `Sending ${what} and searching…`);
  }

  function formOf(files) {
    const form = new FormData();
    // File names are not sent: a name on a clinician's disk may name the patient.
    files.forEach((file, i) => form.append("file", file, `file-${i + 1}.dcm`));
    return form;
  }

  // A study sent (files, or a Study UID in `q`), whole or a region of it; a region keeps the view as it is.
  async function post(q, body, message) {
    await run(message, async () => {
      const answer = await api("/api/search?" + q.toString(), { method: "POST", body });
      const region = answer.query && answer.query.region;
      state.study = answer.study;
      if (region && state.preview) {
        showRegion(region);
      } else {
        state.wholeStudy = region ? null : answer.study;
        clearRegion();
        await showStudy(answer.preview, answer.query);
        if (region) showRegion(region);
      }
      showResults(answer);
      remember(true);
    });
  }

  // The study is fetched by the service from its PACS (no file leaves this computer); the UID goes
  // in the request only, never into the page's address.
  async function fetchFromPacs(uid) {
    if (!uid) { showError("Type the Study Instance UID of the study to fetch."); return; }
    const q = queryString();
    q.set("study_uid", uid);
    state.source = { uid };
    await post(q, undefined, "Fetching the study from the PACS and searching…");
  }

  async function searchAgain(push) {
    if (!state.study) { remember(false); return; }
    const q = queryString();
    q.set("study", state.study);
    await run("Searching…", async () => {
      const answer = await api("/api/search?" + q.toString());
      if (!state.preview && answer.preview) await showStudy(answer.preview, answer.query);
      const region = answer.query && answer.query.region;
      if (region) showRegion(region); else if (state.region) { clearRegion(); draw(); }
      showResults(answer);
      remember(push);
    });
  }

  async function run(message, work) {
    const mine = ++state.busy;
    showError("");
    setStatus(message);
    document.body.classList.add("working");
    try {
      await work();
      if (mine === state.busy) setStatus("");
    } catch (e) {
      if (mine === state.busy) { setStatus(""); showError(e.message); }
      if (e.status === 404 && state.study) { state.study = null; remember(false); }
    } finally {
      if (mine === state.busy) document.body.classList.remove("working");
    }
  }

  function mb(bytes) {
    return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(bytes >= 1e8 ? 0 : 1)} MB` : `${Math.max(1, Math.round(bytes / 1e3))} kB`;
  }

  // Every file under a dropped folder (the browser's file system entries, read in batches).
  async function droppedFiles(transfer) {
    const entries = Array.from(transfer.items || []).map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
    if (!entries.length) return Array.from(transfer.files || []);
    const out = [];
    async function walk(entry) {
      if (entry.isFile) {
        out.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        for (;;) {
          const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
          if (!batch.length) break;
          for (const child of batch) await walk(child);
        }
      }
    }
    for (const entry of entries) await walk(entry);
    return out;
  }

  // -- the query's image -------------------------------------------------------------------------

  async function showStudy(preview, query) {
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

  function buildPresets(preview) {
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

  function windowOf(name, preview) {
    const w = name !== "auto" && preview.presets && preview.presets[name] ? preview.presets[name] : preview.window;
    return { center: w.center, width: w.width };
  }

  async function slicePixels(index) {
    if (!state.slices.has(index)) {
      const token = state.study;
      const buffer = await api(`/api/study/${encodeURIComponent(token)}/slice/${index}`);
      if (token !== state.study) return null;
      state.slices.set(index, state.preview.format === "int16" ? new Int16Array(buffer) : new Uint8Array(buffer));
    }
    return state.slices.get(index);
  }

  async function drawSlice(index) {
    const pixels = await slicePixels(index);
    if (pixels === null || index !== state.current) return;
    draw();
    const p = state.preview;
    els.sliceOut.textContent = `${p.slices[index] + 1} of ${p.n_slices}`;
    regionHint();
    // the neighbours next, so that the slider moves without waiting
    for (const next of [index + 1, index - 1]) if (next >= 0 && next < p.slices.length) slicePixels(next).catch(() => {});
  }

  function draw() {
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

  // -- a region of the study ---------------------------------------------------------------------

  // The boxes on the slice shown: the box of the fields (solid), and what the encoder saw of the box
  // searched, where the service widened it to its index's tiles (dashed).
  function outline(ctx) {
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

  function within(slices, stack) { return !slices || (stack >= slices[0] && stack < slices[1]); }

  function stroke(ctx, [x0, y0, x1, y1], color, line, dash) {
    ctx.save();
    ctx.strokeStyle = color;
    ctx.lineWidth = line;
    ctx.setLineDash(dash);
    ctx.strokeRect(x0 + line / 2, y0 + line / 2, Math.max(1, x1 - x0 - line), Math.max(1, y1 - y0 - line));
    ctx.restore();
  }

  // The box of its field, when it reads as four whole numbers (else null).
  function fieldBox() {
    const v = els.box.value.split(/[\s,]+/).filter(Boolean).map(Number);
    return v.length === 4 && v.every(Number.isInteger) ? v : null;
  }

  // The slab of the fields as stack slices [start, stop) from 0, when given (one field: one slice).
  function fieldSlab() {
    const from = els.slabFrom.value.trim(), to = els.slabTo.value.trim();
    if (els.slabRow.hidden || (from === "" && to === "")) return null;
    const a = Number(from !== "" ? from : to), b = Number(to !== "" ? to : from);
    return [a - 1, b];
  }

  // The region of the fields as the service takes it ({slices: "START:STOP", roi: "X0,Y0,X1,Y1"}); an
  // Error says what to change. A box without slices lies on the slice shown.
  function regionAsked() {
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

  function describeRegion(slices, roi) {
    const parts = [];
    if (slices) parts.push(slices[1] - slices[0] === 1 ? `slice ${slices[0] + 1}` : `slices ${slices[0] + 1}–${slices[1]}`);
    if (roi) parts.push(`box ${roi[0]},${roi[1]}–${roi[2]},${roi[3]} px`);
    return parts.join(", ");
  }

  function regionHint() {
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

  function showRegion(region) {
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

  function clearRegion() {
    els.slabFrom.value = ""; els.slabTo.value = ""; els.box.value = "";
    state.region = null;
    setDrawing(false);
  }

  function setDrawing(on) {
    state.drawing = on;
    state.drag = null;
    els.drawBox.setAttribute("aria-pressed", String(on));
    els.viewer.classList.toggle("drawing", on);
    regionHint();
  }

  function slabHere(end) {
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
  function imagePoint(e) {
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

  function dragTo(e) {
    const [ax, ay] = state.drag, [bx, by] = imagePoint(e);
    const x0 = Math.floor(Math.min(ax, bx)), x1 = Math.ceil(Math.max(ax, bx));
    const y0 = Math.floor(Math.min(ay, by)), y1 = Math.ceil(Math.max(ay, by));
    if (x1 - x0 < 2 || y1 - y0 < 2) return;  // a click, not a box
    els.box.value = `${x0},${y0},${x1},${y1}`;
    draw();
  }

  async function searchRegion() {
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

  async function searchWhole() {
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

  // -- results -----------------------------------------------------------------------------------

  function showResults(answer) {
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
    state.lastAnswer = answer;
  }

  function card(match, labels) {
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
  function showQuerySlice(match) {
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
  function shownValue(value) {
    return typeof value === "boolean" ? (value ? "True" : "False") : String(value);
  }

  // For a series: which slice of the result matched best (when the service says so).
  function bestSlice(match) {
    if (match.best_slice === undefined || match.best_slice === null) return "";
    const of = match.metadata && match.metadata.n_slices ? ` of ${match.metadata.n_slices}` : "";
    const query = match.query_slice !== undefined && match.query_slice !== null ? ` (query slice ${match.query_slice + 1})` : "";
    return `${match.best_slice + 1}${of}${query}`;
  }

  function boxText([x0, y0, x1, y1]) { return `${x0},${y0}–${x1},${y1} px`; }

  // The slice of a result that matched best, read from the archive by the service (when it has the
  // index's link table), with the tile it matched outlined; null: the stored thumbnail is shown.
  function matchedSlice(match) {
    const features = (state.options && state.options.features) || {};
    if (!features.case_slices || match.best_slice === undefined || match.best_slice === null) return null;
    const box = match.best_box ? `?box=${match.best_box.join(",")}` : "";
    return `/api/case/${encodeURIComponent(match.case_id)}/slice/${match.best_slice}${box}`;
  }

  // A result's picture: `first` (its matched slice) when given, else or when that cannot be read its stored thumbnail.
  function thumbnail(match, alt, first) {
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

  function openDetail(match, labels) {
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

  function openQuery() {
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

  // -- wiring ------------------------------------------------------------------------------------

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
})();
