// Submit the form to the API and go to the job's page; show the API's error otherwise.
// The speed presets fill in size, iterations and mode; the expected time is asked of the API.
"use strict";
const form = document.getElementById("job-form");
const errorBox = document.getElementById("form-error");
// The session's CSRF token: the API refuses a POST made with our cookie but without it.
const csrfToken = document.querySelector("meta[name=csrf-token]").content;
const submitUrl = form.dataset.submit || "/api/jobs";
const estimateUrl = form.dataset.estimate || "/api/estimate";
// The field named ``name`` as it is now (looked up each time: a page may replace it).
const field = (name) => form.elements.namedItem(name);

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  errorBox.hidden = true;
  const data = new FormData(form);
  data.delete("speed");  // the page's own choice: size, iterations and mode say what it means
  for (const [name, value] of [...data.entries()]) {
    if (value === "" || (value instanceof File && value.name === "")) data.delete(name);
  }
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    const response = await fetch(submitUrl, { method: "POST", body: data, headers: { "X-CSRF-Token": csrfToken } });
    const body = await response.json();
    if (response.status === 202) {
      window.location = body.links.page;
      return;
    }
    const error = body.error || {};
    errorBox.textContent = (error.field ? error.field + ": " : "") + (error.message || response.statusText);
  } catch (failure) {
    errorBox.textContent = "The server could not be reached: " + failure;
  }
  errorBox.hidden = false;
  button.disabled = false;
});

// The strength slider shows its value beside it.
const strength = document.getElementById("style_strength");
const strengthValue = document.getElementById("strength-value");
if (strength && strengthValue) {
  strength.addEventListener("input", () => { strengthValue.textContent = strength.value; });
}

// ---- Speed presets -------------------------------------------------------------------------

const speedRadios = () => [...form.querySelectorAll("input[name=speed]")];
const presetRadios = () => speedRadios().filter((radio) => radio.value !== "custom");

function setMode(mode) {
  const modeField = document.getElementById("mode");
  if (modeField) modeField.value = mode;
}

/** A whole number within the input's own limits. */
function within(input, value) {
  let number = Math.round(Number(value));
  if (input.min !== "" && number < Number(input.min)) number = Number(input.min);
  if (input.max !== "" && number > Number(input.max)) number = Number(input.max);
  return String(number);
}

function applySpeed(radio) {
  if (!radio) return;
  if (radio.value === "custom") {
    setMode("optimize");
    return;
  }
  const size = field("size"), iterations = field("iterations");
  if (size && Number(radio.dataset.size) > 0) size.value = within(size, radio.dataset.size);
  if (iterations && Number(radio.dataset.iterations) > 0) {
    iterations.value = within(iterations, radio.dataset.iterations);
  }
  setMode(radio.dataset.mode || "optimize");
}

/** Size or iterations typed by hand: no preset any more, an optimization with those numbers. */
function chooseCustom() {
  const custom = speedRadios().find((radio) => radio.value === "custom");
  speedRadios().forEach((radio) => { radio.checked = radio === custom; });
  setMode("optimize");
}

// ---- Expected time -------------------------------------------------------------------------

// formatSeconds and isNumber: common.js.

let photo = null;  // {width, height} of the chosen content photo, once read
let photoRead = 0;
let thumbUrl = null;

/** The chosen photo's size, read here (the estimate depends on its shape), and a thumbnail. */
function readPhoto(input) {
  const reading = ++photoRead;
  photo = null;
  const thumb = document.getElementById("content-thumb");
  if (thumbUrl) URL.revokeObjectURL(thumbUrl);
  thumbUrl = null;
  if (thumb) thumb.hidden = true;
  const file = input.files && input.files[0];
  if (!file) {
    scheduleEstimate();
    return;
  }
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    if (reading !== photoRead) return URL.revokeObjectURL(url);
    photo = { width: image.naturalWidth, height: image.naturalHeight };
    // No thumbnail of a huge picture: decoding it would cost more than it shows.
    if (thumb && photo.width * photo.height <= 40e6) {
      thumbUrl = url;
      thumb.src = url;
      thumb.hidden = false;
    } else {
      URL.revokeObjectURL(url);
    }
    scheduleEstimate();
  };
  image.onerror = () => {
    URL.revokeObjectURL(url);
    if (reading === photoRead) scheduleEstimate();
  };
  image.src = url;
}

function estimateQuery(size, iterations, mode) {
  const query = new URLSearchParams();
  if (size) query.set("size", size);
  if (iterations) query.set("iterations", iterations);
  if (mode) query.set("mode", mode);
  const scales = field("scales");
  if (scales && scales.value) query.set("scales", scales.value);
  if (photo) {
    query.set("width", String(photo.width));
    query.set("height", String(photo.height));
  }
  return estimateUrl + "?" + query;
}

async function askEstimate(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(response.statusText);
  return response.json();
}

function describe(estimate) {
  if (!isNumber(estimate.total_seconds)) return estimate.message || "";
  const workers = isNumber(estimate.workers) ? estimate.workers : 0;
  let text = "Expected: about " + formatSeconds(estimate.total_seconds);
  if (workers > 0) text += " on " + workers + " worker" + (workers === 1 ? "" : "s");
  if (isNumber(estimate.wait_seconds)) {
    text += estimate.wait_seconds >= 0.5 ? " (queue wait " + formatSeconds(estimate.wait_seconds) + ")"
      : " (no queue wait)";
  }
  return text;
}

let asked = 0;
/** The job as the form stands, and each preset: ask, and show what comes back (quietly
 * nothing when the API does not answer). Only the latest round's answers are shown. */
function refreshEstimates() {
  const round = ++asked;
  const box = document.getElementById("estimate");
  const size = field("size"), iterations = field("iterations"), mode = document.getElementById("mode");
  if (box) {
    askEstimate(estimateQuery(size && size.value, iterations && iterations.value, mode && mode.value))
      .then((estimate) => { if (round === asked) box.textContent = describe(estimate); })
      .catch(() => { if (round === asked) box.textContent = ""; });
  }
  for (const radio of presetRadios()) {
    const time = form.querySelector(`.speed-time[data-speed="${CSS.escape(radio.value)}"]`);
    if (!time) continue;
    const presetSize = size && Number(radio.dataset.size) > 0 ? within(size, radio.dataset.size) : radio.dataset.size;
    askEstimate(estimateQuery(presetSize, radio.dataset.iterations, radio.dataset.mode))
      .then((estimate) => {
        if (round !== asked) return;
        const seconds = isNumber(estimate.run_seconds) ? estimate.run_seconds : null;
        time.textContent = seconds === null ? "" : " · about " + formatSeconds(seconds);
      })
      .catch(() => { if (round === asked) time.textContent = ""; });
  }
}

let estimateTimer = null;
function scheduleEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(refreshEstimates, 300);
}

// Delegated: the listeners hold on even where a field's element is replaced.
form.addEventListener("input", (event) => {
  const name = event.target.name;
  if (name === "size" || name === "iterations") chooseCustom();
  if (name === "size" || name === "iterations" || name === "scales") scheduleEstimate();
});
form.addEventListener("change", (event) => {
  const target = event.target;
  if (target.name === "speed" && target.checked) {
    applySpeed(target);
    scheduleEstimate();
  } else if (target.id === "content") {
    readPhoto(target);
  } else if (target.name === "scales" || target.name === "mode") {
    scheduleEstimate();
  }
});

// The checked preset (the browser may have restored another than the page's default).
applySpeed(speedRadios().find((radio) => radio.checked));
const contentInput = document.getElementById("content");
if (contentInput && contentInput.files && contentInput.files.length) readPhoto(contentInput);
refreshEstimates();
setInterval(() => { if (!document.hidden) refreshEstimates(); }, 15000);
