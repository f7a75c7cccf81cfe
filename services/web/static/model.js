// One conversation as the console shows it: envelopes, lanes, tool-call pairs,
// handoffs, what retract/clear hid, and the rows of the (virtual) list.

// Any JSON value as text.  String() throws on an object with a "toString" key that is
// no function ({"toString": 0}, which the log accepts as data): the row, and every row
// after it on screen, would then never be drawn.
export function str(value) {
  return value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
}

export function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content))
    return content
      .map((p) => (p && typeof p === "object" ? str(p.text ?? p.refusal ?? p.type ?? "") : str(p)))
      .filter(Boolean)
      .join(" ");
  return JSON.stringify(content);
}

export function handoffTarget(env) {
  const d = env.data || {};
  if (env.kind !== "item" || d.type !== "function_call_output") return null;
  // As shared/routing.py parse_handoff_output: a string that starts with "{" and nothing else.
  if (typeof d.output !== "string" || !d.output.startsWith("{")) return null;
  let out;
  try {
    out = JSON.parse(d.output);
  } catch {
    return null;
  }
  if (out && typeof out === "object" && !Array.isArray(out)) {
    const keys = Object.keys(out);
    if (keys.length === 1 && keys[0] === "assistant" && typeof out.assistant === "string") return out.assistant;
  }
  return null;
}

// [kind label, one-line text] of an envelope.
export function describe(env) {
  const d = env.data || {};
  if (env.kind === "retract") return ["retract", `hides #${str(d.target)}`];
  if (env.kind === "clear") return ["clear", "hides every earlier item"];
  if (d.type === "function_call") return ["tool call", `${str(d.name)}(${str(d.arguments ?? "")})`];
  if (d.type === "function_call_output") {
    const target = handoffTarget(env);
    if (target !== null) return ["handoff", `→ ${target}`];
    return ["tool result", contentText(d.output)];
  }
  if (d.role !== undefined) return [str(d.role), contentText(d.content)];
  return [str(d.type ?? env.kind), JSON.stringify(d)];
}

export class Conversation {
  constructor(sessionId) {
    this.sessionId = sessionId;
    this.items = [];
    this.byOrder = new Map(); // item_order -> index
    this.calls = new Map(); // call_id -> index of the function_call
    this.outputOf = new Map(); // call index -> output index
    this.callOf = new Map(); // output index -> call index
    this.hiddenBy = new Map(); // item_order -> {by, how}
    this.agents = []; // lanes between user and system, first seen first
    this.collapsed = new Set(); // call indexes shown as one row
    this.collapseAll = false;
    this.agentsSaw = false;
    this.rows = [];
  }

  get lastOrder() {
    return this.items.length ? this.items[this.items.length - 1].item_order : 0;
  }

  get lanes() {
    return ["user", ...this.agents, "system"];
  }

  laneOf(name) {
    if (name === "user") return 0;
    const i = this.agents.indexOf(name);
    return i >= 0 ? i + 1 : this.agents.length + 1;
  }

  _agent(name) {
    if (name !== "user" && name !== "system" && typeof name === "string" && !this.agents.includes(name)) {
      this.agents.push(name);
      return true;
    }
    return false;
  }

  // Add envelopes in order; returns true when the lanes changed.
  add(envs) {
    let lanesChanged = false;
    for (const env of envs) {
      const i = this.items.length;
      this.items.push(env);
      this.byOrder.set(env.item_order, i);
      lanesChanged = this._agent(env.agent) || lanesChanged;
      const d = env.data || {};
      if (env.kind === "item" && d.type === "function_call" && d.call_id !== undefined) this.calls.set(d.call_id, i);
      if (env.kind === "item" && d.type === "function_call_output" && this.calls.has(d.call_id)) {
        const c = this.calls.get(d.call_id);
        if (!this.outputOf.has(c)) {
          this.outputOf.set(c, i);
          this.callOf.set(i, c);
        }
      }
      const target = handoffTarget(env);
      if (target !== null) lanesChanged = this._agent(target) || lanesChanged;
      if (env.kind === "retract" && Number.isInteger(d.target) && !this.hiddenBy.has(d.target))
        this.hiddenBy.set(d.target, { by: env.item_order, how: "retracted" });
      if (env.kind === "clear")
        for (let j = i - 1; j >= 0; j--) {
          const o = this.items[j].item_order;
          if (this.items[j].kind === "item" && !this.hiddenBy.has(o)) this.hiddenBy.set(o, { by: env.item_order, how: "cleared" });
        }
    }
    return lanesChanged;
  }

  // A call and its output fold into one row only when a retract or clear hid both or
  // neither: one row cannot strike one of them, nor leave it out of what the agents saw.
  foldable(callIndex) {
    const o = this.outputOf.get(callIndex);
    return o !== undefined
      && this.hiddenBy.has(this.items[callIndex].item_order) === this.hiddenBy.has(this.items[o].item_order);
  }

  isCollapsed(callIndex) {
    return this.foldable(callIndex) && (this.collapseAll ? !this.collapsed.has(callIndex) : this.collapsed.has(callIndex));
  }

  toggle(callIndex) {
    if (this.collapsed.has(callIndex)) this.collapsed.delete(callIndex);
    else this.collapsed.add(callIndex);
  }

  visibleToAgents(env) {
    return env.kind === "item" && !this.hiddenBy.has(env.item_order);
  }

  // Rows: {i} one envelope, {i, pair: j} a call and its output on one row.
  rebuildRows() {
    const rows = [];
    for (let i = 0; i < this.items.length; i++) {
      const env = this.items[i];
      if (this.agentsSaw && !this.visibleToAgents(env)) continue;
      if (this.callOf.has(i) && this.isCollapsed(this.callOf.get(i))) continue;
      if (this.outputOf.has(i) && this.isCollapsed(i)) rows.push({ i, pair: this.outputOf.get(i) });
      else rows.push({ i });
    }
    this.rows = rows;
    return rows;
  }

  // Rows for items from index `from` on, appended in place; false when the new items
  // change earlier rows (a retract or clear, an output joining its call): rebuild then.
  appendRows(from) {
    for (let i = from; i < this.items.length; i++) {
      const env = this.items[i];
      if (env.kind !== "item" || this.callOf.has(i)) return false;
      if (this.agentsSaw && !this.visibleToAgents(env)) continue;
      this.rows.push({ i });
    }
    return true;
  }

  rowOfOrder(order) {
    const i = this.byOrder.get(order);
    if (i === undefined) return -1;
    // Binary search: rows are in item order.
    let lo = 0, hi = this.rows.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = this.rows[mid];
      if (r.i === i || r.pair === i) return mid;
      if (r.i < i) lo = mid + 1;
      else hi = mid - 1;
    }
    // A merged output sits on its call's row.
    if (this.callOf.has(i)) return this.rowOfOrder(this.items[this.callOf.get(i)].item_order);
    return -1;
  }
}
