// medsearch: sending a study (files, or a Study UID for the service to fetch) and searching.
import { state, api, showError, setStatus } from "./page.js";
import { queryString, remember } from "./filters.js";
import { showStudy, draw } from "./viewer.js";
import { showRegion, clearRegion } from "./region.js";
import { showResults } from "./results.js";

export async function sendFiles(files) {
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

export function formOf(files) {
  const form = new FormData();
  // File names are not sent: a name on a clinician's disk may name the patient.
  files.forEach((file, i) => form.append("file", file, `file-${i + 1}.dcm`));
  return form;
}

// A study sent (files, or a Study UID in `q`), whole or a region of it; a region keeps the view as it is.
export async function post(q, body, message) {
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
export async function fetchFromPacs(uid) {
  if (!uid) { showError("Type the Study Instance UID of the study to fetch."); return; }
  const q = queryString();
  q.set("study_uid", uid);
  state.source = { uid };
  await post(q, undefined, "Fetching the study from the PACS and searching…");
}

export async function searchAgain(push) {
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

export async function run(message, work) {
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

export function mb(bytes) {
  return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(bytes >= 1e8 ? 0 : 1)} MB` : `${Math.max(1, Math.round(bytes / 1e3))} kB`;
}

// Every file under a dropped folder (the browser's file system entries, read in batches).
export async function droppedFiles(transfer) {
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
