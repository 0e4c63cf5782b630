// Watch a job live: status and ETA, the pictures (photo, styles, the current picture),
// a loss plot on a canvas with the pyramid's scales marked, download, run again, cancel.
"use strict";
const section = document.getElementById("job");
const $ = (id) => document.getElementById(id);
const csrfToken = () => document.querySelector("meta[name=csrf-token]").content;
const FINISHED = ["succeeded", "failed", "canceled"];
const STATUS_POLL_MS = 3000;  // the ETA's refresh while queued or running
const points = [];
let total = Number($("progress").max) || 0;
let status = $("status").textContent.trim();
let mode = section.dataset.mode || "optimize";
let scales = null;         // [{size, start}], start: the scale's first iteration (1-based)
let serverEta = null;      // what the status URL said last, and when
let lossEta = null;        // from the loss points' elapsed time, when the server gives none
let againUrl = null;
let againTouched = false;
let inputsShown = false;
let resultShown = false;

// ---- Formatting --------------------------------------------------------------------------

// formatSeconds and isNumber: common.js.

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

// ---- Status and ETA ----------------------------------------------------------------------

function renderEta() {
  const eta = $("eta");
  if (FINISHED.includes(status)) {
    eta.textContent = "";
    return;
  }
  // A value counted down from when it was given: it stays calm between two refreshes.
  const since = (given) => (given ? Math.max(0, given.seconds - (Date.now() - given.at) / 1000) : null);
  const parts = [];
  if (status === "queued" && serverEta) {
    if (isNumber(serverEta.position)) parts.push("position " + serverEta.position);
    const wait = since(serverEta.wait), done = since(serverEta.eta);
    if (wait !== null) parts.push("starts in about " + formatSeconds(wait));
    if (done !== null) parts.push("done in about " + formatSeconds(done));
    eta.textContent = parts.length ? ", " + parts.join(" · ") : "";
  } else if (status === "running") {
    const left = since(serverEta && serverEta.eta) ?? since(lossEta);
    eta.textContent = left !== null ? " · about " + formatSeconds(left) + " left" : "";
  } else {
    eta.textContent = "";
  }
}

const PLACEHOLDERS = {
  queued: "Waiting in the queue: the picture appears here once a worker starts.",
  running: "The picture appears here in a moment.",
  failed: "No picture: the job failed.",
  canceled: "No picture: the job was canceled.",
};

function showStatus(next) {
  // A late answer to an earlier poll must not take a finished job back to running.
  if (FINISHED.includes(status) && !FINISHED.includes(next)) return;
  status = next;
  $("status").textContent = status;
  $("status").dataset.status = status;
  const finished = FINISHED.includes(status);
  $("cancel").hidden = finished;
  if (PLACEHOLDERS[status]) $("placeholder").textContent = PLACEHOLDERS[status];
  showAgain();
  renderEta();
}

// ---- The pictures ------------------------------------------------------------------------

function setCaption(text) {
  $("caption").textContent = text;
}

let previewAsked = 0, previewShown = 0;
/** Load the preview off-screen, then swap it in: the old picture stays until the new one is
 * ready (no flicker), and a slow old preview never replaces a newer one. */
function showPreview(url, iteration, source) {
  const asked = ++previewAsked;
  const src = url + (url.includes("?") ? "&" : "?") + "iteration=" + iteration;
  const from = source || (iteration === 0 || mode === "fast" ? "feedforward" : "optimizer");
  const loader = new Image();
  loader.onload = () => {
    if (asked < previewShown) return;
    previewShown = asked;
    $("preview").src = src;
    $("preview").hidden = false;
    $("placeholder").hidden = true;
    if (!resultShown) {
      setCaption(from === "feedforward" ? "Instant preview (feed-forward network)"
        : "Iteration " + iteration + " of " + total);
    }
  };
  loader.src = src;
}

function showResult() {
  const url = section.dataset.result;
  const result = $("result");
  $("download").href = url;
  $("download").hidden = false;
  if (resultShown || result.getAttribute("src")) return;
  result.addEventListener("load", () => {
    // The result lies over the last preview (the same frame) and fades in.
    result.hidden = false;
    $("placeholder").hidden = true;
    resultShown = true;
    setCaption("Result");
  }, { once: true });
  result.addEventListener("error", () => showError("The result could not be loaded."), { once: true });
  result.src = url;
}

function styleUrls(job) {
  const links = job.links || {};
  return (job.styles || []).map((style, i) => {
    if (style.url) return style.url;
    if (Array.isArray(links.styles) && links.styles[i]) return links.styles[i];
    if (style.preset) return section.dataset.presetImage.replace("PRESET", encodeURIComponent(style.preset));
    return null;
  });
}

/** The photo and the style images, once: from the job's links (presets from their own page). */
function showInputs(job) {
  if (inputsShown) return;
  inputsShown = true;
  const links = job.links || {};
  const content = links.content || (job.content && job.content.url);
  if (content) {
    $("content-image").src = content;
    $("content-figure").hidden = false;
  }
  const styles = job.styles || [];
  const urls = styleUrls(job);
  const box = $("style-images");
  box.classList.toggle("several", urls.filter(Boolean).length > 1);
  urls.forEach((url, i) => {
    if (!url) return;
    const img = document.createElement("img");
    img.src = url;
    img.alt = styles[i].preset ? "style: " + styles[i].preset : "style image " + (i + 1);
    box.appendChild(img);
  });
  if (box.children.length) {
    const weights = styles.map((s) => s.weight).filter(isNumber);
    let caption = styles.length > 1 ? styles.length + " styles" : "Style";
    if (styles.length > 1 && weights.length === styles.length) {
      const sum = weights.reduce((a, b) => a + b, 0) || 1;
      caption += ", blended " + weights.map((w) => Math.round((100 * w) / sum) + " %").join(" / ");
    }
    $("style-caption").textContent = caption;
    $("style-figure").hidden = false;
  }
}

// ---- Run again ---------------------------------------------------------------------------

function showAgain() {
  $("again-block").hidden = !(againUrl && (status === "running" || status === "succeeded"));
}

$("again-strength").addEventListener("input", () => {
  againTouched = true;
  $("again-strength-value").textContent = $("again-strength").value;
});

$("again").addEventListener("click", async () => {
  if (!againUrl) return;
  const button = $("again");
  button.disabled = true;
  $("error").hidden = true;
  const data = new FormData();
  data.append("style_strength", $("again-strength").value);
  try {
    const response = await fetch(againUrl, { method: "POST", body: data, headers: { "X-CSRF-Token": csrfToken() } });
    let body = {};
    try { body = await response.json(); } catch (notJson) { /* the status text says enough */ }
    if (response.status === 202 && body.links && body.links.page) {
      window.location = body.links.page;
      return;
    }
    const error = body.error || {};
    showError((error.field ? error.field + ": " : "") + (error.message || response.statusText));
  } catch (failure) {
    showError("The server could not be reached: " + failure);
  }
  button.disabled = false;
});

// ---- The job's JSON (the status URL) -----------------------------------------------------

/** (long side, first iteration) per scale, coarsest first: from the job's ``scales`` list, or
 * worked out like the engine's pyramid from its size and number of scales. */
function parseScales(job) {
  const list = job.scales;
  const out = [];
  if (Array.isArray(list) && list.length) {
    let next = 1;
    for (const item of list) {
      let size = null, start = null, iterations = null;
      if (Array.isArray(item)) [size, iterations] = item;
      else if (isNumber(item)) size = item;
      else if (item && typeof item === "object") {
        size = item.size ?? item.side ?? item.long_side ?? null;
        start = item.start ?? item.start_iteration ?? item.first_iteration ?? null;
        iterations = item.iterations ?? null;
      }
      if (!isNumber(start)) start = next;
      out.push({ size, start });
      next = isNumber(iterations) && isNumber(start) ? start + iterations : NaN;
    }
    if (out.every((s) => isNumber(s.start))) return out;
    // Sizes only: the engine splits the iterations evenly, the rest to the finest.
    const each = Math.floor(total / out.length);
    return out.map((s, i) => ({ size: s.size, start: 1 + i * each }));
  }
  const params = job.params || {};
  const count = params.scales, size = params.size;
  if (!isNumber(count) || !isNumber(size) || count < 1) return null;
  const each = Math.floor(total / count);
  return Array.from({ length: count }, (_, i) => ({
    size: Math.max(16, Math.round(size / 2 ** (count - 1 - i))),
    start: 1 + i * each,
  }));
}

function applyMode(next) {
  if (!next) return;
  mode = next;
  section.dataset.mode = mode;
  $("training").hidden = mode === "fast";
}

/** Everything the status URL tells: status, ETA, mode, scales, pictures, the again link. */
function applyJob(job) {
  if (job.progress && isNumber(job.progress.total) && job.progress.total > 0) {
    total = job.progress.total;
    $("progress").max = total;
  }
  applyMode(job.mode || (job.params && job.params.mode));
  const now = Date.now();
  const given = (seconds) => (isNumber(seconds) ? { seconds, at: now } : null);
  serverEta = { eta: given(job.eta_seconds), wait: given(job.wait_seconds), position: job.queue_position };
  const parsed = parseScales(job);
  if (parsed && JSON.stringify(parsed) !== JSON.stringify(scales)) {
    scales = parsed;
    $("plot-note").hidden = scales.length < 2;
    drawPlot();
  }
  showInputs(job);
  againUrl = (job.links && job.links.again) || null;
  const strength = job.params && job.params.style_strength;
  if (!againTouched && isNumber(strength)) {
    $("again-strength").value = strength;
    $("again-strength-value").textContent = $("again-strength").value;
  }
  showStatus(job.status);
}

/** The preview the job's JSON names, if it names one: {iteration, source}. */
function previewOf(job) {
  if (job.preview && typeof job.preview === "object" && isNumber(job.preview.iteration)) {
    return { iteration: job.preview.iteration, source: job.preview.source, url: job.preview.url };
  }
  if (isNumber(job.preview_iteration)) return { iteration: job.preview_iteration, source: job.preview_source };
  return null;
}

// While the event stream runs, the status URL refreshes the ETA (queue position, wait).
async function refreshJob() {
  if (section.dataset.following === "polling") return;  // poll() reads it already
  try {
    const answer = await fetch(section.dataset.statusUrl);
    if (answer.ok) applyJob(await answer.json());
    else if (answer.status >= 400 && answer.status < 500 && answer.status !== 429) return;
  } catch (error) {
    // Away for a moment: the next turn asks again.
  }
  if (!FINISHED.includes(status)) setTimeout(refreshJob, STATUS_POLL_MS);
}

// ---- The loss plot -----------------------------------------------------------------------

function drawPlot() {
  const canvas = $("plot");
  // Crisp on any screen: the canvas's pixels follow its displayed size.
  const ratio = window.devicePixelRatio || 1;
  const shownWidth = canvas.clientWidth, shownHeight = canvas.clientHeight;
  if (shownWidth > 0 && shownHeight > 0) {
    const wantW = Math.round(shownWidth * ratio), wantH = Math.round(shownHeight * ratio);
    if (canvas.width !== wantW || canvas.height !== wantH) {
      canvas.width = wantW;
      canvas.height = wantH;
    }
  }
  const scale = shownWidth > 0 ? canvas.width / shownWidth : 1;
  const w = canvas.width / scale, h = canvas.height / scale;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 58, right = 16, top = 18, bottom = 34;
  const plotW = w - left - right, plotH = h - top - bottom;
  const font = "12px system-ui, sans-serif";
  ctx.font = font;
  ctx.strokeStyle = "#d5d9df";
  ctx.lineWidth = 1;
  ctx.strokeRect(left + 0.5, top + 0.5, plotW, plotH);

  const last = Math.max(total, points.length ? points[points.length - 1].iteration : 1, 1);
  const x = (iteration) => left + ((Math.min(iteration, last) - 1) / Math.max(last - 1, 1)) * plotW;

  // The x axis: iterations over the job's total.
  ctx.fillStyle = "#667085";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const step = niceStep(last / 5);
  for (let it = 0; it <= last; it += step) {
    const at = x(Math.max(it, 1));
    ctx.fillText(String(it), at, top + plotH + 6);
  }
  ctx.textAlign = "right";
  ctx.fillText("iteration (of " + last + ")", left + plotW, top + plotH + 20);

  // The scales of the pyramid: a dashed line where each but the first starts.
  if (scales && mode !== "fast") {
    ctx.save();
    ctx.setLineDash([4, 4]);
    ctx.strokeStyle = "#9aa4b2";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    scales.forEach((s, i) => {
      if (i === 0 || !isNumber(s.start) || s.start > last) return;
      const at = Math.round(x(s.start - 0.5)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(at, top);
      ctx.lineTo(at, top + plotH);
      ctx.stroke();
      if (isNumber(s.size)) {
        ctx.fillStyle = "#667085";
        ctx.fillText(s.size + " px", at + 4, top + 4);
      }
    });
    ctx.restore();
  }

  if (points.length === 0) {
    ctx.fillStyle = "#98a2b3";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("The loss appears here once the optimizer starts.", left + plotW / 2, top + plotH / 2);
    canvas.dataset.points = "0";
    return;
  }
  // Log scale: the loss falls by orders of magnitude.
  const logs = points.map((p) => Math.log10(Math.max(p.total, 1e-12)));
  let lo = Math.min(...logs), hi = Math.max(...logs);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.06;
  lo -= pad; hi += pad;
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * plotH;

  // Horizontal lines at the powers of ten in view (or the two ends when none is).
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const decades = [];
  for (let k = Math.ceil(lo); k <= Math.floor(hi); k++) decades.push(k);
  // Fewer than two powers of ten in view: the two ends are labelled too.
  const ends = [lo + pad, hi - pad].filter((v) => decades.every((d) => Math.abs(y(v) - y(d)) > 16));
  const ticks = decades.length >= 2 ? decades : [...decades, ...ends];
  for (const v of ticks) {
    const at = Math.round(y(v)) + 0.5;
    ctx.strokeStyle = "#eef0f3";
    ctx.beginPath();
    ctx.moveTo(left + 1, at);
    ctx.lineTo(left + plotW, at);
    ctx.stroke();
    ctx.fillStyle = "#667085";
    ctx.fillText(Number.isInteger(v) ? powerOfTen(v) : Math.pow(10, v).toPrecision(2), left - 6, at);
  }
  ctx.save();
  ctx.translate(14, top + plotH / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText("loss (log scale)", 0, 0);
  ctx.restore();

  ctx.strokeStyle = "#2f6f9f";
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.beginPath();
  logs.forEach((v, i) => (i === 0 ? ctx.moveTo(x(points[i].iteration), y(v)) : ctx.lineTo(x(points[i].iteration), y(v))));
  ctx.stroke();
  canvas.dataset.points = String(points.length);
}

/** "10³", "10⁻²". */
function powerOfTen(exponent) {
  const sup = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };
  return exponent === 0 ? "1" : "10" + String(exponent).split("").map((c) => sup[c]).join("");
}

/** 1, 2, 5, 10, 20, 50… at least ``rough``. */
function niceStep(rough) {
  const power = Math.pow(10, Math.floor(Math.log10(Math.max(rough, 1))));
  for (const m of [1, 2, 5, 10]) if (m * power >= rough) return m * power;
  return 10 * power;
}

let resizePending = false;
window.addEventListener("resize", () => {
  if (resizePending) return;
  resizePending = true;
  requestAnimationFrame(() => { resizePending = false; drawPlot(); });
});

function onLoss(point) {
  // A resumed run sends again the points after its checkpoint: they replace the old ones.
  while (points.length && points[points.length - 1].iteration >= point.iteration) points.pop();
  points.push(point);
  total = point.of || total;
  $("progress").max = total;
  $("progress").value = point.iteration;
  $("progress-text").textContent = point.iteration + " / " + total;
  $("loss").textContent = point.total.toPrecision(4) + " (content " + point.content.toPrecision(3) +
    ", style " + point.style.toPrecision(3) + ", tv " + point.tv.toPrecision(3) + ")";
  if (point.iteration > 1 && point.elapsed > 0) {
    const seconds = (point.elapsed / point.iteration) * (total - point.iteration);
    lossEta = { seconds, at: Date.now() };
  }
  renderEta();
  drawPlot();
}

async function onDone(finalStatus) {
  showStatus(finalStatus);
  let job = null;
  try {
    job = await (await fetch(section.dataset.statusUrl)).json();
    applyJob(job);
  } catch (error) {
    // The status line says enough.
  }
  if (finalStatus === "succeeded") {
    showResult();
  } else if (finalStatus === "failed" && job && job.error) {
    showError(job.error.code + ": " + job.error.message);
  }
}

// ---- Following the job: the event stream, or polling when it is refused -----------------

const events = new EventSource(section.dataset.events);
events.addEventListener("status", (e) => showStatus(JSON.parse(e.data).status));
events.addEventListener("loss", (e) => onLoss(JSON.parse(e.data)));
events.addEventListener("preview", (e) => {
  const data = JSON.parse(e.data);
  showPreview(data.url || section.dataset.preview, data.iteration, data.source);
});
events.addEventListener("done", (e) => {
  events.close();
  onDone(JSON.parse(e.data).status);
});

// A server whose event streams are all taken refuses one (503 streams_busy), and so does
// one with streams turned off; EventSource then gives up for good (it retries only dropped
// streams). The page follows the job by polling its status and its new loss points.
const POLL_MS = 2000;
let polledIteration = 0;
let polledPreview = null;

async function poll() {
  try {
    // The status first: once it says finished, every loss point is in the database.
    const answer = await fetch(section.dataset.statusUrl);
    if (answer.status >= 400 && answer.status < 500 && answer.status !== 429) {
      // Gone (expired, deleted) or no longer ours: say so, and stop asking.
      const error = (await answer.json()).error;
      showError(error.code + ": " + error.message);
      return;
    }
    const job = await answer.json();
    total = job.progress.total || total;
    const finished = FINISHED.includes(job.status);
    let page;
    do {
      const after = points.length ? points[points.length - 1].iteration : 0;
      page = await (await fetch(section.dataset.losses + "?after=" + after)).json();
      page.points.forEach((point) => onLoss(point));
    } while (finished && page.points.length > 0);
    applyJob(job);
    const named = previewOf(job);
    if (named) {
      const key = named.iteration + ":" + named.source;
      if (key !== polledPreview) {
        polledPreview = key;
        showPreview(named.url || section.dataset.preview, named.iteration, named.source);
      }
    } else if (job.progress.iteration > polledIteration) {
      polledIteration = job.progress.iteration;
      showPreview(section.dataset.preview, polledIteration);  // shown once it loads
    }
    if (finished) {
      onDone(job.status);
      return;
    }
  } catch (error) {
    // The server is away for a moment: try again at the next turn.
  }
  setTimeout(poll, POLL_MS);
}

events.addEventListener("error", () => {
  if (events.readyState === EventSource.CLOSED) {
    section.dataset.following = "polling";
    poll();
  }
});

$("cancel").addEventListener("click", async () => {
  $("cancel").disabled = true;
  await fetch(section.dataset.cancel, { method: "POST", headers: { "X-CSRF-Token": csrfToken() } });
});

applyMode(mode);
showStatus(status);
drawPlot();
refreshJob();
