// One conversation: agent lanes, a virtual list, the in-browser chain check, the live tail.
import { ChainVerifier, engine, headLine, parseJson } from "./chain.js";
import { SignatureChecker, parseKeyring } from "./signing.js";
import { blank, clear, el, longTime, readJsonl, sessionPath, shortTime } from "./common.js";
import { Conversation, describe, handoffTarget, str } from "./model.js";

let ROW_H = 68; // px; every row has the same height, so only rows on screen exist (136: tall rows)
const OVERSCAN = 8;
const $ = (id) => document.getElementById(id);
const state = { firstScreenMs: null, verifiedMs: null, loaded: false, loadFailed: false, live: "off", witnessUnread: false };
window.__convlog = state;

const fileMode = location.pathname === "/verify";
const sid = fileMode ? null : decodeURIComponent(location.pathname.split("/")[2] || "");
let conv = new Conversation(sid);
let verifier = new ChainVerifier(sid);
let sigs = new SignatureChecker();
let verifying = Promise.resolve();
let source = null;

const scroller = $("scroller");
const canvas = $("canvas");
const rendered = new Map(); // row index -> element

function laneStyle(lane, n) {
  return { "--lane": String(lane), "--lanes": String(n) };
}

function renderLanes() {
  const lanes = conv.lanes;
  const head = $("lanes-head");
  clear(head);
  lanes.forEach((name, i) => head.append(el("div", { class: "lane-label", style: laneStyle(i, lanes.length), "data-lane": name, text: name, title: name })));
  for (const old of canvas.querySelectorAll(".lane-line")) old.remove();
  lanes.forEach((name, i) => canvas.append(el("div", { class: "lane-line", style: laneStyle(i, lanes.length) })));
}

function statusMark(order) {
  const s = verifier.status.get(order);
  if (s === "ok") return el("span", { class: "vmark ok", title: "hash verified in this browser", text: "✓" });
  if (s === "bad") return el("span", { class: "vmark bad", title: "first bad item", text: "✗" });
  return el("span", { class: "vmark", title: "not verified", text: "·" });
}

function sigMark(env) {
  const m = sigs.mark(env);
  if (!m) return el("span", { class: "smark", title: "not signed", text: "" });
  return el("span", { class: `smark ${m.cls}`, title: m.text, text: m.cls === "bad" ? "✗" : "✎" });
}

function card(env, lanes, extraText) {
  const [kind, text] = describe(env);
  const lane = conv.laneOf(env.agent);
  const hidden = conv.hiddenBy.get(env.item_order);
  const meta = el("div", { class: "meta" },
    el("span", { class: "agent", text: env.agent }), " · ", el("span", { class: "kind", text: kind }),
    hidden ? el("span", { class: "note", text: ` · ${hidden.how} by #${hidden.by}` }) : null);
  const body = el("div", { class: "text", text: extraText ? `${text}  ⟶  ${extraText}` : text });
  return el("div", {
    class: "card" + (hidden ? " struck" : "") + (env.kind !== "item" ? " control" : ""),
    style: laneStyle(lane, lanes.length), "data-agent": env.agent, "data-kind": kind, "data-order": env.item_order,
  }, meta, body);
}

function arrow(fromAgent, toAgent, tool, lanes, order) {
  const a = conv.laneOf(fromAgent), b = conv.laneOf(toAgent);
  const lo = Math.min(a, b), hi = Math.max(a, b);
  return el("div", {
    class: "arrow" + (b < a ? " leftward" : ""), "data-from": fromAgent, "data-to": toAgent, "data-tool": tool, "data-order": order,
    style: { "--from": String(lo), "--span": String(Math.max(hi - lo, 0.25)), "--lanes": String(lanes.length) },
  }, el("span", { class: "arrow-label", text: `${tool} → ${toAgent}` }));
}

function renderRow(r) {
  const row = conv.rows[r];
  const env = conv.items[row.i];
  const lanes = conv.lanes;
  const out = row.pair !== undefined ? conv.items[row.pair] : null;
  const el_ = el("div", { class: "row", style: { top: `${r * ROW_H}px` }, "data-order": env.item_order, id: `row-${env.item_order}` });
  const gutter = el("div", { class: "gutter" },
    el("a", { class: "order", href: `#${env.item_order}`, text: `#${env.item_order}` }), statusMark(env.item_order), sigMark(env),
    el("span", { class: "time", title: longTime(env.created_at), text: shortTime(env.created_at) }));
  const area = el("div", { class: "lanes-area" });
  const target = handoffTarget(out || env);
  if (target !== null && (out || conv.callOf.has(row.i))) {
    const callIdx = out ? row.i : conv.callOf.get(row.i);
    const call = conv.items[callIdx];
    const hidden = conv.hiddenBy.has(env.item_order);
    const a = arrow(call.agent, target, str(call.data?.name ?? "handoff"), lanes, env.item_order);
    if (hidden) a.classList.add("struck");
    area.append(a);
  } else {
    area.append(card(env, lanes, out ? describe(out)[1] : null));
  }
  if (conv.foldable(row.i)) {
    const collapsed = row.pair !== undefined;
    area.firstChild.append(el("button", {
      class: "toggle", title: collapsed ? "show the call and its output" : "fold the output into the call",
      text: collapsed ? "▸ unfold" : "▾ fold", "aria-label": collapsed ? "unfold" : "fold",
      onclick: (e) => { e.stopPropagation(); conv.toggle(row.i); refresh(true); },
    }));
  } else if (conv.callOf.has(row.i)) {
    el_.classList.add("output");
  }
  el_.append(gutter, area);
  el_.addEventListener("click", () => select(env.item_order, false));
  if (selected === env.item_order || (out && selected === out.item_order)) el_.classList.add("selected");
  return el_;
}

function draw() {
  const n = conv.rows.length;
  canvas.style.height = `${n * ROW_H}px`;
  const top = scroller.scrollTop, h = scroller.clientHeight;
  const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
  const last = Math.min(n - 1, Math.ceil((top + h) / ROW_H) + OVERSCAN);
  for (const [r, node] of rendered) if (r < first || r > last) { node.remove(); rendered.delete(r); }
  for (let r = first; r <= last; r++) if (!rendered.has(r)) { const node = renderRow(r); rendered.set(r, node); canvas.append(node); }
  if (state.firstScreenMs === null && (n * ROW_H >= h || state.loaded) && n > 0) {
    state.firstScreenMs = Math.round(performance.now());
    performance.mark("convlog:first-screen");
  }
}

let pending = false;
function refresh(rowsChanged, lanesChanged) {
  if (lanesChanged) renderLanes();
  if (rowsChanged) {
    conv.rebuildRows();
    for (const node of rendered.values()) node.remove();
    rendered.clear();
  }
  canvas.style.height = `${conv.rows.length * ROW_H}px`; // now, so scrolling to a row works at once
  if (!pending) {
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  }
  $("count").textContent = `${conv.items.length} items · ${conv.lanes.length - 2} agents`;
}
scroller.addEventListener("scroll", () => refresh(false), { passive: true });
window.addEventListener("resize", () => refresh(false));

function updateBadge() {
  const b = $("badge");
  const chainProblem = verifier.problem;
  const complete = state.loaded && verifier.verified === conv.items.length;
  const sp = chainProblem ? null : sigs.problem(verifier.verified);
  const hp = chainProblem || sp ? null : sigs.headProblem(verifier.sessionId, conv.items, conv.byOrder, complete);
  const p = chainProblem || sp || hp;
  const unloaded = !p && state.loadFailed && verifier.verified === 0;
  // The server could not read the witness head: only the log's own (fresh) head checked the
  // tail, which a store restored from an older copy passes -- no plain green then.
  const intact = verifier.verified === conv.items.length && state.loaded;
  b.className = "badge " + (p ? "bad" : unloaded ? "working"
    : intact ? (state.witnessUnread || state.loadFailed ? "warn" : "good") : "working");
  if (p) {
    b.textContent = chainProblem ? `✗ chain broken at #${p.order}: ${p.reason}`
      : sp ? `✗ bad signature at #${p.order}: ${p.reason}` : `✗ ${p.reason}`;
    b.setAttribute("href", `#${p.order}`);
  } else if (unloaded) {
    b.textContent = "nothing verified: the session did not load";
    b.removeAttribute("href");
  } else if (verifier.verified === 0 && state.loaded) {
    b.textContent = "no items to verify";
  } else {
    const summary = sigs.summary();
    const signed = summary ? ` · ${summary}` : "";
    // The export did not load (the log service down): what is shown came by the live tail
    // alone, with none of the log's signed heads, so nothing checked that no item was cut off.
    const unwitnessed = state.loadFailed
      ? " · ⚠ the export did not load: these items came by the live tail, no signed head was checked"
      : state.witnessUnread
        ? " · ⚠ the witness head could not be read: the truncation check covered only the log's own head" : "";
    b.textContent = (intact ? `${unwitnessed ? "⚠" : "✓"} chain intact through #${verifier.verified}` : `verifying… ${verifier.verified}/${conv.items.length}`) + signed + unwitnessed;
    b.removeAttribute("href");
  }
  // A head hash the reviewer holds from elsewhere (a receipt, `convlog replay`) closes the
  // gap a chain alone leaves: a rewritten chain, or its newest items dropped.
  const held = expectedHead();
  const hb = $("held");
  hb.hidden = !held;
  if (held && !p && state.loaded && verifier.verified === conv.items.length) {
    const at = conv.items.find((e) => e.hash.startsWith(held));
    hb.className = "badge " + (at ? "good" : "bad");
    hb.textContent = at
      ? `✓ holds your head #${at.item_order}` + (at.item_order < verifier.verified ? ` (+${verifier.verified - at.item_order} since)` : "")
      : `✗ your head ${held.slice(0, 8)}… is not in this chain`;
    hb.title = at ? "" : "the chain served here does not contain the head hash you hold: it was rewritten, or its newest items were cut off";
  } else if (held) {
    hb.className = "badge working";
    hb.textContent = p ? "head not checked: the chain is broken" : "checking your head…";
  }
  b.title = `SHA-256 (${engine}) over RFC 8785 canonical JSON, recomputed in this browser` +
    (verifier.verified ? `; head hash ${verifier.prev}` : "");
  $("head").textContent = verifier.verified && !p ? `head ${verifier.prev.slice(0, 16)}…` : "";
  $("head").title = verifier.prev;
  for (const [r, node] of rendered) { // refresh the ✓ marks on screen
    const order = conv.items[conv.rows[r].i].item_order;
    node.querySelector(".vmark")?.replaceWith(statusMark(order));
    node.querySelector(".smark")?.replaceWith(sigMark(conv.items[conv.rows[r].i]));
  }
}

// The data stopped making sense (a line that is not a JSON object): nothing after it can be trusted.
function fail(reason) {
  verifying = verifying.then(() => { verifier.problem ??= { order: verifier.verified + 1, reason }; }).then(updateBadge);
}

function add(lines) {
  // The last lines of an export may be the log service's signed heads.
  const heads = lines.map(headLine).filter((h) => h !== null);
  const envs = heads.length ? lines.filter((x) => headLine(x) === null) : lines;
  if (heads.length) verifying = verifying.then(() => sigs.addHeads(heads)).then(updateBadge);
  if (!envs.length) return;
  const from = conv.items.length;
  const lanesChanged = conv.add(envs);
  if (!lanesChanged && conv.appendRows(from)) refresh(false); // rows on screen stay as they are
  else refresh(true, lanesChanged);
  verifying = verifying.then(() => verifier.feed(envs)).then(() => sigs.feed(envs)).then(updateBadge);
}

function expectedHead() {
  const v = ($("expect-head").value || "").trim().toLowerCase();
  return /^[0-9a-f]{12,64}$/.test(v) ? v : null;
}
$("expect-head").value = new URLSearchParams(location.search).get("head") || "";
$("expect-head").addEventListener("input", () => updateBadge());

let selected = null;
function select(order, scroll = true) {
  const i = conv.byOrder.get(order);
  if (i === undefined) return;
  const env = conv.items[i];
  if (conv.agentsSaw && !conv.visibleToAgents(env)) { conv.agentsSaw = false; $("agents-saw").checked = false; conv.rebuildRows(); }
  selected = order;
  if (location.hash !== `#${order}`) history.replaceState(null, "", `#${order}`);
  let r = conv.rowOfOrder(order);
  if (scroll && r >= 0) scroller.scrollTop = Math.max(0, r * ROW_H - scroller.clientHeight / 3);
  refresh(true);
  showDetail(env);
}

function showDetail(env) {
  const d = $("detail");
  clear(d);
  const [kind, text] = describe(env);
  const hidden = conv.hiddenBy.get(env.item_order);
  const s = verifier.status.get(env.item_order);
  const check = s === "ok" ? "hash verified in this browser" : s === "bad" ? "FIRST BAD ITEM: " + verifier.problem?.reason : "not verified (the chain broke earlier or is still being checked)";
  const prev = conv.byOrder.has(env.item_order - 1) ? conv.items[conv.byOrder.get(env.item_order - 1)].hash : "0".repeat(64);
  const field = (k, v) => [el("dt", { text: k }), el("dd", { text: v })];
  d.append(
    el("button", { class: "close", text: "×", title: "close", onclick: () => { d.hidden = true; selected = null; refresh(true); } }),
    el("h2", { text: `#${env.item_order} · ${env.agent} · ${kind}` }),
    el("dl", {}, ...field("time", longTime(env.created_at)), ...field("kind", env.kind), ...field("item_id", env.item_id),
      ...field("hash", env.hash), ...field("prev hash", prev), ...field("check", check),
      ...(sigs.mark(env) ? field("signature", sigs.mark(env).text) : []),
      ...(hidden ? field("hidden", `${hidden.how} by #${hidden.by}: the agents no longer saw it`) : [])),
    el("h3", { text: "content" }), el("pre", { class: "content", text }),
    el("h3", { text: "envelope" }), el("pre", { class: "raw", text: JSON.stringify(env, null, 2) }));
  d.hidden = false;
}

function onHash() {
  const m = /^#(\d+)$/.exec(location.hash);
  if (m) select(Number(m[1]));
}
window.addEventListener("hashchange", onHash);

function finishLoad() {
  state.loaded = true;
  state.loadedMs = Math.round(performance.now());
  refresh(false);
  verifying.then(() => {
    state.verifiedMs = Math.round(performance.now());
    performance.mark("convlog:verified");
    updateBadge();
    onHash();
  });
}

async function loadFromServer() {
  $("export").setAttribute("href", `${sessionPath(sid)}/export.jsonl?download=1`);
  try {
    const res = await fetch(`${sessionPath(sid)}/export.jsonl`, { cache: "no-store" });
    if (res.status === 404) $("message").textContent = "No items yet: waiting for the first one.";
    else if (!res.ok) throw new Error((await res.json().catch(() => null))?.error?.message || `HTTP ${res.status}`);
    else {
      state.witnessUnread = res.headers.get("x-convlog-witness") === "unavailable";
      try {
        await readJsonl(res.body, add);
      } catch (err) {
        fail(`the export is unreadable after #${conv.lastOrder}: ${err.message}`);
        throw err;
      }
    }
  } catch (err) {
    $("message").textContent = `Could not load the session: ${err.message}`;
    state.loadFailed = true; // nothing to call intact: the badge must not turn green
  }
  finishLoad();
  startLive();
}

let reopenDelay = 1000; // ms before a tail the browser gave up on is opened again (doubling to 30 s)
const STALLED_MS = 10_000; // a tail not open by then: the browser is holding the request back
// A browser opens at most 6 connections to one server over HTTP/1.1, for all its tabs, and
// each open tail keeps one: six tabs in view would take them all, and the next tab (every
// other request of the console too) would wait for good. So the tabs of this console share
// LIVE_SLOTS tails (Web Locks, held while a tail is open, let go with the tab), which leaves
// connections for pages and exports; a tab beyond them waits for a slot and says so.
const LIVE_SLOTS = 4;
let slot = null; // lets this tab's slot go (null: it holds none)
let slotWait = null; // the AbortController of a wait for a slot

function lockSlot(i, options) { // a function that lets slot i go, or null (taken, or the wait aborted)
  return new Promise((resolve) => {
    navigator.locks.request(`convlog-live-tail-${i}`, options, (lock) => {
      if (!lock) return resolve(null);
      return new Promise((letGo) => resolve(letGo));
    }).catch(() => resolve(null));
  });
}

// Over HTTP/2 or 3 (a proxy in front of the console) every request shares one connection: no limit to share out.
const multiplexed = ["h2", "h3"].includes(performance.getEntriesByType("navigation")[0]?.nextHopProtocol);

async function takeSlot() {
  if (!navigator.locks || multiplexed) return () => {}; // no Web Locks (not a secure context): not shared out
  const wait = new AbortController(); // aborted: the tab was hidden meanwhile
  slotWait = wait;
  try {
    for (let i = 0; i < LIVE_SLOTS && !wait.signal.aborted; i++) {
      const letGo = await lockSlot(i, { ifAvailable: true });
      if (letGo) return letGo;
    }
    if (wait.signal.aborted) return null;
    state.live = "waiting"; $("live").textContent = "○ waiting for a connection"; $("live").className = "live off";
    $("message").textContent = `Not live yet: ${LIVE_SLOTS} other console tabs are following sessions, and the browser ` +
      "opens at most 6 connections to this server (over HTTP/1.1) for all its tabs; close or hide one and this tab goes live.";
    return await new Promise((resolve) => { // the first slot freed; any other granted meanwhile goes back
      let left = LIVE_SLOTS;
      for (let i = 0; i < LIVE_SLOTS; i++) {
        lockSlot(i, { signal: wait.signal }).then((got) => {
          if (got && !wait.signal.aborted) { wait.abort(); resolve(got); return; }
          got?.();
          if (--left === 0) resolve(null);
        });
      }
    });
  } finally {
    if (slotWait === wait) slotWait = null;
  }
}

function letSlotGo() {
  slotWait?.abort();
  slotWait = null;
  slot?.();
  slot = null;
}

function startLive() {
  const live = $("live");
  // A hidden tab holds no tail (nor a slot): shown again, the page opens the tail after what it holds.
  if (document.visibilityState === "hidden") {
    letSlotGo();
    state.live = "paused"; live.textContent = "❚❚ paused (tab hidden)"; live.className = "live off";
    return;
  }
  if (slot === null) {
    if (slotWait !== null) return; // already waiting for one
    takeSlot().then((letGo) => {
      if (letGo === null) return;
      if (document.visibilityState === "hidden" || state.live === "failed" || slot !== null) { letGo(); return; }
      slot = letGo;
      slotWait?.abort(); // a second wait, begun as the tab was hidden and shown again
      slotWait = null;
      startLive();
    });
    return;
  }
  const es = new EventSource(`${sessionPath(sid)}/live?after=${conv.lastOrder}`);
  source = es;
  if (state.live !== "reconnecting") { state.live = "connecting"; live.textContent = "○ connecting"; live.className = "live off"; }
  setTimeout(() => {
    if (source !== es || es.readyState !== EventSource.CONNECTING || state.live !== "connecting") return;
    state.live = "stalled";
    live.textContent = "○ not connected";
    $("message").textContent = "The live tail has not connected: the browser may be out of connections to this " +
      "server (at most 6 over HTTP/1.1, shared by all its tabs); close or hide other console tabs.";
  }, STALLED_MS);
  source.onopen = () => {
    const said = $("message").textContent;
    if (said.startsWith("The live tail has not connected") || said.startsWith("Not live yet")) $("message").textContent = "";
    reopenDelay = 1000; state.live = "on"; live.textContent = "● live"; live.className = "live on";
  };
  source.onerror = () => {
    state.live = "reconnecting"; live.textContent = "○ reconnecting"; live.className = "live off";
    // An answer that is no event stream (a proxy's 502 while the console restarts) closes an
    // EventSource for good: open a new tail, after what the page holds.
    if (es.readyState === EventSource.CLOSED && source === es) {
      setTimeout(() => { if (source === es) startLive(); }, reopenDelay);
      reopenDelay = Math.min(reopenDelay * 2, 30_000);
    }
  };
  // The console's follower failed (the log refused the read): reconnecting would fail alike.
  source.addEventListener("failed", (ev) => {
    source.close();
    letSlotGo();
    let why = "";
    try { why = JSON.parse(ev.data).error; } catch { why = "unknown error"; }
    state.live = "failed";
    live.textContent = "✗ live tail stopped";
    live.className = "live off";
    live.title = why;
    $("message").textContent = `The live tail stopped: ${why}`;
  });
  source.onmessage = (ev) => {
    let env;
    try {
      env = parseJson(ev.data);
    } catch {
      fail(`a live item after #${conv.lastOrder} is not a JSON object`);
      return;
    }
    if (env.item_order <= conv.lastOrder) {
      const held = conv.items[conv.byOrder.get(env.item_order)];
      if (held === undefined || held.hash === env.hash) return; // already shown
      takeFrom(env.item_order);
    }
    $("message").textContent = "";
    const atBottom = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - ROW_H;
    add([env]);
    if ($("follow").checked || atBottom) requestAnimationFrame(() => { scroller.scrollTop = scroller.scrollHeight; });
  };
}

document.addEventListener("visibilitychange", () => {
  if (fileMode || !state.loaded || state.live === "failed") return;
  if (document.visibilityState === "hidden") {
    if (source === null && slotWait === null) return;
    source?.close();
    source = null; // a reopen already scheduled for it does not run
    startLive(); // says "paused" and lets the slot go
  } else if (source === null) {
    reopenDelay = 1000;
    startLive();
  }
});

// The console's follower sends the log's item of an order again when what it was delivered
// there was not the log's (a forgery that continued the chain): as it does, the page drops
// what it holds from that order on and takes the log's items from there.
function takeFrom(order) {
  const keep = conv.items.filter((e) => e.item_order < order);
  const old = conv;
  conv = new Conversation(sid);
  conv.collapseAll = old.collapseAll;
  conv.agentsSaw = old.agentsSaw;
  verifying = verifying.then(() => {
    const { keyring, heads } = sigs;
    verifier = new ChainVerifier(sid);
    sigs = new SignatureChecker();
    sigs.keyring = keyring;
    return heads.length ? sigs.addHeads(heads) : undefined;
  });
  for (const node of rendered.values()) node.remove();
  rendered.clear();
  if (selected !== null && selected >= order) { selected = null; $("detail").hidden = true; }
  renderLanes();
  add(keep);
}

function loadFile(file) {
  file.arrayBuffer().then((buf) => {
    // The lines before one that is not a JSON object are checked; the chain breaks after them.
    // Each line is read as `convlog replay` reads it: UTF-8 or refused (file.text() would put
    // U+FFFD for a bad byte and drop a leading byte order mark, unseen, and hash what is left).
    const envs = [];
    let unreadable = null;
    const bytes = new Uint8Array(buf);
    const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
    for (let n = 1, at = 0; at < bytes.length; n++) {
      const end = bytes.indexOf(10, at) < 0 ? bytes.length : bytes.indexOf(10, at);
      const raw = bytes.subarray(at, end);
      at = end + 1;
      let l;
      try {
        l = utf8.decode(raw);
      } catch {
        unreadable = `line ${n} is not UTF-8`;
        break;
      }
      if (blank(l)) continue;
      try {
        envs.push(parseJson(l));
      } catch {
        unreadable = `line ${n} is not a JSON object`;
        break;
      }
    }
    const s = envs.length ? envs[0].session_id : "";
    conv = new Conversation(s);
    verifier = new ChainVerifier(s);
    const keyring = sigs.keyring;
    sigs = new SignatureChecker();
    sigs.keyring = keyring;
    verifying = Promise.resolve();
    // Nothing of the file checked before stays on screen: its rows, lanes, open item.
    for (const node of rendered.values()) node.remove();
    rendered.clear();
    selected = null;
    $("detail").hidden = true;
    scroller.scrollTop = 0;
    renderLanes();
    $("title").textContent = `${file.name} · session ${s}`;
    $("message").textContent = "";
    add(envs);
    if (unreadable !== null) {
      $("message").textContent = `Could not read ${file.name}: ${unreadable}`;
      fail(`${file.name} is unreadable after #${conv.lastOrder}: ${unreadable}`);
    }
    finishLoad();
  }).catch((err) => {
    $("message").textContent = `Could not read ${file.name}: ${err.message}`;
    fail(`${file.name} is unreadable: ${err.message}`);
  });
}

// Find: Enter jumps to the next item whose agent or text contains the words (case-insensitive).
$("find").addEventListener("keydown", (e) => {
  if (e.key !== "Enter") return;
  const q = e.target.value.trim().toLowerCase();
  if (!q) return;
  const n = conv.items.length;
  const from = selected !== null && conv.byOrder.has(selected) ? conv.byOrder.get(selected) + 1 : 0;
  for (let k = 0; k < n; k++) {
    const env = conv.items[(from + k) % n];
    if (`${env.agent} ${describe(env)[1]}`.toLowerCase().includes(q)) { select(env.item_order); $("message").textContent = ""; return; }
  }
  $("message").textContent = `not found: ${q}`;
});
$("tall").addEventListener("change", (e) => {
  const anchor = Math.floor(scroller.scrollTop / ROW_H);
  ROW_H = e.target.checked ? 136 : 68;
  document.body.classList.toggle("tall", e.target.checked);
  scroller.scrollTop = anchor * ROW_H;
  refresh(true);
  if (selected !== null) select(selected); // keep the selected item in view
});
// Keyboard: j / k (or the arrow keys) move to the next / previous row.
document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || e.altKey || e.ctrlKey || e.metaKey) return;
  const step = e.key === "j" || e.key === "ArrowDown" ? 1 : e.key === "k" || e.key === "ArrowUp" ? -1 : 0;
  if (!step || !conv.rows.length) return;
  e.preventDefault();
  const cur = selected === null ? -1 : conv.rowOfOrder(selected);
  const r = Math.min(conv.rows.length - 1, Math.max(0, cur + step));
  select(conv.items[conv.rows[r].i].item_order);
});
// The reviewer's own public keyring: which key may sign for which agent (never from the server).
$("keyring").addEventListener("change", (e) => {
  const f = e.target.files[0];
  if (!f) return;
  f.text().then((text) => {
    const keyring = parseKeyring(text);
    $("keyring-box").title = `${f.name}: ${keyring.size} keys`;
    $("keyring-box").classList.add("loaded");
    $("keyring-name").textContent = `✓ keyring: ${keyring.size} keys`;
    if ($("message").textContent.startsWith("Could not read the keyring")) $("message").textContent = "";
    state.keyring = keyring.size;
    verifying = verifying.then(() => sigs.setKeyring(keyring)).then(() => { updateBadge(); if (selected !== null) showDetail(conv.items[conv.byOrder.get(selected)]); });
  }).catch((err) => { $("message").textContent = `Could not read the keyring ${f.name}: ${err.message}`; });
});
$("agents-saw").addEventListener("change", (e) => { conv.agentsSaw = e.target.checked; refresh(true); });
$("collapse").addEventListener("change", (e) => { conv.collapseAll = e.target.checked; conv.collapsed.clear(); refresh(true); });
renderLanes();
if (fileMode) {
  $("title").textContent = "Verify an export";
  $("message").textContent = "Open a JSONL export (convlog replay SID --format jsonl, or this console's Export): it is checked here, in your browser.";
  $("file-box").hidden = false;
  $("export").hidden = true;
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) loadFile(e.target.files[0]); });
} else {
  $("title").textContent = sid;
  document.title = `${sid} · convlog`;
  loadFromServer();
}
