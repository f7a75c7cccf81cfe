// The sessions page: newest first, filtered by id prefix, paged with cursors.
import { ago, clear, el, longTime, sessionPath } from "./common.js";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
let cursors = [null]; // cursor of each page shown so far; the last is the current page's
let next = null;
let latest = 0; // only the newest request's answer is shown

async function load() {
  const mine = ++latest;
  const q = new URLSearchParams({ limit: String(PAGE) });
  const prefix = $("prefix").value.trim();
  if (prefix) q.set("prefix", prefix);
  const cursor = cursors[cursors.length - 1];
  if (cursor) q.set("cursor", cursor);
  $("message").textContent = "loading…";
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
  clear(rows);
  for (const s of body.sessions) {
    rows.append(el("tr", { "data-sid": s.session_id },
      el("td", { class: "sid" }, el("a", { href: sessionPath(s.session_id), text: s.session_id })),
      el("td", { class: "num", text: s.items }),
      el("td", { title: longTime(s.updated_at), text: `${ago(s.updated_at)} · ${String(s.updated_at).slice(0, 19).replace("T", " ")} UTC` }),
      el("td", {}, ...s.agents.map((a) => el("span", { class: "chip", text: a })),
        s.agents_partial ? el("span", { class: "message", title: "long session: still scanning for more agents", text: "…" }) : null)));
  }
  if (!body.sessions.length) rows.append(el("tr", {}, el("td", { text: prefix ? `No session id starts with ${prefix}.` : "No sessions yet." })));
  next = body.next;
  $("older").disabled = !next;
  $("newer").disabled = cursors.length < 2;
  const first = (cursors.length - 1) * PAGE;
  $("total").textContent = `${body.total} sessions`;
  $("page-info").textContent = body.sessions.length ? `${first + 1}–${first + body.sessions.length} of ${body.total}` : "";
}

let timer = null;
$("prefix").addEventListener("input", () => {
  clearTimeout(timer);
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
