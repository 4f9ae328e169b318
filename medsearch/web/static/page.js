// medsearch: the page's elements, its state, and talking to the service.

export const $ = (id) => document.getElementById(id);
export const els = {
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
export const CHOICES = ["modality", "body_part", "sex"];
export const HEADINGS = {
  modality: "Modality", body_part: "Body part", sex: "Sex", age_band: "Age", model: "Scanner model",
  manufacturer: "Manufacturer", n_slices: "Slices", spacing_mm: "Spacing (mm)", rows: "Rows", columns: "Columns",
  patient_size_m: "Size (m)", patient_weight_kg: "Weight (kg)", sop_class: "Kind of image", photometric: "Photometric",
  patient: "Patient (pseudonym)", n_files: "Files", study_date_shifted: "Study date (shifted)",
};
export const state = {
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

export async function api(url, init) {
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

export function showError(message) {
  els.error.textContent = message ? sentence(message) : "";
  els.error.hidden = !message;
}

export function sentence(text) {
  const t = String(text).trim();
  return t.charAt(0).toUpperCase() + t.slice(1);
}

export function setStatus(text) { els.status.textContent = text || ""; }
