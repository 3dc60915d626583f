// The modelpress dashboard: plain JavaScript on the public API, no framework, no build.
// Live updates come from Server-Sent Events (/v1/events, /v1/jobs/{id}/events); when the
// browser cannot keep a stream open the page falls back to polling. Every value from the
// server is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const CHARTS = (document.body.dataset.charts || "").split(",").filter(Boolean);
const CHART_SOURCE = { layers: "report.json", error: "report.json", frontier: "search.json", training: "training.json" };
const CHART_TITLE = {
  layers: "Bits per weight and sparsity per layer",
  error: "Weight error per layer",
  frontier: "Search frontier: ratio against metric",
  training: "Training loss and validation metric per epoch",
};
const POLL_MS = 2000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---------------------------------------------------------------- API keys
// A server with API keys answers 401 without one: the page asks for a key, keeps it for this
// tab only (sessionStorage) and sends it as `Authorization: Bearer`. EventSource cannot send
// headers, so with a key the streams are read through fetch; images and downloads likewise.
let apiKey = sessionStorage.getItem("modelpress-key") || "";

function authHeaders(extra = {}) {
  return apiKey ? { ...extra, authorization: "Bearer " + apiKey } : extra;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-status").textContent = message || "This server needs an API key.";
  setLive("API key needed", false);
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: authHeaders(opts.headers || {}) });
  if (r.status === 401) askForKey(apiKey ? "The API key was refused (unknown or revoked)." : null);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!r.ok) {
    const err = (body && body.error) || {};
    throw new ApiError(r.status, err.code || "http_" + r.status, err.message || text || r.statusText);
  }
  return body;
}

const fmt = {
  bytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
    if (n < 1024 ** 3) return (n / 1024 / 1024).toFixed(1) + " MiB";
    return (n / 1024 ** 3).toFixed(2) + " GiB";
  },
  num(v, d = 4) { return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d); },
  ratio(v) { return v ? Number(v).toFixed(2) + "×" : "–"; },
  pct(v) { return Math.round((v || 0) * 100) + " %"; },
  age(iso) {
    if (!iso) return "–";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  },
  short(id) { return String(id).slice(-8); },
};

function presetOf(spec) {
  if (!spec) return "–";
  if (spec.preset) return spec.preset;
  if (spec.constraints) return "search";
  if (Array.isArray(spec.pipeline)) return "pipeline (" + spec.pipeline.length + " steps)";
  return "–";
}

function metricOf(summary) {
  const e = summary && summary.evaluation;
  if (!e || e.compressed === undefined || e.compressed === null) return "–";
  return e.metric + " " + fmt.num(e.compressed);
}

function setLive(text, ok) {
  const l = $("live");
  l.textContent = text;
  l.classList.toggle("ok", !!ok);
}

// ---------------------------------------------------------------- state shared by views

const models = new Map(); // id → model view

async function loadModels() {
  const page = await api("/v1/models?limit=500");
  models.clear();
  for (const m of page.items) models.set(m.id, m);
  return page.items;
}

// ---------------------------------------------------------------- jobs list

const jobRows = new Map(); // job id → {tr, progress, state, ...}

function jobRow(j) {
  const progress = el("progress", { max: "1", value: String(j.progress || 0), "aria-label": "Progress of job " + fmt.short(j.id) });
  const pct = el("span", { class: "pct", text: fmt.pct(j.progress) });
  const state = el("span", { class: "badge s-" + j.state, text: j.state });
  const ratio = el("td", { text: fmt.ratio(j.summary && j.summary.ratio) });
  const metric = el("td", { text: metricOf(j.summary) });
  const model = models.get(j.model_id);
  const tr = el("tr", { id: "job-" + j.id, "data-state": j.state },
    el("td", {}, el("a", { href: "#/jobs/" + j.id, text: fmt.short(j.id) })),
    el("td", {}, state),
    el("td", { class: "progress-cell" }, progress, pct),
    el("td", { text: model ? model.name : fmt.short(j.model_id) }),
    el("td", { text: presetOf(j.spec) }),
    ratio,
    metric,
    el("td", { text: fmt.age(j.created_at), title: j.created_at }),
  );
  return { tr, progress, pct, state, ratio, metric };
}

let jobsLoading = null;
async function loadJobs() {
  if (jobsLoading) return jobsLoading;
  jobsLoading = (async () => {
    try {
      const filter = $("state-filter").value;
      await loadModels().catch(() => {});
      const page = await api("/v1/jobs?limit=200" + (filter ? "&state=" + encodeURIComponent(filter) : ""));
      const body = $("jobs-table").tBodies[0];
      body.replaceChildren();
      jobRows.clear();
      for (const j of page.items) {
        const r = jobRow(j);
        jobRows.set(j.id, r);
        body.append(r.tr);
      }
      $("jobs-empty").hidden = page.items.length > 0;
    } finally {
      jobsLoading = null;
    }
  })();
  return jobsLoading;
}

let reloadTimer = null;
function reloadJobsSoon() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(() => { if (currentView() === "jobs") loadJobs().catch(() => {}); }, 150);
}

function applyJobEvent(kind, d) {
  const r = jobRows.get(d.job_id);
  if (kind === "progress") {
    if (r) {
      r.progress.value = d.progress;
      r.pct.textContent = fmt.pct(d.progress);
    }
    return;
  }
  if (kind === "state" || kind === "done") {
    const filter = $("state-filter").value;
    if (!r || (filter && d.state && d.state !== filter)) { reloadJobsSoon(); return; }
    if (d.state) {
      r.state.textContent = d.state;
      r.state.className = "badge s-" + d.state;
      r.tr.dataset.state = d.state;
    }
    if (d.progress !== undefined) {
      r.progress.value = d.progress;
      r.pct.textContent = fmt.pct(d.progress);
    }
    if (d.ratio) r.ratio.textContent = fmt.ratio(d.ratio);
    if (kind === "done") reloadJobsSoon();
  }
}

// An event stream: EventSource without a key; with one, fetch and a small parser (the same
// `event:`/`data:` lines). Returns {close()}. `onDown` runs when the stream fails; a fetch
// stream that ends cleanly calls `onEnd`.
function openStream(url, handlers, onOpen, onDown, onEnd) {
  if (!apiKey && window.EventSource) {
    const es = new EventSource(url);
    es.addEventListener("open", onOpen);
    es.addEventListener("error", onDown);
    for (const [kind, fn] of Object.entries(handlers)) es.addEventListener(kind, (e) => fn(e.data));
    return { close: () => es.close() };
  }
  const ctrl = new AbortController();
  (async () => {
    try {
      const r = await fetch(url, { headers: authHeaders({ accept: "text/event-stream" }), signal: ctrl.signal });
      if (r.status === 401) askForKey("The API key was refused (unknown or revoked).");
      if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
      onOpen();
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let at;
        while ((at = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, at);
          buf = buf.slice(at + 2);
          let kind = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) kind = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (data && handlers[kind]) handlers[kind](data);
        }
      }
      if (onEnd) onEnd();
    } catch (e) {
      if (!ctrl.signal.aborted) onDown(e);
    }
  })();
  return { close: () => ctrl.abort() };
}

// A resource the page shows or saves (a chart, an artifact) fetched with the key, as a blob URL.
async function blobUrl(path) {
  const r = await fetch(path, { headers: authHeaders() });
  if (!r.ok) throw new ApiError(r.status, "http_" + r.status, r.statusText);
  return URL.createObjectURL(await r.blob());
}

// One stream for the whole page; polling while it is down.
let allStream = null;
let pollTimer = null;
function startPolling() {
  if (pollTimer) return;
  setLive("polling", false);
  pollTimer = setInterval(() => {
    const v = currentView();
    if (v === "jobs") loadJobs().catch(() => {});
    if (v === "job" && detail.id) refreshDetail().catch(() => {});
  }, POLL_MS);
}
function stopPolling() {
  clearInterval(pollTimer);
  pollTimer = null;
}
function connectAll() {
  if (allStream) allStream.close();
  const handlers = { resync: () => reloadJobsSoon() };
  for (const kind of ["state", "progress", "done"]) handlers[kind] = (d) => applyJobEvent(kind, JSON.parse(d));
  const down = () => {
    // EventSource reconnects by itself (retry); a fetch stream is reopened here. Poll
    // meanwhile so nothing goes stale.
    setLive("reconnecting…", false);
    startPolling();
    if (apiKey) setTimeout(connectAll, 2000);
  };
  allStream = openStream("/v1/events", handlers, () => { stopPolling(); setLive("live", true); }, down, down);
}

// ---------------------------------------------------------------- job detail

const detail = { id: null, stream: null, job: null, sort: { key: null, dir: 1 }, layers: [] };

function closeDetailStream() {
  if (detail.stream) detail.stream.close();
  detail.stream = null;
}

function renderState(state, progress, stage) {
  $("job-state").textContent = state;
  $("job-state").className = "badge s-" + state;
  if (progress !== undefined && progress !== null) {
    $("job-progress").value = progress;
    $("job-pct").textContent = fmt.pct(progress);
  }
  if (stage !== undefined && stage !== null) $("job-stage").textContent = stage;
  const terminal = ["succeeded", "failed", "cancelled"].includes(state);
  $("job-cancel").disabled = terminal;
}

function stageText(d) {
  const x = d.detail || {};
  if (x.phase === "search" && x.trial !== undefined) {
    let s = "search: trial " + x.trial + " of " + x.trials;
    if (x.best_ratio) s += "; best so far " + fmt.ratio(x.best_ratio) + " at drop " + fmt.num(x.best_drop);
    return s;
  }
  if (x.phase === "train" && x.epoch !== undefined) {
    let s = "training: epoch " + x.epoch + " of " + x.epochs;
    if (x.loss !== undefined && x.loss !== null) s += ", loss " + fmt.num(x.loss);
    if (x.validation !== undefined && x.validation !== null) s += ", validation " + fmt.num(x.validation);
    return s;
  }
  return d.stage;
}

function summaryRows(j) {
  const s = j.summary || {};
  const rows = [
    ["Original", fmt.bytes(s.original_bytes)],
    ["Compressed (model file)", fmt.bytes(s.deployable_bytes || s.compressed_bytes)],
    ["Ratio", fmt.ratio(s.ratio)],
    ["Archive (model.mpz)", s.archive_bytes ? fmt.bytes(s.archive_bytes) + " (" + fmt.ratio(s.archive_ratio) + ")" : "–"],
    ["Mean bits per weight", fmt.num(s.mean_bits_per_weight, 2)],
    ["Parameters (nonzero)", s.parameters !== undefined ? s.parameters + " (" + s.nonzero_parameters + ")" : "–"],
  ];
  const e = s.evaluation;
  if (e) {
    rows.push(["Metric", e.metric + (e.skipped ? " (skipped: " + e.skipped + ")" : "")]);
    rows.push(["Metric before → after", fmt.num(e.original) + " → " + fmt.num(e.compressed)]);
    rows.push(["Drop", fmt.num(e.drop)]);
  }
  if (j.quality) rows.push(["Quality gate", String(j.quality)]);
  const l = s.latency;
  if (l) {
    const verdict = l.skipped ? "not measured: " + l.skipped
      : (l.slower_than_original ? "slower than the original" : "not slower than the original") +
        " (" + fmt.num(l.original_ms, 3) + " → " + fmt.num(l.deployable_ms, 3) + " ms, " + fmt.num(l.ratio, 2) + "×)";
    rows.push(["Latency", verdict]);
  }
  if (s.search) {
    const c = s.search.chosen;
    rows.push(["Search", (s.search.verdict === "met" ? "goal met" : "goal not met") + ", " + (s.search.trials || 0) + " trials in " +
      fmt.num(s.search.seconds, 1) + " s" + (c ? "; chosen: " + c.name + " (" + fmt.ratio(c.ratio) + ", drop " + fmt.num(c.drop) + ")" : "")]);
  }
  const t = s.finetune || s.distill;
  if (t && t.metric !== undefined) {
    rows.push([s.finetune ? "Fine-tuning" : "Distillation", t.metric + " on validation " + fmt.num(t.validation_before) + " → " +
      fmt.num(t.validation_after) + ", " + t.epochs + " epochs (best " + t.best_epoch + "), stopped: " + t.stopped]);
  }
  rows.push(["Created", j.created_at || "–"]);
  rows.push(["Finished", j.finished_at || "–"]);
  return rows;
}

function renderJob(j) {
  detail.job = j;
  $("job-h").textContent = "Job " + j.id;
  renderState(j.state, j.progress, j.stage);
  const err = $("job-error");
  err.hidden = !j.error;
  err.replaceChildren();
  if (j.error) err.append(el("strong", { text: j.error.code }), ": ", j.error.message);
  $("job-warnings").replaceChildren(...(j.warnings || []).map((w) =>
    el("li", {}, el("strong", { text: w.code }), ": ", w.message)));
  $("job-summary").replaceChildren(...summaryRows(j).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  $("job-artifacts").replaceChildren(...(j.artifacts || []).map((a) =>
    el("li", {}, el("a", { href: a.url, download: a.name, "data-sha256": a.sha256, text: a.name, onclick: keyedDownload }),
      " ", el("span", { class: "muted", text: fmt.bytes(a.size_bytes) + " · sha256 " + a.sha256.slice(0, 12) + "…" }))));
  const names = new Set((j.artifacts || []).map((a) => a.name));
  $("job-charts").replaceChildren(...CHARTS.filter((c) => names.has(CHART_SOURCE[c])).map((c) =>
    el("figure", {}, chartImage("/v1/jobs/" + j.id + "/charts/" + c, CHART_TITLE[c] || c),
      el("figcaption", { text: CHART_TITLE[c] || c }))));
  if (names.has("report.json")) loadLayers(j.id).catch((e) => { $("job-stage").textContent = "report: " + e.message; });
  else renderLayers([]);
}

// A chart: its URL directly, or a blob fetched with the key.
function chartImage(path, alt) {
  const img = el("img", { alt, loading: "lazy" });
  if (!apiKey) img.src = path;
  else blobUrl(path).then((u) => { img.src = u; }).catch(() => { img.alt = alt + " (could not load)"; });
  return img;
}

// With a key, a download link fetches the file with the key and saves it from a blob.
async function keyedDownload(ev) {
  if (!apiKey) return;
  ev.preventDefault();
  const a = ev.currentTarget;
  try {
    const url = await blobUrl(a.getAttribute("href"));
    const save = el("a", { href: url, download: a.getAttribute("download") });
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (e) {
    $("job-error").hidden = false;
    $("job-error").textContent = "download failed: " + e.message;
  }
}

const LAYER_COLUMNS = [
  ["name", "Tensor", (t) => t.name],
  ["shape", "Shape", (t) => (t.shape || []).join("×")],
  ["methods", "Methods", (t) => (t.methods || []).join(", ") || "—"],
  ["parameters", "Parameters", (t) => t.parameters],
  ["sparsity", "Sparsity", (t) => t.sparsity],
  ["bits_per_weight", "Bits/weight", (t) => t.bits_per_weight],
  ["bytes_before", "Bytes before", (t) => t.bytes_before],
  ["bytes_after", "Bytes after", (t) => t.bytes_after],
  ["relative_l2_error", "Rel. error", (t) => t.relative_l2_error],
  ["sqnr_db", "SQNR dB", (t) => t.sqnr_db],
];

async function loadLayers(id) {
  const doc = await api("/v1/jobs/" + id + "/artifacts/report.json");
  if (detail.id !== id) return;
  renderLayers(((doc && doc.report) || {}).tensors || []);
}

function renderLayers(layers) {
  detail.layers = layers;
  const head = $("layers-table").tHead;
  head.replaceChildren(el("tr", {}, ...LAYER_COLUMNS.map(([key, label]) => {
    const sorted = detail.sort.key === key;
    return el("th", { scope: "col", "aria-sort": sorted ? (detail.sort.dir > 0 ? "ascending" : "descending") : "none" },
      el("button", { type: "button", class: "sort", "data-key": key, onclick: () => sortLayers(key),
        text: label + (sorted ? (detail.sort.dir > 0 ? " ▲" : " ▼") : "") }));
  })));
  const rows = layers.slice();
  if (detail.sort.key) {
    const get = LAYER_COLUMNS.find((c) => c[0] === detail.sort.key)[2];
    rows.sort((a, b) => {
      const x = get(a), y = get(b);
      if (typeof x === "number" && typeof y === "number") return (x - y) * detail.sort.dir;
      return String(x ?? "").localeCompare(String(y ?? "")) * detail.sort.dir;
    });
  }
  $("layers-table").tBodies[0].replaceChildren(...rows.map((t) => el("tr", {}, ...LAYER_COLUMNS.map(([key, , get]) => {
    const v = get(t);
    return el("td", { class: typeof v === "number" ? "n" : null, text: typeof v === "number" ? (Number.isInteger(v) ? String(v) : fmt.num(v)) : (v ?? "–") });
  }))));
}

function sortLayers(key) {
  detail.sort = { key, dir: detail.sort.key === key ? -detail.sort.dir : 1 };
  renderLayers(detail.layers);
  const b = document.querySelector('#layers-table button[data-key="' + key + '"]');
  if (b) b.focus();
}

async function refreshDetail() {
  if (!detail.id) return;
  const j = await api("/v1/jobs/" + detail.id);
  if (j.id === detail.id) renderJob(j);
}

async function showJob(id) {
  closeDetailStream();
  detail.id = id;
  detail.sort = { key: null, dir: 1 };
  $("job-h").textContent = "Job " + id;
  $("job-error").hidden = true;
  try {
    renderJob(await api("/v1/jobs/" + id));
  } catch (e) {
    $("job-error").hidden = false;
    $("job-error").textContent = e.code + ": " + e.message;
    return;
  }
  if (["succeeded", "failed", "cancelled"].includes(detail.job.state)) return;
  let stream = null;
  stream = openStream("/v1/jobs/" + id + "/events", {
    state: (data) => {
      const d = JSON.parse(data);
      renderState(d.state, d.progress, d.stage);
    },
    progress: (data) => {
      const d = JSON.parse(data);
      renderState(detail.job.state === "queued" ? "running" : $("job-state").textContent, d.progress, stageText(d));
    },
    done: () => {
      if (stream) stream.close();
      if (detail.stream === stream) detail.stream = null;
      refreshDetail().catch(() => {});
    },
  }, () => {}, () => { if (detail.id === id) startPolling(); });
  detail.stream = stream;
}

async function cancelJob() {
  if (!detail.id) return;
  $("job-cancel").disabled = true;
  try {
    const j = await api("/v1/jobs/" + detail.id + "/cancel", { method: "POST" });
    renderState(j.state, j.progress, j.cancel_requested && j.state === "running" ? "cancel requested" : j.stage);
  } catch (e) {
    $("job-error").hidden = false;
    $("job-error").textContent = e.code + ": " + e.message;
    $("job-cancel").disabled = false;
  }
}

// ---------------------------------------------------------------- new job

function clearErrors() {
  for (const id of ["err-model", "err-preset", "err-pipeline", "err-eval", "err-form"]) $(id).textContent = "";
  for (const f of document.querySelectorAll("[aria-invalid]")) f.removeAttribute("aria-invalid");
}

function showError(field, message) {
  const map = { model: ["err-model", "model-file"], preset: ["err-preset", "preset"], pipeline: ["err-pipeline", "pipeline"], eval: ["err-eval", "dataset"], form: ["err-form", null] };
  const [errId, inputId] = map[field] || map.form;
  $(errId).textContent = message;
  if (inputId) {
    $(inputId).setAttribute("aria-invalid", "true");
    $(inputId).setAttribute("aria-describedby", errId);
  }
}

// Which form field a 422 names: its message starts with the field's path in the spec.
function fieldOf(err) {
  if (err.code === "model_not_found" || err.code === "invalid_model") return "model";
  if (err.code === "dataset_not_found" || err.code === "dataset_mismatch") return "eval";
  const path = (err.message.match(/^([A-Za-z_][\w.\[\]]*):/) || [])[1] || "";
  const head = path.split(/[.\[]/)[0];
  if (head === "preset" || head === "options") return "preset";
  if (head === "pipeline" || head === "steps") return "pipeline";
  if (head === "eval") return "eval";
  if (head === "model_id") return "model";
  return "form";
}

function uploadModel(file) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/models?name=" + encodeURIComponent(file.name));
    xhr.setRequestHeader("content-type", "application/octet-stream");
    if (apiKey) xhr.setRequestHeader("authorization", "Bearer " + apiKey);
    const bar = $("upload-progress");
    bar.hidden = false;
    bar.value = 0;
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) bar.value = e.loaded / e.total;
      $("upload-status").textContent = "uploading " + fmt.pct(e.loaded / (e.total || 1));
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
      if (xhr.status >= 200 && xhr.status < 300) {
        bar.value = 1;
        resolve(body);
      } else {
        const e = (body && body.error) || {};
        reject(new ApiError(xhr.status, e.code || "http_" + xhr.status, e.message || xhr.statusText));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the upload failed")));
    xhr.send(file);
  });
}

let uploaded = null; // the model uploaded by this form, until the job is submitted

async function fillModelChoices(selected) {
  const items = await loadModels();
  const sel = $("model-existing");
  sel.replaceChildren(el("option", { value: "", text: "—" }),
    ...items.map((m) => el("option", { value: m.id, text: m.name + " (" + fmt.bytes(m.size_bytes) + ")" })));
  if (selected) sel.value = selected;
}

async function fillDatasetChoices() {
  const page = await api("/v1/datasets?limit=500");
  $("dataset").replaceChildren(el("option", { value: "", text: "none" }),
    ...page.items.map((d) => el("option", { value: d.id, text: d.name + (d.rows !== null ? " (" + d.rows + " rows)" : "") })));
}

async function onFileChosen(file) {
  clearErrors();
  if (!file) return;
  $("upload-status").textContent = "uploading " + file.name;
  try {
    const m = await uploadModel(file);
    uploaded = m.id;
    await fillModelChoices(m.id);
    $("upload-status").textContent = "uploaded " + m.name + " (" + m.format + ", " + m.parameter_count + " parameters)";
  } catch (e) {
    $("upload-status").textContent = "";
    showError("model", e.code + ": " + e.message);
  }
}

async function submitJob(ev) {
  ev.preventDefault();
  clearErrors();
  const modelId = $("model-existing").value || uploaded;
  if (!modelId) { showError("model", "choose a model file or a model already uploaded"); return; }
  const spec = { model_id: modelId };
  if ($("mode-pipeline").checked) {
    try {
      spec.pipeline = JSON.parse($("pipeline").value);
    } catch (e) {
      showError("pipeline", "not valid JSON: " + e.message);
      return;
    }
  } else {
    spec.preset = $("preset").value;
  }
  if ($("dataset").value) spec.eval = { dataset_id: $("dataset").value, metric: $("metric").value };
  $("submit").disabled = true;
  try {
    const j = await api("/v1/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(spec) });
    uploaded = null;
    location.hash = "#/jobs/" + j.id;
  } catch (e) {
    showError(fieldOf(e), e.code + ": " + e.message);
  } finally {
    $("submit").disabled = false;
  }
}

function syncMode() {
  const pipeline = $("mode-pipeline").checked;
  $("pipeline").disabled = !pipeline;
  $("preset").disabled = pipeline;
}

// ---------------------------------------------------------------- models and datasets

function inventoryRow(cols, headers, rows) {
  return el("tr", { class: "inventory" }, el("td", { colspan: String(cols) },
    el("div", { class: "scroll" }, el("table", {},
      el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", { text: c })))))))));
}

function toggleButton(label, load) {
  let open = null;
  const b = el("button", { type: "button", "aria-expanded": "false", text: label });
  b.addEventListener("click", async () => {
    if (open) { open.remove(); open = null; b.setAttribute("aria-expanded", "false"); return; }
    try {
      open = await load();
      b.closest("tr").after(open);
      b.setAttribute("aria-expanded", "true");
    } catch (e) { b.textContent = label + " (" + e.message + ")"; }
  });
  return b;
}

async function showModels() {
  const items = await loadModels();
  $("err-models").textContent = "";
  $("models-table").tBodies[0].replaceChildren(...items.map((m) => el("tr", {},
    el("td", { text: m.name }), el("td", { text: m.format }), el("td", { class: "n", text: fmt.bytes(m.size_bytes) }),
    el("td", { class: "n", text: m.parameter_count }), el("td", { text: fmt.age(m.created_at) + " ago", title: m.created_at }),
    el("td", { class: "actions" },
      toggleButton("Tensors", async () => {
        const inv = await api("/v1/models/" + m.id + "/tensors");
        const tensors = inv.items || [];
        return inventoryRow(6, ["Tensor", "Shape", "Type", "Role", "Parameters"],
          (Array.isArray(tensors) ? tensors : []).map((t) => [t.name, (t.shape || []).join("×"), t.dtype, t.role || "", t.parameters ?? ""]));
      }),
      el("button", { type: "button", class: "danger", text: "Delete", "aria-label": "Delete model " + m.name, onclick: async () => {
        if (!confirm("Delete model " + m.name + " and its finished jobs?")) return;
        try { await api("/v1/models/" + m.id + "?cascade=true", { method: "DELETE" }); showModels(); }
        catch (e) { $("err-models").textContent = e.code + ": " + e.message; }
      } })))));
}

async function showDatasets() {
  const page = await api("/v1/datasets?limit=500");
  $("err-datasets").textContent = "";
  $("datasets-table").tBodies[0].replaceChildren(...page.items.map((d) => el("tr", {},
    el("td", { text: d.name }), el("td", { class: "n", text: d.rows ?? "whole" }), el("td", { text: d.has_labels ? "yes" : "no" }),
    el("td", { class: "n", text: fmt.bytes(d.size_bytes) }), el("td", { text: fmt.age(d.created_at) + " ago", title: d.created_at }),
    el("td", { class: "actions" },
      toggleButton("Arrays", async () => inventoryRow(6, ["Array", "Type", "Shape"],
        (d.arrays || []).map((a) => [a.name, a.dtype, (a.shape || []).join("×")]))),
      el("button", { type: "button", class: "danger", text: "Delete", "aria-label": "Delete dataset " + d.name, onclick: async () => {
        if (!confirm("Delete dataset " + d.name + "?")) return;
        try { await api("/v1/datasets/" + d.id, { method: "DELETE" }); showDatasets(); }
        catch (e) { $("err-datasets").textContent = e.code + ": " + e.message; }
      } })))));
}

// ---------------------------------------------------------------- routing

function currentView() {
  const h = location.hash || "#/";
  if (h.startsWith("#/jobs/")) return "job";
  if (h === "#/new") return "new";
  if (h === "#/models") return "models";
  if (h === "#/datasets") return "datasets";
  return "jobs";
}

async function route() {
  const view = currentView();
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.nav === view || (view === "job" && a.dataset.nav === "jobs")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (view !== "job") { closeDetailStream(); detail.id = null; }
  try {
    if (view === "jobs") await loadJobs();
    if (view === "job") await showJob(decodeURIComponent(location.hash.slice("#/jobs/".length)));
    if (view === "new") { await fillModelChoices(uploaded); await fillDatasetChoices(); }
    if (view === "models") await showModels();
    if (view === "datasets") await showDatasets();
  } catch (e) {
    setLive("error: " + e.message, false);
  }
}

function useKey(ev) {
  ev.preventDefault();
  apiKey = $("api-key").value.trim();
  if (apiKey) sessionStorage.setItem("modelpress-key", apiKey);
  else sessionStorage.removeItem("modelpress-key");
  $("api-key").value = "";
  $("key-form").hidden = true;
  connectAll();
  route();
}

function init() {
  $("key-form").addEventListener("submit", useKey);
  $("state-filter").addEventListener("change", () => loadJobs().catch(() => {}));
  $("jobs-refresh").addEventListener("click", () => loadJobs().catch(() => {}));
  $("job-cancel").addEventListener("click", cancelJob);
  $("new-form").addEventListener("submit", submitJob);
  $("model-file").addEventListener("change", (e) => onFileChosen(e.target.files[0]));
  $("mode-preset").addEventListener("change", syncMode);
  $("mode-pipeline").addEventListener("change", syncMode);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) onFileChosen(e.dataTransfer.files[0]);
  });
  window.addEventListener("hashchange", route);
  syncMode();
  connectAll();
  route();
}

document.addEventListener("DOMContentLoaded", init);
