// DOM helpers.  Data only ever reaches the page through textContent and
// setAttribute on attributes that cannot execute (never innerHTML, never href
// built from data except our own "#<order>" and encoded paths).
import { parseJson } from "./chain.js";
import { instant } from "./signing.js";

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k === "class") node.className = v;
    else if (k === "style") for (const [p, val] of Object.entries(v)) node.style.setProperty(p, val);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-") || ["title", "href", "id", "type", "role", "aria-label", "download", "for", "tabindex"].includes(k))
      node.setAttribute(k, String(v));
    else throw new Error("el: unsupported property " + k);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

// "2026-03-14T09:30:00.123456Z" -> "09:30:00.123", in UTC (also for a time with another
// offset), as `convlog replay` shows it (services/cli/render.py's clock); the text when it is no time.
export function shortTime(iso) {
  const t = instant(iso);
  const d = t === null ? null : new Date(t[0] * 1000 + Math.floor(t[1] / 1000));
  return d === null || Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().slice(11, 23);
}

// "2026-03-14T10:30:00.123456+01:00" -> "2026-03-14 09:30:00.123 UTC  (2026-03-14T10:30:00.123456+01:00)":
// UTC, whatever the reviewer's time zone (toLocaleString gave the browser's local time, unlabelled).
export function longTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().replace("T", " ").replace("Z", " UTC") + "  (" + iso + ")";
}

export function ago(iso) {
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (!Number.isFinite(s)) return "";
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function sessionPath(sid) {
  return "/sessions/" + encodeURIComponent(sid);
}

// A line `convlog replay` skips: ASCII whitespace only (trim() would also take a byte
// order mark, U+00A0 or U+2028 for nothing, where replay refuses the line).
export function blank(line) {
  return /^[ \t\n\r\v\f]*$/.test(line);
}

// Parse a JSONL stream, handing each chunk's lines to onBatch; throws at the first line that is not a JSON object.
export async function readJsonl(stream, onBatch) {
  const reader = stream.getReader();
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true }); // a BOM is no whitespace to replay
  let buf = "", line = 0;
  for (;;) {
    const { done, value } = await reader.read();
    buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
    const parts = buf.split("\n");
    buf = done ? "" : parts.pop();
    const batch = [];
    for (const p of parts) {
      line++;
      if (blank(p)) continue;
      try {
        batch.push(parseJson(p));
      } catch {
        onBatch(batch); // what came before the bad line is still shown and checked
        throw new Error(`line ${line} is not a JSON object`);
      }
    }
    onBatch(batch);
    if (done) return;
  }
}
