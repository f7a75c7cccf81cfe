// The sessions page: newest first, filtered by id prefix, paged with cursors.
import { ago, clear, el, longTime, sessionPath } from "./common.js";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
let cursors = [null]; // cursor of each page shown so far; the last is the current page's
let next = null;
let latest = 0; // only the newest request's answer is shown
// A listing scans long sessions for their agents within a budget and marks the rows it
// has not scanned to their end ("…"); each listing scans on.  The page lists again by
// itself while a row is so marked, so their agents complete without a click on Refresh:
// RESCAN_MS after each such listing, at most RESCANS times after the user's last listing,
// and only while the tab is visible (a hidden tab lists again once shown).
const RESCAN_MS = 1000;
const RESCANS = 30;
let rescans = 0; // listings made by the page since the user's last
let rescan = null; // the timer of the next one
let rescanWhenShown = false; // its time came while the tab was hidden

function stopRescan() {
  clearTimeout(rescan);
  rescan = null;
  rescanWhenShown = false;
}

function relist() {
  rescan = null;
  if (document.visibilityState === "hidden") { rescanWhenShown = true; return; }
  rescans++;
  load({ auto: true });
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "hidden" && rescanWhenShown) { rescanWhenShown = false; relist(); }
});

async function load({ auto = false } = {}) {
  const mine = ++latest;
  stopRescan();
  if (!auto) rescans = 0;
  const q = new URLSearchParams({ limit: String(PAGE) });
  const prefix = $("prefix").value.trim();
  if (prefix) q.set("prefix", prefix);
  const cursor = cursors[cursors.length - 1];
  if (cursor) q.set("cursor", cursor);
  // Not on the page's own listings: the rows stay as they are until the answer replaces
  // them, with no "loading…" flashing every second.
  if (!auto) $("message").textContent = "loading…";
  let body;
  try {
    const res = await fetch(`/api/sessions?${q}`, { cache: "no-store" });
    // An error may come with no JSON (a proxy's error page): then its status says what went wrong.
    body = res.ok ? await res.json() : await res.json().catch(() => null);
    if (mine !== latest) return; // a newer listing was asked for meanwhile
    if (!res.ok) throw new Error(body?.error?.message || `HTTP ${res.status}`);
  } catch (err) {
    if (mine !== latest) return;
    $("message").textContent = `Could not list sessions: ${err.message}`;
    return;
  }
  $("message").textContent = "";
  const rows = $("rows");
  // The row whose link has the keyboard focus keeps it (the rows are made anew).
  const focused = rows.contains(document.activeElement) ? document.activeElement.closest("tr")?.dataset.sid : undefined;
  clear(rows);
  for (const s of body.sessions) {
    rows.append(el("tr", { "data-sid": s.session_id },
      el("td", { class: "sid" }, el("a", { href: sessionPath(s.session_id), text: s.session_id })),
      el("td", { class: "num", text: s.items }),
      el("td", { title: longTime(s.updated_at), text: `${ago(s.updated_at)} · ${String(s.updated_at).slice(0, 19).replace("T", " ")} UTC` }),
      el("td", {}, ...s.agents.map((a) => el("span", { class: "chip", text: a })),
        s.agents_partial ? el("span", { class: "message", title: "long session: still scanning for more agents", text: "…" }) : null)));
  }
  if (focused !== undefined) rows.querySelector(`tr[data-sid="${CSS.escape(focused)}"] a`)?.focus({ preventScroll: true });
  if (!body.sessions.length) rows.append(el("tr", {}, el("td", { text: prefix ? `No session id starts with ${prefix}.` : "No sessions yet." })));
  next = body.next;
  $("older").disabled = !next;
  $("newer").disabled = cursors.length < 2;
  const first = (cursors.length - 1) * PAGE;
  $("total").textContent = `${body.total} sessions`;
  $("page-info").textContent = body.sessions.length ? `${first + 1}–${first + body.sessions.length} of ${body.total}` : "";
  if (body.sessions.some((s) => s.agents_partial) && rescans < RESCANS) rescan = setTimeout(relist, RESCAN_MS);
}

let timer = null;
$("prefix").addEventListener("input", () => {
  clearTimeout(timer);
  stopRescan(); // it would list the new prefix with the old page's cursor
  timer = setTimeout(() => { cursors = [null]; load(); }, 200);
});
$("refresh").addEventListener("click", () => load());
// A cursor is used once: a second click before its page comes (a double click) must not
// push it again, which showed the same page under the next page's numbers.
$("older").addEventListener("click", () => {
  if (!next) return;
  cursors.push(next);
  next = null;
  $("older").disabled = true;
  load();
});
$("newer").addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); load(); } });
load();
