// Watch a job live: status, progress and ETA, a loss plot on a canvas, previews, cancel.
"use strict";
const section = document.getElementById("job");
const $ = (id) => document.getElementById(id);
const points = [];
let total = Number($("progress").max);
let started = null;
const FINISHED = ["succeeded", "failed", "canceled"];

function drawPlot() {
  const canvas = $("plot");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 40;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#888";
  ctx.strokeRect(pad, 10, w - pad - 10, h - pad - 10);
  if (points.length === 0) return;
  // Log scale: the loss falls by orders of magnitude.
  const logs = points.map((p) => Math.log10(Math.max(p.total, 1e-12)));
  const lo = Math.min(...logs), hi = Math.max(...logs);
  const span = hi - lo || 1;
  const x = (i) => pad + ((points[i].iteration - 1) / Math.max(total - 1, 1)) * (w - pad - 10);
  const y = (v) => 10 + (1 - (v - lo) / span) * (h - pad - 10);
  ctx.fillStyle = "#333";
  ctx.font = "11px sans-serif";
  ctx.fillText(Math.pow(10, hi).toPrecision(3), 2, y(hi) + 10);
  ctx.fillText(Math.pow(10, lo).toPrecision(3), 2, y(lo));
  ctx.fillText("loss (log scale)", pad + 4, 24);
  ctx.fillText("iteration " + points[points.length - 1].iteration, w - 120, h - 12);
  ctx.strokeStyle = "#c0392b";
  ctx.lineWidth = 2;
  ctx.beginPath();
  logs.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
  ctx.stroke();
  canvas.dataset.points = String(points.length);
}

function showStatus(status) {
  $("status").textContent = status;
  const finished = FINISHED.includes(status);
  $("cancel").hidden = finished;
  if (finished) $("eta").textContent = "";
}

function onLoss(point) {
  points.push(point);
  total = point.of || total;
  $("progress").max = total;
  $("progress").value = point.iteration;
  $("progress-text").textContent = point.iteration + " / " + total;
  $("loss").textContent = point.total.toPrecision(4) + " (content " + point.content.toPrecision(3) +
    ", style " + point.style.toPrecision(3) + ", tv " + point.tv.toPrecision(3) + ")";
  if (point.iteration > 1 && point.elapsed > 0) {
    const eta = (point.elapsed / point.iteration) * (total - point.iteration);
    $("eta").textContent = "about " + Math.ceil(eta) + " s left";
  }
  drawPlot();
}

async function onDone(status) {
  showStatus(status);
  const job = await (await fetch(section.dataset.statusUrl)).json();
  if (status === "succeeded") {
    const url = section.dataset.result;
    $("result").src = url;
    $("result").hidden = false;
    $("download").href = url;
    $("download").hidden = false;
  } else if (status === "failed" && job.error) {
    $("error").textContent = job.error.code + ": " + job.error.message;
    $("error").hidden = false;
  }
}

function showPreview(url, iteration) {
  $("preview").src = url + "?iteration=" + iteration;
}
$("preview").addEventListener("load", () => { $("preview").hidden = false; });

const events = new EventSource(section.dataset.events);
events.addEventListener("status", (e) => showStatus(JSON.parse(e.data).status));
events.addEventListener("loss", (e) => onLoss(JSON.parse(e.data)));
events.addEventListener("preview", (e) => {
  const data = JSON.parse(e.data);
  showPreview(data.url, data.iteration);
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

async function poll() {
  try {
    // The status first: once it says finished, every loss point is in the database.
    const answer = await fetch(section.dataset.statusUrl);
    if (answer.status >= 400 && answer.status < 500 && answer.status !== 429) {
      // Gone (expired, deleted) or no longer ours: say so, and stop asking.
      const error = (await answer.json()).error;
      $("error").textContent = error.code + ": " + error.message;
      $("error").hidden = false;
      return;
    }
    const job = await answer.json();
    total = job.progress.total;
    const finished = FINISHED.includes(job.status);
    let page;
    do {
      const after = points.length ? points[points.length - 1].iteration : 0;
      page = await (await fetch(section.dataset.losses + "?after=" + after)).json();
      page.points.forEach((point) => onLoss(point));
    } while (finished && page.points.length > 0);
    showStatus(job.status);
    if (job.progress.iteration > polledIteration) {
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
  const csrfToken = document.querySelector("meta[name=csrf-token]").content;
  await fetch(section.dataset.cancel, { method: "POST", headers: { "X-CSRF-Token": csrfToken } });
});
drawPlot();
