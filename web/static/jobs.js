// Recent jobs, newest first, paged with the API's cursor.
"use strict";
const body = document.querySelector("#jobs tbody");
const more = document.getElementById("more");
let cursor = null;
async function load() {
  const url = "/api/jobs?limit=20" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
  const page = await (await fetch(url)).json();
  for (const job of page.jobs) {
    const row = body.insertRow();
    const link = document.createElement("a");
    link.href = job.links.page;
    link.textContent = job.id.slice(0, 8);
    row.insertCell().appendChild(link);
    row.insertCell().textContent = job.status;
    row.insertCell().textContent = job.progress.iteration + " / " + job.progress.total;
    row.insertCell().textContent = new Date(job.created_at).toLocaleString();
  }
  cursor = page.next_cursor;
  more.hidden = !cursor;
}
more.addEventListener("click", load);
load();
