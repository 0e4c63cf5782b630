// Submit the form to the API and go to the job's page; show the API's error otherwise.
"use strict";
const form = document.getElementById("job-form");
const errorBox = document.getElementById("form-error");
// The session's CSRF token: the API refuses a POST made with our cookie but without it.
const csrfToken = document.querySelector("meta[name=csrf-token]").content;
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  errorBox.hidden = true;
  const data = new FormData(form);
  for (const [name, value] of [...data.entries()]) {
    if (value === "" || (value instanceof File && value.name === "")) data.delete(name);
  }
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    const response = await fetch("/api/jobs", { method: "POST", body: data, headers: { "X-CSRF-Token": csrfToken } });
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
