// End-to-end test of the dashboard in Debian's headless Chromium, driven by playwright-core.
// tests/api/dashboard.rs starts two real servers and runs this script:
//   BASE       a server whose jobs are slowed a little (failpoint), so progress is visible
//   SLOW_BASE  a server whose jobs are slowed a lot, so one can be cancelled from the page
//   CASES      ../shared/cases;  OUT  where screenshots and downloads go;  CHROMIUM  the binary
// Any failed check throws: the process exits non-zero and the Rust test fails with its output.
import { chromium } from "playwright-core";
import { createHash } from "node:crypto";
import { readFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";

const BASE = process.env.BASE;
const KEYED = process.env.KEYED_BASE;
const KEY = process.env.KEY;
const SLOW = process.env.SLOW_BASE;
const CASES = process.env.CASES;
const OUT = process.env.OUT;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
assert.ok(BASE && SLOW && KEYED && KEY && CASES && OUT, "BASE, SLOW_BASE, KEYED_BASE, KEY, CASES and OUT are required");
mkdirSync(OUT, { recursive: true });
const MNIST = join(CASES, "mnist8", "mnist-8.onnx");

const step = (s) => console.log("· " + s);

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});

const problems = [];
async function newPage(viewport) {
  const ctx = await browser.newContext({ viewport, acceptDownloads: true });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  // The browser logs every 4xx it is answered (the 422 this test provokes); those are expected.
  page.on("console", (m) => {
    if (m.type() === "error" && !/Failed to load resource/.test(m.text())) problems.push("console error: " + m.text());
  });
  page.setDefaultTimeout(30_000);
  return page;
}

// Every form control has an accessible name (a <label for>, aria-label or aria-labelledby;
// a button its text).
async function unlabelled(page) {
  return page.evaluate(() => [...document.querySelectorAll("input, select, textarea, button")]
    .filter((e) => e.offsetParent !== null || e.type === "file")
    .filter((e) => {
      if (e.getAttribute("aria-label") || e.getAttribute("aria-labelledby")) return false;
      if (e.labels && e.labels.length) return false;
      if (e.tagName === "BUTTON" && e.textContent.trim()) return false;
      return true;
    })
    .map((e) => e.outerHTML.slice(0, 80)));
}

// Presses Tab from the top until every wanted element has had focus (or gives up).
async function reachByKeyboard(page, selectors, maxTabs = 120) {
  await page.evaluate(() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); });
  await page.focus("body");
  const wanted = new Set(selectors);
  const reached = new Set();
  for (let i = 0; i < maxTabs && reached.size < wanted.size; i++) {
    await page.keyboard.press("Tab");
    for (const s of wanted) {
      if (!reached.has(s) && await page.evaluate((sel) => {
        const el = document.querySelector(sel);
        return !!el && el === document.activeElement;
      }, s)) reached.add(s);
    }
  }
  return [...wanted].filter((s) => !reached.has(s));
}

async function overflowsAt(page) {
  return page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
}

try {
  // ------------------------------------------------------------ upload, submit, live progress
  // A dataset to score the job on (uploaded through the API; the form chooses it).
  const dataset = await (await fetch(BASE + "/v1/datasets?name=mnist-eval.npz", { method: "POST",
    body: readFileSync(join(CASES, "mnist8", "eval.npz")) })).json();
  assert.ok(dataset.id, "dataset uploaded: " + JSON.stringify(dataset));
  const page = await newPage({ width: 1280, height: 800 });
  await page.goto(BASE + "/#/new");
  step("new-job form");
  assert.deepEqual(await unlabelled(page), [], "every control on the form has a label");
  // Tab reaches the checked radio of a group; the arrow keys move within it.
  assert.deepEqual(await reachByKeyboard(page, ["#model-file", "#mode-preset", "#preset", "#dataset", "#metric", "#submit"]), [],
    "the keyboard reaches every control of the form");
  await page.focus("#mode-preset");
  await page.keyboard.press("ArrowRight");
  assert.equal(await page.isChecked("#mode-pipeline"), true, "the arrow key chooses the pipeline");
  assert.equal(await page.isEnabled("#pipeline"), true, "the pipeline field is editable then");
  await page.keyboard.press("ArrowLeft");
  assert.equal(await page.isChecked("#mode-preset"), true);

  // A pipeline the server refuses: its 422 is shown next to the pipeline field.
  await page.setInputFiles("#model-file", MNIST);
  await page.waitForFunction(() => document.getElementById("upload-status").textContent.startsWith("uploaded"));
  assert.equal(await page.$eval("#upload-progress", (p) => p.value), 1, "the upload progress reached 100 %");
  await page.check("#mode-pipeline");
  await page.fill("#pipeline", '[{"method": "quantize", "bits": 99}]');
  await page.click("#submit");
  await page.waitForFunction(() => document.getElementById("err-pipeline").textContent.length > 0);
  const pipelineError = await page.textContent("#err-pipeline");
  assert.match(pipelineError, /invalid_spec/, "the 422 shows next to the pipeline field: " + pipelineError);
  assert.equal(await page.getAttribute("#pipeline", "aria-invalid"), "true");
  step("422 shown next to the field: " + pipelineError.slice(0, 80));

  // Now the real job: int8 on mnist-8, watched to the end without a reload.
  await page.check("#mode-preset");
  await page.selectOption("#preset", "int8");
  await page.selectOption("#dataset", dataset.id);
  await page.selectOption("#metric", "top1");
  await page.evaluate(() => { window.__noReload = true; });
  await page.click("#submit");
  await page.waitForFunction(() => location.hash.startsWith("#/jobs/"));
  const jobId = await page.evaluate(() => location.hash.slice("#/jobs/".length));
  step("submitted job " + jobId);
  // Record every value the progress bar shows, and every state, as the page changes them.
  await page.evaluate(() => {
    window.__seen = [];
    const record = () => window.__seen.push([document.getElementById("job-state").textContent, document.getElementById("job-progress").value]);
    new MutationObserver(record).observe(document.getElementById("view-job"), { subtree: true, childList: true, characterData: true, attributes: true });
    record();
  });
  await page.waitForFunction(() => document.getElementById("job-state").textContent === "succeeded" &&
    document.getElementById("job-progress").value === 1, null, { timeout: 120_000 });
  const seen = await page.evaluate(() => window.__seen);
  assert.ok(await page.evaluate(() => window.__noReload === true), "the page was not reloaded");
  const between = seen.filter(([, v]) => v > 0 && v < 1);
  assert.ok(between.length > 0, "progress between 0 and 100 % was shown live: " + JSON.stringify(seen.slice(0, 20)));
  assert.ok(seen.some(([s]) => s === "running"), "the running state was shown live");
  assert.equal(await page.textContent("#job-pct"), "100 %");
  step("progress seen live: " + between.length + " updates between 0 and 100 %");

  // ------------------------------------------------------------ detail: summary, table, chart, download
  // The `done` event makes the page read the finished job once more.
  await page.waitForFunction(() => [...document.querySelectorAll("#job-summary dt")].some((d) => d.textContent === "Metric before → after"));
  const summary = await page.$$eval("#job-summary dt, #job-summary dd", (e) => e.map((x) => x.textContent));
  const metricAt = summary.indexOf("Metric before → after");
  assert.ok(metricAt >= 0, "the summary gives the metric before and after: " + JSON.stringify(summary));
  assert.match(summary[metricAt + 1], /^0\.98\d+ → 0\.98\d+$/, "top-1 before and after on mnist-8");
  assert.ok(summary.includes("Ratio") && summary.includes("Latency"), "ratio and latency verdict shown");
  step("summary: top-1 " + summary[metricAt + 1]);
  await page.waitForFunction(() => document.querySelectorAll("#layers-table tbody tr").length > 0);
  const layerRows = await page.$$eval("#layers-table tbody tr", (r) => r.length);
  assert.ok(layerRows >= 3, "the per-layer table lists mnist-8's tensors");
  await page.waitForFunction(() => [...document.querySelectorAll("#job-charts img")].some((i) => i.complete && i.naturalWidth > 0));
  const charts = await page.$$eval("#job-charts img", (imgs) => imgs.map((i) => [i.alt, i.naturalWidth]));
  assert.ok(charts.length >= 2 && charts.every(([, w]) => w > 0), "charts drawn: " + JSON.stringify(charts));
  // Sorting by a column, with the keyboard.
  await page.focus('#layers-table button[data-key="parameters"]');
  await page.keyboard.press("Enter");
  assert.equal(await page.getAttribute('#layers-table th:has(button[data-key="parameters"])', "aria-sort"), "ascending");
  await page.keyboard.press("Enter");
  assert.equal(await page.getAttribute('#layers-table th:has(button[data-key="parameters"])', "aria-sort"), "descending");
  const params = await page.$$eval("#layers-table tbody tr td:nth-child(4)", (c) => c.map((x) => Number(x.textContent)));
  assert.deepEqual(params, [...params].sort((a, b) => b - a), "sorted by parameters, descending");
  step("layer table (" + layerRows + " rows, sortable) and " + charts.length + " charts");

  const api = await (await fetch(BASE + "/v1/jobs/" + jobId)).json();
  const want = api.artifacts.find((a) => a.name === "model.onnx");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click('#job-artifacts a[download="model.onnx"]')]);
  const saved = join(OUT, "downloaded-model.onnx");
  await download.saveAs(saved);
  const sha = createHash("sha256").update(readFileSync(saved)).digest("hex");
  assert.equal(sha, want.sha256, "the downloaded model.onnx has the sha256 the API reports");
  step("downloaded model.onnx, sha256 " + sha.slice(0, 16) + "… matches the API");

  assert.deepEqual(await unlabelled(page), [], "every control on the detail page has a label");
  assert.deepEqual(await reachByKeyboard(page, ['#job-artifacts a[download="model.onnx"]', '#layers-table button[data-key="name"]']), [],
    "the keyboard reaches the downloads and the table's sort buttons");
  await page.screenshot({ path: join(OUT, "detail-1280x800.png"), fullPage: true });

  // ------------------------------------------------------------ the job list, live
  await page.goto(BASE + "/#/");
  await page.waitForSelector("#job-" + jobId);
  assert.equal(await page.getAttribute("#job-" + jobId, "data-state"), "succeeded");
  await page.waitForFunction(() => document.getElementById("live").textContent === "live");
  // A job submitted from elsewhere appears and finishes in the list without a reload.
  await page.evaluate(() => { window.__noReload = true; });
  const model = api.model_id;
  const other = await (await fetch(BASE + "/v1/jobs", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ model_id: model, preset: "int4", latency: false }) })).json();
  await page.waitForSelector("#job-" + other.id);
  await page.waitForFunction((id) => document.getElementById("job-" + id)?.dataset.state === "succeeded", other.id, { timeout: 120_000 });
  assert.ok(await page.evaluate(() => window.__noReload === true), "the list updated without a reload");
  // The state filter.
  await page.selectOption("#state-filter", "failed");
  await page.waitForFunction(() => !document.getElementById("jobs-table").tBodies[0].rows.length);
  await page.selectOption("#state-filter", "");
  await page.waitForSelector("#job-" + jobId);
  assert.deepEqual(await unlabelled(page), [], "every control on the job list has a label");
  assert.deepEqual(await reachByKeyboard(page, ["#state-filter", "#jobs-refresh", `#job-${jobId} a`]), [],
    "the keyboard reaches the filter and every job");
  await page.screenshot({ path: join(OUT, "jobs-1280x800.png"), fullPage: true });
  step("job list live, filtered, keyboard-reachable");

  // ------------------------------------------------------------ models page: inventory
  await page.goto(BASE + "/#/models");
  await page.click('#models-table button:has-text("Tensors")');
  await page.waitForSelector("tr.inventory td:has-text('Parameter193')");
  assert.deepEqual(await unlabelled(page), []);
  step("models page lists the tensor inventory");

  // ------------------------------------------------------------ datasets page: inventory, delete
  page.on("dialog", (d) => d.accept());
  await page.goto(BASE + "/#/datasets");
  await page.click('#datasets-table button:has-text("Arrays")');
  await page.waitForSelector("tr.inventory td:has-text('Input3')");
  await page.click('#datasets-table button[aria-label="Delete dataset mnist-eval.npz"]');
  await page.waitForFunction(() => !document.querySelector("#datasets-table tbody tr"));
  assert.equal((await fetch(BASE + "/v1/datasets/" + dataset.id)).status, 404, "the dataset is gone from the API");
  step("datasets page: array inventory, deleted after a confirmation");

  // ------------------------------------------------------------ phone-sized screens
  const phone = await newPage({ width: 390, height: 844 });
  await phone.goto(BASE + "/#/");
  await phone.waitForSelector("#job-" + jobId);
  assert.equal(await overflowsAt(phone), false, "nothing overflows horizontally at 390 px (job list)");
  await phone.screenshot({ path: join(OUT, "jobs-390x844.png"), fullPage: true });
  await phone.goto(BASE + "/#/jobs/" + jobId);
  await phone.waitForFunction(() => document.querySelectorAll("#layers-table tbody tr").length > 0);
  await phone.waitForFunction(() => [...document.querySelectorAll("#job-charts img")].every((i) => i.complete));
  assert.equal(await overflowsAt(phone), false, "nothing overflows horizontally at 390 px (job detail)");
  await phone.screenshot({ path: join(OUT, "detail-390x844.png"), fullPage: true });
  await phone.goto(BASE + "/#/new");
  assert.equal(await overflowsAt(phone), false, "nothing overflows horizontally at 390 px (new job)");
  step("390 px: no horizontal overflow");

  // ------------------------------------------------------------ cancel from the page
  const up = await fetch(SLOW + "/v1/models?name=mnist-8.onnx", { method: "POST", body: readFileSync(MNIST) });
  const slowModel = await up.json();
  const slowJob = await (await fetch(SLOW + "/v1/jobs", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ model_id: slowModel.id, preset: "int8", latency: false }) })).json();
  const c = await newPage({ width: 1280, height: 800 });
  await c.goto(SLOW + "/#/jobs/" + slowJob.id);
  await c.waitForFunction(() => document.getElementById("job-state").textContent === "running", null, { timeout: 60_000 });
  await c.focus("#job-cancel");
  await c.keyboard.press("Enter");
  await c.waitForFunction(() => document.getElementById("job-state").textContent === "cancelled", null, { timeout: 60_000 });
  assert.equal(await c.isDisabled("#job-cancel"), true, "a cancelled job's cancel button is disabled");
  const after = await (await fetch(SLOW + "/v1/jobs/" + slowJob.id)).json();
  assert.equal(after.state, "cancelled", "the API agrees the job was cancelled");
  step("cancelled a running job from the page (keyboard)");

  // ------------------------------------------------------------ a server with API keys
  const k = await newPage({ width: 1280, height: 800 });
  await k.goto(KEYED + "/#/new");
  await k.waitForSelector("#key-form:not([hidden])");
  assert.deepEqual(await unlabelled(k), [], "the key field has a label");
  await k.fill("#api-key", "mp_not_a_key");
  await k.press("#api-key", "Enter");
  await k.waitForFunction(() => /refused/.test(document.getElementById("key-status").textContent));
  await k.fill("#api-key", KEY);
  await k.press("#api-key", "Enter");
  await k.waitForFunction(() => document.getElementById("key-form").hidden);
  await k.setInputFiles("#model-file", MNIST);
  await k.waitForFunction(() => document.getElementById("upload-status").textContent.startsWith("uploaded"));
  await k.selectOption("#preset", "int8");
  await k.click("#submit");
  await k.waitForFunction(() => location.hash.startsWith("#/jobs/"));
  const keyedJob = await k.evaluate(() => location.hash.slice("#/jobs/".length));
  await k.waitForFunction(() => document.getElementById("job-state").textContent === "succeeded", null, { timeout: 120_000 });
  await k.waitForFunction(() => [...document.querySelectorAll("#job-charts img")].some((i) => i.complete && i.naturalWidth > 0));
  const keyedApi = await (await fetch(KEYED + "/v1/jobs/" + keyedJob, { headers: { authorization: "Bearer " + KEY } })).json();
  const keyedWant = keyedApi.artifacts.find((a) => a.name === "model.onnx");
  const [kd] = await Promise.all([k.waitForEvent("download"), k.click('#job-artifacts a[download="model.onnx"]')]);
  const keyedSaved = join(OUT, "downloaded-keyed-model.onnx");
  await kd.saveAs(keyedSaved);
  assert.equal(createHash("sha256").update(readFileSync(keyedSaved)).digest("hex"), keyedWant.sha256,
    "the download through the key has the API's sha256");
  await k.goto(KEYED + "/#/");
  await k.waitForSelector("#job-" + keyedJob);
  await k.waitForFunction(() => document.getElementById("live").textContent === "live");
  step("keyed server: key asked for, wrong key refused, upload, job, chart, download and live list with the key");

  assert.deepEqual(problems, [], "no script errors in the page");
  console.log("dashboard: all checks passed; screenshots in " + OUT);
} finally {
  await browser.close();
}
