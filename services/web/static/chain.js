// The hash chain, recomputed in the reviewer's browser: nothing here trusts the server.
//
// hash_n = SHA-256(JCS(obj_n)), obj_n = the envelope without "hash", plus
// "prev_hash": hash_{n-1}; hash_0 = 64 zeros.  Optional fields (sig, key_id)
// enter the hash only when present, like every other field.  JCS is RFC 8785:
// object keys sorted by UTF-16 code units, no whitespace, ECMAScript number and
// string serialization -- which is what JSON.stringify does for primitives.

export const GENESIS = "0".repeat(64);

// Half a surrogate pair is no Unicode text: RFC 8785 (and convlog's Python) refuse it,
// where JSON.stringify would write it as an escape.
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

function jsonString(s) {
  if (LONE_SURROGATE.test(s)) throw new Error("a lone surrogate, which is not Unicode text");
  return JSON.stringify(s);
}

export function canonical(value) {
  if (value === null) return "null";
  switch (typeof value) {
    case "boolean":
      return value ? "true" : "false";
    case "number":
      if (!Number.isFinite(value)) throw new Error("non-finite number");
      return JSON.stringify(value);
    case "string":
      return jsonString(value);
    case "object": {
      if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
      const keys = Object.keys(value).sort(); // default sort: UTF-16 code units, as RFC 8785
      const parts = [];
      for (const k of keys) {
        if (value[k] === undefined) continue;
        parts.push(jsonString(k) + ":" + canonical(value[k]));
      }
      return "{" + parts.join(",") + "}";
    }
    default:
      throw new Error("not JSON: " + typeof value);
  }
}

// JSON.parse rounds an integer beyond +/-(2^53-1) to a nearby double without a word: an
// edited export could then hash as the original (1e20 and 100000000000000000001 read alike).
// RFC 8785 cannot represent such an integer exactly, so convlog refuses it, at input and in
// `convlog replay`; parseJson marks a value that held one, and it has no hash here either.
// So is a value with an object that holds a name twice: JSON.parse keeps the last value,
// the hash covers only that, and the first is text a reader of the line sees (I-JSON, which
// RFC 8785 canonicalizes, has each name once; `convlog replay` refuses it).
const unhashable = new WeakMap(); // value -> why it has no hash
const TOKEN = /"(?:[^"\\]|\\.)*"|-?\d+(\.\d+)?([eE][+-]?\d+)?/g;
const NAME = /("(?:[^"\\]|\\.)*")(\s*:)?|[{}[\]]/g;

// Why `text` (valid JSON) has no hash though JSON.parse reads it, or null: an object holds
// a name more than once, or the envelope's (or a signed head line's) item_order is written
// as no integer ("2.0" or "2e0" read as 2 here and hash as 2; `convlog replay` refuses
// them, an integer is due).
function nameProblem(text) {
  const stack = []; // per open object the names seen, per open array null
  let last = null; // the name just read: an object opening next is its value
  for (const m of text.matchAll(NAME)) {
    if (m[1] === undefined) {
      if (m[0] === "{") stack.push(Object.assign(new Set(), { head: stack.length === 1 && last === "signed_head" }));
      else if (m[0] === "[") stack.push(null);
      else stack.pop();
      last = null;
    } else if (m[2] !== undefined) {
      const name = m[1].includes("\\") ? JSON.parse(m[1]) : m[1].slice(1, -1);
      const seen = stack[stack.length - 1];
      if (seen.has(name)) return `an object holds ${JSON.stringify(name)} more than once (the hash covers only the last)`;
      seen.add(name);
      last = name;
      if (name === "item_order" && (stack.length === 1 || (stack.length === 2 && seen.head))) {
        NUMBER.lastIndex = m.index + m[0].length;
        const value = NUMBER.exec(text);
        if (value !== null && /[.eE]/.test(value[1])) return `item_order is written ${value[1]}, not as an integer`;
      }
    }
  }
  return null;
}
const NUMBER = /\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/y; // sticky: the value right after its name

// A line of an export, or a live item: a JSON object (throws on anything else).
export function parseJson(text) {
  const value = JSON.parse(text);
  if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not a JSON object");
  if (/\d{16}/.test(text)) {
    for (const m of text.matchAll(TOKEN)) {
      if (m[0][0] !== '"' && m[1] === undefined && m[2] === undefined && !Number.isSafeInteger(Number(m[0]))) {
        unhashable.set(value, "an integer beyond 2^53-1, which RFC 8785 cannot represent exactly");
        return value;
      }
    }
  }
  const problem = nameProblem(text);
  if (problem !== null) unhashable.set(value, problem);
  return value;
}

export function checkExact(env) {
  if (unhashable.has(env)) throw new Error(unhashable.get(env));
}

// The signed head a parsed line holds, or null: the line is {"signed_head": {...}} and nothing
// else, the head has its six fields of their types and no other, its item_order written as an
// integer -- what `convlog replay` reads as a head line (services/cli/audit.py); any other
// line is taken as an envelope, and so breaks the chain there.
const HEAD_FIELDS = ["session_id", "item_order", "hash", "signed_at", "key_id", "sig"];
export function headLine(x) {
  if (x === null || typeof x !== "object" || Object.keys(x).length !== 1 || !Object.hasOwn(x, "signed_head")) return null;
  const h = x.signed_head;
  if (h === null || typeof h !== "object" || Array.isArray(h) || unhashable.has(x)) return null;
  const names = Object.keys(h);
  if (names.length !== HEAD_FIELDS.length || !HEAD_FIELDS.every((k) => Object.hasOwn(h, k))) return null;
  const typed = HEAD_FIELDS.every((k) => (k === "item_order" ? Number.isInteger(h[k]) : typeof h[k] === "string"));
  return typed ? h : null;
}

export function hashInput(env, prevHash) {
  checkExact(env);
  // An envelope's own "prev_hash" would be overwritten here, unhashed: a field beside the envelope.
  if (Object.hasOwn(env, "prev_hash")) throw new Error('an envelope has no "prev_hash" field');
  const obj = Object.create(null); // so a "__proto__" field is a field, not the prototype
  for (const k of Object.keys(env)) if (k !== "hash") obj[k] = env[k];
  obj.prev_hash = prevHash;
  return canonical(obj);
}

// What makes `env` no envelope as shared/messages.py's Envelope decodes one (convlog replay
// refuses such a line), or null: every field of its type, and none beside them.
const FIELDS = { session_id: "string", item_order: "number", item_id: "string", agent: "string", kind: "string",
  data: "object", created_at: "string", hash: "string", sig: "string", key_id: "string" };
const KINDS = ["item", "retract", "clear"];
export function shapeProblem(env) {
  for (const k of Object.keys(env)) if (!Object.hasOwn(FIELDS, k)) return `a field ${JSON.stringify(k)} beside the envelope's`;
  for (const [k, type] of Object.entries(FIELDS)) {
    if (!Object.hasOwn(env, k)) {
      if (k !== "sig" && k !== "key_id") return `no ${k}`;
    } else if (typeof env[k] !== type || env[k] === null || Array.isArray(env[k])
        || (k === "item_order" && !Number.isInteger(env[k])) || (k === "kind" && !KINDS.includes(env[k]))) {
      return `${k} is ${String(JSON.stringify(env[k])).slice(0, 40)}`;
    }
  }
  return null;
}

const encoder = new TextEncoder();
const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

function toHex(buf) {
  const b = new Uint8Array(buf);
  let s = "";
  for (let i = 0; i < b.length; i++) s += HEX[b[i]];
  return s;
}

// WebCrypto exists only in secure contexts (https, or http on loopback).
export const engine = globalThis.crypto && crypto.subtle ? "WebCrypto" : "JS";

export async function sha256hex(text) {
  const bytes = encoder.encode(text);
  if (engine === "WebCrypto") return toHex(await crypto.subtle.digest("SHA-256", bytes));
  return toHex(sha256js(bytes));
}

// A plain SHA-256 (FIPS 180-4) for pages served over plain http beyond loopback.
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

export function sha256js(bytes) {
  const n = bytes.length;
  const total = Math.ceil((n + 9) / 64) * 64;
  const m = new Uint8Array(total);
  m.set(bytes);
  m[n] = 0x80;
  const dv = new DataView(m.buffer);
  dv.setUint32(total - 8, Math.floor(n / 0x20000000));
  dv.setUint32(total - 4, (n << 3) >>> 0);
  const h = new Uint32Array([
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
  ]);
  const w = new Uint32Array(64);
  const rotr = (x, r) => (x >>> r) | (x << (32 - r));
  for (let off = 0; off < total; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = dv.getUint32(off + i * 4);
    for (let i = 16; i < 64; i++) {
      const a = w[i - 15], b = w[i - 2];
      const s0 = rotr(a, 7) ^ rotr(a, 18) ^ (a >>> 3);
      const s1 = rotr(b, 17) ^ rotr(b, 19) ^ (b >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      hh = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  const out = new DataView(new ArrayBuffer(32));
  for (let i = 0; i < 8; i++) out.setUint32(i * 4, h[i]);
  return out.buffer;
}

// An incremental verifier: feed envelopes in the order received; it checks the
// session id, contiguity from 1 and every hash, and remembers the first problem.
// Digests of one batch run in parallel (each item is hashed with the hash its
// predecessor claims; the claims are then checked in order, which is the same
// as walking the chain).
export class ChainVerifier {
  constructor(sessionId) {
    this.sessionId = sessionId;
    this.prev = GENESIS;
    this.verified = 0; // items checked and good
    this.problem = null; // {order, reason}
    this.status = new Map(); // item_order -> "ok" | "bad"
  }

  async feed(envs) {
    if (this.problem || envs.length === 0) return;
    // An Error: that envelope cannot be canonicalized (only it is bad, not its whole batch).
    const digest = async (env, prev) => {
      try {
        return await sha256hex(hashInput(env, prev));
      } catch (err) {
        return err instanceof Error ? err : new Error(String(err));
      }
    };
    const digests = await Promise.all(envs.map((e, i) => digest(e, i === 0 ? this.prev : envs[i - 1].hash)));
    for (let i = 0; i < envs.length; i++) {
      const env = envs[i];
      const expected = this.verified + 1;
      let reason = null;
      const shape = shapeProblem(env);
      if (shape !== null) reason = `not an envelope: ${shape}`;
      else if (env.session_id !== this.sessionId)
        reason = `belongs to session ${JSON.stringify(env.session_id)}, not ${JSON.stringify(this.sessionId)}`;
      else if (env.item_order !== expected) reason = `expected item_order ${expected}, found ${env.item_order}`;
      else if (digests[i] instanceof Error) reason = `cannot be canonicalized: ${digests[i].message}`;
      else if (digests[i] !== env.hash) reason = "hash does not match the envelope and its predecessor";
      if (reason) {
        this.problem = { order: expected, reason };
        if (typeof env.item_order === "number") this.status.set(env.item_order, "bad");
        return;
      }
      this.status.set(env.item_order, "ok");
      this.prev = env.hash;
      this.verified = expected;
    }
  }
}
