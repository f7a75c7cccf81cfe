// Signed items and signed heads, checked in the reviewer's browser (as shared/signing.py).
//
// A key id is a NATS nkey user public key: base32 (RFC 4648, no padding) of
// [prefix byte 20<<3, 32-byte Ed25519 public key, CRC16/XMODEM little-endian].
// An item's signature covers "convlog-item-v1\n" + JCS({session_id, item_id,
// agent, kind, data}); a head's covers "convlog-head-v1\n" + JCS({session_id,
// item_order, hash, signed_at}).  `sig` is base64url without padding -- or, for
// items signed together, "<signature>.<path>": the signature covers
// "convlog-batch-v1\n" + a Merkle root (leaf SHA-256(0x00 + signing input), node
// SHA-256(0x01 + left + right)), the path is base64url of (side byte, 32-byte
// sibling) steps, leaf to root.  Which key may sign what comes from the
// reviewer's keyring, never from the server.
import { canonical, checkExact } from "./chain.js";

const encoder = new TextEncoder();
const PREFIX_BYTE_USER = 20 << 3;
const B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

export const available = Boolean(globalThis.crypto && crypto.subtle);

export function itemSigningInput(env) {
  checkExact(env);
  return "convlog-item-v1\n" + canonical({ agent: env.agent, data: env.data, item_id: env.item_id, kind: env.kind, session_id: env.session_id });
}

export function headSigningInput(h) {
  return "convlog-head-v1\n" + canonical({ hash: h.hash, item_order: h.item_order, session_id: h.session_id, signed_at: h.signed_at });
}

function crc16(bytes) {
  let crc = 0;
  for (const b of bytes) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc;
}

// The raw 32-byte Ed25519 public key a key id encodes, or null.
export function publicKeyBytes(keyId) {
  if (typeof keyId !== "string" || keyId.length !== 56) return null;
  const out = new Uint8Array(35);
  let bits = 0, acc = 0, n = 0;
  for (const ch of keyId) {
    const v = B32.indexOf(ch);
    if (v < 0) return null;
    acc = (acc << 5) | v;
    bits += 5;
    if (bits >= 8) { bits -= 8; out[n++] = (acc >> bits) & 0xff; }
    acc &= (1 << bits) - 1;
  }
  if (n !== 35 || out[0] !== PREFIX_BYTE_USER) return null;
  if (crc16(out.subarray(0, 33)) !== (out[33] | (out[34] << 8))) return null;
  return out.slice(1, 33);
}

// The bytes of unpadded base64url `text`, or null (4k+1 characters decode to nothing: atob throws).
// Only the one spelling shared/merkle.py's b64 writes: atob ignores the unused
// low bits of the last character, so a signature could be respelled in 16 texts.
function unb64url(text) {
  if (typeof text !== "string" || !/^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-][AQgw]|[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048])?$/.test(text)) return null;
  const b = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  return Uint8Array.from(b, (c) => c.charCodeAt(0));
}

const keys = new Map(); // key id -> Promise<CryptoKey | null>
function cryptoKey(keyId) {
  if (!keys.has(keyId)) {
    const raw = publicKeyBytes(keyId);
    keys.set(keyId, raw ? crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]).catch(() => null) : Promise.resolve(null));
  }
  return keys.get(keyId);
}

// True when `sig` is key `keyId`'s valid signature of `text` (a string or bytes).
export async function verify(keyId, text, sig) {
  const key = await cryptoKey(keyId);
  const s = unb64url(sig);
  if (!key || !s || s.length !== 64) return false;
  try {
    return await crypto.subtle.verify({ name: "Ed25519" }, key, s, typeof text === "string" ? encoder.encode(text) : text);
  } catch {
    return false;
  }
}

async function sha256(...parts) {
  const buf = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { buf.set(p, at); at += p.length; }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
}

const BATCH = encoder.encode("convlog-batch-v1\n");
const roots = new Map(); // key id + sig + root -> Promise<boolean>: one verification per batch

// True when `sig` (plain or batch) is key `keyId`'s valid signature of the item `env`.
export async function verifyItem(keyId, env, sig) {
  if (typeof sig !== "string") return false;
  const dot = sig.indexOf(".");
  if (dot < 0) return verify(keyId, itemSigningInput(env), sig);
  const path = unb64url(sig.slice(dot + 1));
  if (!path || path.length % 33 || path.length > 33 * 16) return false;
  let h = await sha256(new Uint8Array([0]), encoder.encode(itemSigningInput(env)));
  for (let k = 0; k < path.length; k += 33) {
    const sibling = path.subarray(k + 1, k + 33);
    if (path[k] === 0) h = await sha256(new Uint8Array([1]), h, sibling);
    else if (path[k] === 1) h = await sha256(new Uint8Array([1]), sibling, h);
    else return false;
  }
  const id = `${keyId}|${sig.slice(0, dot)}|${Array.from(h).join(",")}`;
  if (!roots.has(id)) {
    const msg = new Uint8Array(BATCH.length + h.length);
    msg.set(BATCH);
    msg.set(h, BATCH.length);
    roots.set(id, verify(keyId, msg, sig.slice(0, dot)));
  }
  return roots.get(id);
}

// A keyring file's text -> Map(key id -> entry); throws with the reason.
export function parseKeyring(text) {
  const doc = JSON.parse(text);
  if (!doc || doc.convlog_keyring !== 1 || !Array.isArray(doc.keys)) throw new Error("not a convlog keyring (version 1)");
  const byId = new Map();
  for (const e of doc.keys) {
    if (!e || !publicKeyBytes(e.key_id)) throw new Error(`key id ${JSON.stringify(String(e?.key_id)).slice(0, 62)} is not an nkey user public key`);
    if (!["agent", "gateway", "log"].includes(e.role) || typeof e.agent !== "string") throw new Error(`key ${e.key_id.slice(0, 12)}… has a bad role or agent`);
    if (byId.has(e.key_id)) throw new Error(`key id ${e.key_id} appears twice`);
    if (e.retired_at != null && instant(e.retired_at) === null)
      throw new Error(`key id ${e.key_id}: retired_at ${JSON.stringify(String(e.retired_at)).slice(0, 42)} is not an RFC 3339 time with its offset (e.g. 2026-03-14T09:30:00Z)`);
    byId.set(e.key_id, e);
  }
  return byId;
}

const TURN_AGENT = /^[A-Za-z0-9_-]{1,64}$/;
const TURN_ROLE = /^(?:msg|reply|fail|call\d{1,3}|out\d{1,3})$/;
function turnIdAgent(itemId) {
  const parts = String(itemId).split(".");
  if (parts.length < 4) return null;
  const [role, step, agent] = [parts.pop(), parts.pop(), parts.pop()];
  const turn = parts.join(".");
  if (!turn || !TURN_AGENT.test(agent) || !/^\d+$/.test(step) || !TURN_ROLE.test(role)) return null;
  return agent;
}

// An RFC 3339 time with its offset, as [seconds since 1970, microseconds], or null:
// exactly the times shared/signing.py's _instant takes (a longer fraction is cut).
const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|([+-])(\d{2}):(\d{2}))$/;
export function instant(text) {
  const m = RFC3339.exec(String(text));
  if (!m) return null;
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number);
  const t = new Date(0);
  t.setUTCFullYear(y, mo - 1, d); // (Date.UTC would read the years 0-99 as 1900-1999)
  if (y < 1 || t.getUTCFullYear() !== y || t.getUTCMonth() !== mo - 1 || t.getUTCDate() !== d) return null;
  if (h > 23 || mi > 59 || s > 59) return null;
  let secs = t.getTime() / 1000 + h * 3600 + mi * 60 + s;
  if (m[8] !== "Z") {
    const [oh, om] = [Number(m[10]), Number(m[11])];
    if (oh > 23 || om > 59) return null;
    secs -= (m[9] === "-" ? -1 : 1) * (oh * 3600 + om * 60);
  }
  return [secs, Number((m[7] || "").slice(0, 6).padEnd(6, "0"))];
}

// Whether the time `at` is later than `retiredAt` (as instants); an `at` that is no time is.
function after(at, retiredAt) {
  const t = instant(at), r = instant(retiredAt);
  return t === null || r === null || t[0] > r[0] || (t[0] === r[0] && t[1] > r[1]);
}

// Why the keyring does not let this envelope's key sign it, or null (Keyring.refusal).
export function refusal(keyring, env) {
  const e = keyring.get(env.key_id);
  const k = `key ${String(env.key_id).slice(0, 12)}…`;
  if (!e) return `${k} is not in the keyring`;
  if (e.retired_at && after(env.created_at, e.retired_at)) return `${k} of ${JSON.stringify(e.agent)} was retired at ${e.retired_at}`;
  if (e.role === "agent") {
    if ((env.agent !== e.agent && env.agent !== "system") || env.agent === "user")
      return `${k} belongs to agent ${JSON.stringify(e.agent)}, not ${JSON.stringify(env.agent)}`;
    const owner = turnIdAgent(env.item_id);
    if (owner !== null && owner !== e.agent) return `item_id ${JSON.stringify(env.item_id)} belongs to a turn of ${JSON.stringify(owner)}, not of ${JSON.stringify(e.agent)}`;
    return null;
  }
  if (e.role === "gateway") {
    const owner = turnIdAgent(env.item_id);
    if (owner !== null) return `item_id ${JSON.stringify(env.item_id)} belongs to a turn of ${JSON.stringify(owner)}, not to the gateway`;
    return env.agent === "user" ? null : "the gateway key signs only user messages";
  }
  return "the log service's key signs session heads, not items";
}

// Why a signed head does not hold under the keyring (or under its own key without one), or null.
export async function headProblem(keyring, h) {
  if (keyring) {
    const e = keyring.get(h.key_id);
    if (!e || e.role !== "log") return `signed by ${String(h.key_id).slice(0, 12)}…, not a log service key of your keyring`;
    if (e.retired_at && after(h.signed_at, e.retired_at)) return `signed at ${h.signed_at} by a key retired at ${e.retired_at}`;
  }
  return (await verify(h.key_id, headSigningInput(h), h.sig)) ? null : "its signature does not match it";
}

// Every signature of a conversation, checked as the envelopes arrive; the keyring's
// verdict on who signed is recomputed whenever the reviewer loads one.
export class SignatureChecker {
  constructor() {
    this.keyring = null; // Map key id -> entry, or null
    this.signed = []; // envelopes carrying sig or key_id, in order
    this.valid = new Map(); // item_order -> true | false (the signature under its own key id)
    this.heads = []; // signed heads, with .problem once checked
    this.done = Promise.resolve();
  }

  feed(envs) {
    const mine = envs.filter((e) => e.sig !== undefined || e.key_id !== undefined);
    if (!mine.length) return this.done;
    this.signed.push(...mine);
    if (!available) return this.done;
    this.done = this.done.then(() => Promise.all(mine.map(async (e) => {
      let ok = false;
      try { // an item that cannot be canonicalized (the chain names it) has no valid signature
        ok = typeof e.sig === "string" && typeof e.key_id === "string" && (await verifyItem(e.key_id, e, e.sig));
      } catch {
        ok = false;
      }
      this.valid.set(e.item_order, ok);
    })));
    return this.done;
  }

  addHeads(heads) {
    this.heads.push(...heads);
    return this.recheckHeads();
  }

  setKeyring(keyring) {
    this.keyring = keyring;
    return this.recheckHeads();
  }

  recheckHeads() {
    if (!available) return this.done;
    this.done = this.done.then(() => Promise.all(this.heads.map(async (h) => {
      h.problem = await headProblem(this.keyring, h).catch(() => "its signature does not match it");
    })));
    return this.done;
  }

  // What the row mark and the detail panel say about one envelope: {cls, text} or null.
  mark(env) {
    if (env.sig === undefined && env.key_id === undefined) return null;
    const who = `${String(env.key_id).slice(0, 12)}…`;
    if (!available) return { cls: "", text: `signed by ${who} (not checked: WebCrypto needs https or loopback)` };
    const ok = this.valid.get(env.item_order);
    if (ok === undefined) return { cls: "", text: "signature being checked" };
    if (!ok) return { cls: "bad", text: typeof env.sig === "string" && typeof env.key_id === "string" ? `signature by ${who} does not match the item` : "carries only one of sig and key_id" };
    if (!this.keyring) return { cls: "unchecked", text: `signed by ${who} (keyring not loaded: authorship unchecked)` };
    const why = refusal(this.keyring, env);
    if (why) return { cls: "bad", text: why };
    return { cls: "ok", text: `signed with ${this.keyring.get(env.key_id).agent}'s key ${who} (${this.keyring.get(env.key_id).role}), verified against your keyring` };
  }

  // The first signature problem among the items the chain vouches for: {order, reason} or null.
  problem(upTo) {
    for (const e of this.signed) {
      if (e.item_order > upTo) break;
      const m = this.mark(e);
      if (m && m.cls === "bad") return { order: e.item_order, reason: m.text };
    }
    return null;
  }

  // The first signed head that does not hold for this chain: {order, reason} or null.
  // `complete`: every item the server has was received (a shorter chain is then cut short).
  headProblem(sessionId, items, byOrder, complete) {
    for (const h of this.heads) {
      const at = `signed head #${h.item_order}`;
      if (h.session_id !== sessionId) return { order: 1, reason: `${at} is of session ${JSON.stringify(h.session_id)}` };
      if (h.item_order < 0) return { order: 1, reason: `${at}: item_order ${h.item_order} is negative` }; // as replay
      if (h.problem) return { order: h.item_order, reason: `${at}: ${h.problem}` };
      const i = byOrder.get(h.item_order);
      if (i === undefined && complete && h.item_order > 0)
        return { order: h.item_order, reason: `${at}: the chain is cut short at #${items.length} (the log signed ${h.item_order} items)` };
      if (i !== undefined && items[i].hash !== h.hash)
        return { order: h.item_order, reason: `${at}: the chain is forked (hash at #${h.item_order} differs from the signed one)` };
    }
    return null;
  }

  summary() {
    const parts = [];
    const n = this.signed.length;
    if (n && !available) parts.push(`${n} signed (not checked: WebCrypto needs https or loopback)`);
    else if (n && this.keyring) parts.push(`${n} signatures verified against your keyring`);
    else if (n) {
      const ids = [...new Set(this.signed.map((e) => `${String(e.key_id).slice(0, 8)}…`))];
      parts.push(`${n} signed by ${ids.slice(0, 3).join(", ")}${ids.length > 3 ? ", …" : ""} (keyring not loaded: authorship unchecked)`);
    }
    if (this.heads.length) {
      const top = Math.max(...this.heads.map((h) => h.item_order));
      parts.push(!available ? `signed head #${top} (not checked: WebCrypto needs https or loopback)`
        : this.keyring ? `signed head #${top} verified` : `signed head #${top} (keyring not loaded: signer unchecked)`);
    }
    return parts.join(" · ");
  }
}
