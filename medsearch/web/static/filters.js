// medsearch: the filters, and the query as the page's address keeps it.
import { $, els, CHOICES, state } from "./page.js";

export function fillOptions(options) {
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

export function labelControls() { return Array.from(els.labelFields.querySelectorAll("[data-label]")); }

// The query as URL parameters: what the address bar keeps, so a result page can be shared and reloaded.
export function formParams() {
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

export function applyParams(p) {
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

export function clampK(value) {
  const max = state.options ? state.options.k.max : 1000;
  const n = Math.round(Number(value));
  return Number.isFinite(n) ? Math.min(Math.max(n, 1), max) : 10;
}

// The filters as `where` terms, as `medsearch query --where` takes them.
export function queryString() {
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

export function remember(push) {
  const url = location.pathname + "?" + formParams().toString();
  if (url === location.pathname + location.search) return;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}
