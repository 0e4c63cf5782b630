// The page of a batch or a video: its parts fill in as a grid while they run (each links
// to its own page, with its loss curve), then the contact sheet or the video.
"use strict";
const $ = (id) => document.getElementById(id);
const section = $("job");
const isVideo = section.dataset.kind === "video";
const csrfToken = () => document.querySelector("meta[name=csrf-token]").content;
const finished = (status) => ["succeeded", "failed", "canceled"].includes(status);
let shownPreview = false;

function tile(item) {
  let li = document.getElementById("part-" + item.id);
  if (!li) {
    li = document.createElement("li");
    li.id = "part-" + item.id;
    li.className = "part";
    const link = document.createElement("a");
    link.href = section.dataset.page.replace("PART", item.id);
    link.className = "part-link";
    const img = document.createElement("img");
    img.alt = "part " + (item.index + 1);
    img.hidden = true;
    img.addEventListener("error", () => { img.hidden = true; });
    const label = document.createElement("span");
    label.className = "part-label";
    link.append(img, label);
    li.append(link);
    $("parts").append(li);
  }
  const frames = item.frames ? ` · frames ${item.frames.start + 1}–${item.frames.stop}` : "";
  li.dataset.status = item.status;
  li.querySelector(".part-label").textContent =
    `${item.index + 1}${frames} · ${item.status} · ${item.iteration}/${item.total} · loss`;
  if (item.iteration > 0) {
    const img = li.querySelector("img");
    img.addEventListener("load", () => { img.hidden = false; }, { once: true });
    img.src = item.url + "/preview?at=" + item.iteration;
  }
}

function apply(job) {
  const status = $("status");
  status.textContent = job.status;
  status.dataset.status = job.status;
  $("parts-count").textContent = ` · ${job.parts.done} of ${job.parts.total} parts done`;
  $("progress").max = job.progress.total || 1;
  $("progress").value = job.progress.iteration;
  $("progress-text").textContent = `${job.progress.iteration} / ${job.progress.total}`;
  job.parts.items.forEach(tile);
  if (job.error) {
    $("error").textContent = job.error.message;
    $("error").hidden = false;
  }
  if (isVideo && job.preview && !shownPreview && job.status !== "succeeded") {
    shownPreview = true;
    const video = $("result-video");
    video.src = section.dataset.preview;
    video.hidden = false;
    $("placeholder").hidden = true;
    $("caption").textContent = "Feed-forward video (instant preview)";
  }
  if (job.status === "succeeded") {
    if (isVideo) {
      const video = $("result-video");
      video.src = section.dataset.result;
      video.hidden = false;
      $("placeholder").hidden = true;
      $("caption").textContent = "Steady video (Ruder et al.)";
    } else {
      $("sheet").src = section.dataset.preview;
      $("sheet-figure").hidden = false;
    }
    $("download").hidden = false;
  }
  if (finished(job.status)) $("cancel").hidden = true;
}

async function poll() {
  try {
    const job = await (await fetch(section.dataset.statusUrl)).json();
    apply(job);
    if (finished(job.status)) return;
  } catch (error) {
    // The server is away for a moment: try again.
  }
  setTimeout(poll, 1500);
}

$("cancel").addEventListener("click", async () => {
  await fetch(section.dataset.cancel, { method: "POST", headers: { "X-CSRF-Token": csrfToken() } });
  poll();
});
poll();
