// What the pages' scripts share (loaded before each of them by base.html).
"use strict";
/** "45 s", "3 min 10 s", "1 h 5 min". */
function formatSeconds(seconds) {
  const s = Math.max(1, Math.round(seconds));
  if (s < 60) return s + " s";
  if (s < 3600) {
    const m = Math.floor(s / 60), rest = s % 60;
    return rest ? m + " min " + rest + " s" : m + " min";
  }
  const h = Math.floor(s / 3600), m = Math.round((s % 3600) / 60);
  return m ? h + " h " + m + " min" : h + " h";
}
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
