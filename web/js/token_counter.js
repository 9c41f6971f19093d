// Token counter of the Chinese-CLIP Text Encode node (ChineseSD_CLIPTextEncode).
//
// While the user types, the node shows how many of the 52-token window's prompt tokens (50: [CLS] and [SEP]
// take 2) the prompt uses, counted by the server (POST /chinese_sd/tokens, nodes/token_route.py) with the
// tokenizer of the model wired into the node's clip input, and warns when truncate mode will drop tokens,
// saying where the cut falls. After a run the same line shows the exact count the encode node made (websocket
// event "chinese_sd.encoded", nodes/token_route.py) for as long as the prompt is the text that was encoded
// (its SHA-256 is the event's text_sha256), then the estimate again.
//
// Layout: on the canvas the counter has a fixed height (a count line and two lines below it for the warning, an
// error, or a note), so the node never changes size while the user types and the prompt box keeps its height.
// In a Vue-rendered node (Nodes 2.0) it takes only the lines it shows, leaving the prompt box the rest.
//
// DOM contract (kept stable for tests and styles):
//   div.chinese-sd-token-counter[data-node-id][data-state][data-tokens][data-capacity][data-dropped]
//       [data-windows][data-source][data-over][data-approx]
//                                               data-state: pending | estimate | exact | error | linked
//                                               data-source: shipped | model | missing | run | ""
//     div.chinese-sd-token-line
//       span.chinese-sd-token-label             "tokens" / "token数"
//       span.chinese-sd-token-count             "38 / 50" (estimate and exact states), "? / 50" (error), "… / 50"
//       span.chinese-sd-token-note              estimate / exact · last run, and where the count comes from
//     div.chinese-sd-token-detail               two lines, holding at most one of:
//       div.chinese-sd-token-warning[hidden]    truncate mode drops tokens:
//         span.chinese-sd-token-warning-text, span.chinese-sd-token-cut-before ("…中国山水画"),
//         span.chinese-sd-token-cut-after ("大雾弥漫…")
//       div.chinese-sd-token-error[hidden]      the prompt is refused (or the count failed): the message
//       div.chinese-sd-token-info[hidden]       a note: the model is not installed, the recipe of the last run,
//                                               windows used, what was not counted
// The element is a DOM widget named "chinese_sd_token_count" on the node (not serialized).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "ChineseSD.TokenCounter";
const NODE_TYPE = "ChineseSD_CLIPTextEncode";
const ROUTE = "/chinese_sd/tokens";
const WIDGETS_ROUTE = "/chinese_sd/model_widgets"; // {loader node ID: the widget holding its model choice}
const ENCODED_EVENT = "chinese_sd.encoded";
const WIDGET = "chinese_sd_token_count";
const CLASS = "chinese-sd-token-counter";
const POLL_MS = 250;      // how often the node's inputs are looked at
const DEBOUNCE_MS = 300;  // quiet time after a change before the server is asked
const MAX_HOPS = 16;      // links followed from the clip input to the loader
const MARGIN = 2;         // the DOM widget's margin, around the element
const LINE = 16;          // px per line of text
const LINES = 3;          // the count line and two for the warning, error or note
const HEIGHT = LINES * LINE + 4;

// the loaders whose model choice names a tokenizer: the server's table (until it answers, and if it cannot,
// the shipped vocabulary counts)
let modelWidgets = {};

const TEXTS = {
  en: {
    label: "tokens",
    estimate: "estimate",
    shipped: "shipped vocabulary",
    model: "model's vocabulary",
    exact: "exact · last run",
    pending: "counting…",
    linked: "prompt from a link: counted when it runs",
    windows: (n) => `${n} windows`,
    limited: (n) => `only the first ${n} characters counted`,
    approx: "{a|b}: the longest choice counted",
    missing: "model not installed: counting with the shipped vocabulary",
    unreadable: "model's vocabulary unreadable: counting with the shipped one",
    recipe: (r) => `recipe: ${r}`,
    dropped: (dropped, tokens) => `Truncate drops ${dropped} of ${tokens} tokens: kept up to “`,
    middle: "”, dropped from “",
    end: "”.",
    failed: "Not counted: ",
    placeholder: "Prompt, in Chinese (English and mixed work too)",
  },
  zh: {
    label: "token数",
    estimate: "估计",
    shipped: "插件自带词表",
    model: "模型词表",
    exact: "精确 · 上次运行",
    pending: "计数中…",
    linked: "提示词来自连线：运行时计数",
    windows: (n) => `${n} 个窗口`,
    limited: (n) => `仅统计了前 ${n} 个字符`,
    approx: "{a|b}：按最长的选项计数",
    missing: "模型未安装：用插件自带词表计数",
    unreadable: "无法读取模型词表：用插件自带词表计数",
    recipe: (r) => `编码方式：${r}`,
    dropped: (dropped, tokens) => `截断将丢弃 ${tokens} 个token中的 ${dropped} 个：保留到“`,
    middle: "”，从“",
    end: "”起丢弃。",
    failed: "无法计数：",
    placeholder: "提示词，用中文写（英文和中英混合也可以）",
  },
};

const counters = new Set();

function texts() {
  let locale = "";
  try {
    locale = app.extensionManager?.setting?.get?.("Comfy.Locale") ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale") ?? "";
  } catch {
    locale = "";
  }
  locale = String(locale || navigator.language || "en").toLowerCase();
  return locale.startsWith("zh") ? TEXTS.zh : TEXTS.en;
}

// ---------------------------------------------------------------------------------------------
// SHA-256 of a text's UTF-8 bytes, as hex (the encode event names the prompt it counted so). crypto.subtle
// exists only in secure contexts (https, localhost); ComfyUI opened over plain http from another machine
// gets the small implementation below.

const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

function sha256Bytes(bytes) {
  const bitLength = bytes.length * 8;
  const padded = new Uint8Array(((bytes.length + 9 + 63) >> 6) << 6);
  padded.set(bytes);
  padded[bytes.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bitLength / 2 ** 32));
  view.setUint32(padded.length - 4, bitLength >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let offset = 0; offset < padded.length; offset += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(offset + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      [k, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    [a, b, c, d, e, f, g, k].forEach((v, i) => { h[i] = (h[i] + v) >>> 0; });
  }
  return Array.from(h, (v) => v.toString(16).padStart(8, "0")).join("");
}

async function sha256Hex(text) {
  const bytes = new TextEncoder().encode(text);
  if (globalThis.crypto?.subtle) {
    try {
      const digest = await crypto.subtle.digest("SHA-256", bytes);
      return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    } catch {
      // fall through to the local implementation
    }
  }
  return sha256Bytes(bytes);
}

// ---------------------------------------------------------------------------------------------
// reading the node: its prompt, long_prompt mode and the model wired into clip

function widgetOf(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function linkOf(graph, id) {
  const links = graph?.links;
  if (!links || id == null) return null;
  return typeof links.get === "function" ? links.get(id) : links[id];
}

// The link into the node's input, or null. Frontends that have node.getInputLink(slot) are asked (1.58 warns of
// every read of input.link); the base class's, so that a subgraph node answers for its outer input as any node
// does. Only frontends without it have the slot's link id read.
function linkInto(node, input) {
  const graph = node?.graph ?? app.graph;
  const slot = node?.inputs?.indexOf(input) ?? -1;
  if (!graph || slot < 0) return null;
  const getInputLink = globalThis.LiteGraph?.LGraphNode?.prototype?.getInputLink ?? node.getInputLink;
  if (typeof getInputLink === "function") {
    if (typeof node.isInputConnected === "function" && !node.isInputConnected(slot)) return null;
    return getInputLink.call(node, slot) ?? null;
  }
  return input.link == null ? null : linkOf(graph, input.link);
}

function sourceOf(node, input) {
  const graph = node.graph ?? app.graph;
  const link = linkInto(node, input);
  if (!link) return null;
  const source = graph.getNodeById?.(link.origin_id);
  return source ? { node: source, slot: link.origin_slot } : null;
}

function inputNamed(node, name) {
  return node?.inputs?.find((i) => i.name === name);
}

// The model choice of the loader wired (through pass-through nodes) into the node's clip input:
// {node, value, installed} or null. installed: the choice is among the loader's options (the files the server has).
function modelChoice(node) {
  let current = node;
  let input = inputNamed(node, "clip");
  for (let hop = 0; hop < MAX_HOPS && input; hop++) {
    const source = sourceOf(current, input);
    if (!source) return null;
    const type = source.node.comfyClass ?? source.node.type;
    const widgetName = modelWidgets[type];
    if (widgetName) {
      const widget = widgetOf(source.node, widgetName);
      const value = widget?.value;
      if (typeof value !== "string" || !value) return null;
      let options = widget.options?.values;
      if (typeof options === "function") options = options(widget, source.node);
      const installed = !Array.isArray(options) || options.includes(value);
      return { node: type, value, installed };
    }
    // pass-through nodes (LoRA loaders, Set CLIP Last Layer, reroutes, bypassed nodes): follow their CLIP input
    current = source.node;
    input = inputNamed(current, "clip") ?? (type === "Reroute" ? current.inputs?.[0] : null);
  }
  return null;
}

function stripComments(text) {
  return text.replace(/\/\*[\s\S]*?\*\/|\/\/.*/g, "");
}

// ComfyUI's dynamic prompts pick one of {a|b|c} at random when the prompt is queued; count the longest choice.
// Returns [text, whether it had a choice]
function longestChoices(text) {
  let i = 0;
  let chose = false;
  const escape = () => "\\" + (text[i++] ?? "");
  function block() {
    chose = true;
    const options = [];
    let current = "";
    let depth = 0;
    while (i < text.length) {
      const c = text[i++];
      if (c === "\\") { current += escape(); continue; }
      if (c === "{") depth++;
      else if (c === "}") { if (!depth) break; depth--; }
      else if (c === "|" && !depth) { options.push(current); current = ""; continue; }
      current += c;
    }
    options.push(current);
    return options.map(expand).reduce((a, b) => (b.length > a.length ? b : a), "");
  }
  function expand(part) {
    const saved = [text, i];
    text = part;
    i = 0;
    let out = "";
    while (i < text.length) {
      const c = text[i++];
      out += c === "\\" ? escape() : c === "{" ? block() : c;
    }
    [text, i] = saved;
    return out;
  }
  const out = expand(text).replace(/\\([{}|])/g, "$1");
  return [out, chose];
}

function payloadOf(node) {
  const input = inputNamed(node, "text");
  let text;
  let dynamic = widgetOf(node, "text")?.dynamicPrompts !== false;
  if (input && linkInto(node, input)) {
    const source = sourceOf(node, input);
    const w = source?.node?.widgets?.find((w) => typeof w.value === "string" && ["value", "text", "string"].includes(w.name));
    if (!w) return null; // counted when it runs
    text = w.value;
    dynamic = false;
  } else {
    const value = widgetOf(node, "text")?.value;
    text = typeof value === "string" ? value : "";
  }
  const raw = text;
  let approx = false;
  if (dynamic) {
    text = stripComments(text);
    if (/[{|}]/.test(text)) [text, approx] = longestChoices(text);
  }
  const mode = widgetOf(node, "long_prompt")?.value === "chunk" ? "chunk" : "truncate";
  const choice = modelChoice(node);
  // a model that is not installed is not asked for: the shipped vocabulary counts, and the node says so
  const model = choice?.installed ? { node: choice.node, value: choice.value } : null;
  return { text, long_prompt: mode, model, approx, missing: choice && !choice.installed ? choice.value : null, raw };
}

// ---------------------------------------------------------------------------------------------
// the element

function ensureStyle() {
  if (document.getElementById(`${CLASS}-style`)) return;
  const style = document.createElement("style");
  style.id = `${CLASS}-style`;
  style.textContent = `
.${CLASS} { box-sizing: border-box; width: 100%; height: ${HEIGHT}px; overflow: hidden; padding: 2px 4px;
  font: 12px/${LINE}px sans-serif; color: var(--descrip-text, #999); pointer-events: none;
  overflow-wrap: anywhere; word-break: normal; }
.${CLASS} .chinese-sd-token-line { height: ${LINE}px; overflow: hidden; white-space: nowrap; text-overflow: clip; }
.${CLASS} .chinese-sd-token-detail { height: ${2 * LINE}px; overflow: hidden; }
.${CLASS} .chinese-sd-token-count { color: var(--input-text, #ddd); font-weight: 600;
  font-variant-numeric: tabular-nums; margin: 0 6px 0 4px; }
.${CLASS}[data-over="1"] .chinese-sd-token-count { color: #f0a020; }
.${CLASS} .chinese-sd-token-warning { color: #f0a020; }
.${CLASS} .chinese-sd-token-cut-before, .${CLASS} .chinese-sd-token-cut-after { font-weight: 600; }
.${CLASS} .chinese-sd-token-error { color: var(--error-text, #ff6b6b); }
.lg-node .${CLASS} { height: auto; max-height: ${HEIGHT}px; }
.lg-node .${CLASS} .chinese-sd-token-detail { height: auto; max-height: ${2 * LINE}px; }
`;
  document.head.appendChild(style);
}

function span(className, parent) {
  const el = document.createElement("span");
  el.className = className;
  parent.appendChild(el);
  return el;
}

function div(className, parent, hidden = false) {
  const el = document.createElement("div");
  el.className = className;
  el.hidden = hidden;
  parent.appendChild(el);
  return el;
}

function buildElement(node) {
  ensureStyle();
  const root = document.createElement("div");
  root.className = CLASS;
  root.dataset.nodeId = String(node.id);
  root.dataset.state = "pending";
  const line = div("chinese-sd-token-line", root);
  const parts = { root, line };
  parts.label = span("chinese-sd-token-label", line);
  parts.count = span("chinese-sd-token-count", line);
  parts.note = span("chinese-sd-token-note", line);
  parts.detail = div("chinese-sd-token-detail", root);
  parts.warning = div("chinese-sd-token-warning", parts.detail, true);
  parts.warningText = span("chinese-sd-token-warning-text", parts.warning);
  parts.before = span("chinese-sd-token-cut-before", parts.warning);
  parts.middle = span("chinese-sd-token-warning-middle", parts.warning);
  parts.after = span("chinese-sd-token-cut-after", parts.warning);
  parts.end = span("chinese-sd-token-warning-end", parts.warning);
  parts.error = div("chinese-sd-token-error", parts.detail, true);
  parts.info = div("chinese-sd-token-info", parts.detail, true);
  return parts;
}

// the exact count of the last run, while the node still holds the prompt that was encoded
function exactOf(counter) {
  const exact = counter.exact;
  const payload = counter.payload;
  if (!exact || !payload || counter.hashedSig !== counter.wantedSig) return null;
  if (exact.long_prompt !== payload.long_prompt || exact.model !== JSON.stringify(payload.model)) return null;
  return counter.hashes.includes(exact.data.text_sha256) ? exact.data : null;
}

function render(counter) {
  const T = texts();
  const p = counter.parts;
  const root = p.root;
  counter.locale = T;
  root.dataset.nodeId = String(counter.node.id); // a new node gets its id when it is added to the graph
  p.label.textContent = T.label;
  setPlaceholder(counter, T);
  let data = counter.answer;
  let state;
  let source = "";
  const exact = exactOf(counter);
  if (!counter.payload) {
    state = "linked";
    data = null;
  } else if (exact) {
    state = "exact";
    source = "run";
    data = exact;
  } else if (!data) {
    state = "pending";
  } else if (data.error) {
    state = "error";
  } else {
    state = "estimate";
    source = counter.payload.missing ? "missing" : data.tokenizer === "model" ? "model" : "shipped";
  }
  if (data?.per_window) counter.perWindow = data.per_window;
  const counted = state === "estimate" || state === "exact";
  const capacity = counted ? data.capacity : counter.perWindow;
  root.dataset.state = state;
  root.dataset.source = source;
  root.dataset.tokens = counted ? String(data.tokens) : "";
  root.dataset.capacity = String(capacity);
  root.dataset.dropped = counted ? String(data.dropped ?? 0) : "";
  root.dataset.windows = counted ? String(data.windows ?? 1) : "";
  root.dataset.over = counted && data.tokens > capacity ? "1" : "0";
  root.dataset.approx = counter.payload?.approx ? "1" : "0";
  // limited: the server stopped counting before the prompt's end, so the count is a lower bound ("200+")
  const more = counted && data.limited ? "+" : "";
  p.count.textContent = counted ? `${data.tokens}${more} / ${capacity}` : state === "error" ? `? / ${capacity}` : `… / ${capacity}`;

  const notes = [];
  if (state === "estimate") notes.push(T.estimate, source === "model" ? T.model : T.shipped);
  if (state === "exact") notes.push(T.exact);
  if (state === "pending") notes.push(T.pending);
  if (state === "linked") notes.push(T.linked);
  p.note.textContent = notes.join(" · ");

  // below the count: the warning, else the error, else one note
  const dropped = counted && data.long_prompt !== "chunk" ? data.dropped ?? 0 : 0;
  p.warning.hidden = !(dropped > 0);
  if (dropped > 0) {
    p.warningText.textContent = T.dropped(`${dropped}${more}`, `${data.tokens}${more}`);
    p.before.textContent = `…${data.cut_before ?? ""}`;
    p.middle.textContent = T.middle;
    p.after.textContent = `${data.cut_after ?? ""}…`;
    p.end.textContent = T.end;
  }
  p.error.hidden = state !== "error";
  p.error.textContent = state === "error" ? T.failed + data.error : "";
  const info = [];
  if (state === "estimate" && source === "missing") info.push(T.missing);
  else if (state === "estimate" && data.model_error) info.push(T.unreadable);
  if (state === "exact" && data.recipe) info.push(T.recipe(data.recipe));
  if (counted && (data.windows ?? 1) > 1) info.push(T.windows(data.windows));
  if (counted && data.limited && typeof data.chars_counted === "number" && data.chars_counted < (data.chars ?? Infinity))
    info.push(T.limited(data.chars_counted));
  if (counted && counter.payload?.approx) info.push(T.approx);
  p.info.hidden = !p.warning.hidden || !p.error.hidden || !info.length;
  p.info.textContent = info.join(" · ");
  // everything, also what two lines cannot hold, on hover
  root.title = [p.line.textContent, ...[p.warning, p.error].filter((e) => !e.hidden).map((e) => e.textContent),
    ...info, state === "estimate" && data.model_error ? data.model_error : ""].filter(Boolean).join("\n");
}

// the prompt box's placeholder in the UI's language (the frontend shows the input's name, "text", otherwise)
function setPlaceholder(counter, T) {
  const widget = widgetOf(counter.node, "text");
  const box = widget?.element;
  if (box instanceof HTMLTextAreaElement && box.placeholder !== T.placeholder) box.placeholder = T.placeholder;
  if (widget?.options && widget.options.placeholder !== T.placeholder) widget.options.placeholder = T.placeholder;
}

// ---------------------------------------------------------------------------------------------
// asking the server

async function ask(counter) {
  const sig = counter.wantedSig;
  const seq = ++counter.seq;
  counter.inFlight = true;
  let answer;
  try {
    const { text, long_prompt, model } = counter.payload;
    const res = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, long_prompt, model }),
    });
    answer = await res.json().catch(() => ({}));
    if (!res.ok && !answer.error) answer = { error: `HTTP ${res.status}` };
  } catch (e) {
    answer = { error: String(e?.message ?? e) };
  } finally {
    counter.inFlight = false;
  }
  if (seq !== counter.seq) return;
  counter.lastSig = sig;
  counter.answer = answer;
  render(counter);
}

// the hashes of the texts the node's prompt may have been sent as: as typed, and as the frontend sends it
// (comments removed)
async function hash(counter) {
  const sig = counter.wantedSig;
  const payload = counter.payload;
  const texts = payload ? [...new Set([payload.raw, payload.text])] : [];
  const hashes = await Promise.all(texts.map(sha256Hex));
  if (sig !== counter.wantedSig) return; // typed on meanwhile
  counter.hashes = hashes;
  counter.hashedSig = sig;
  render(counter);
}

function tick() {
  const now = Date.now();
  for (const counter of counters) {
    if (!counter.node.graph) {
      counters.delete(counter);
      continue;
    }
    let payload;
    try {
      payload = payloadOf(counter.node);
    } catch (e) {
      console.debug(EXTENSION, e);
      continue;
    }
    const sig = payload ? JSON.stringify(payload) : "";
    if (sig !== counter.wantedSig) {
      counter.wantedSig = sig;
      counter.payload = payload;
      counter.changedAt = now;
      render(counter);
      if (counter.exact) hash(counter);
    } else if (counter.locale !== texts()) {
      render(counter);
    }
    const quiet = counter.lastSig === null ? 0 : DEBOUNCE_MS;
    if (payload && !counter.inFlight && counter.lastSig !== sig && now - counter.changedAt >= quiet) ask(counter);
  }
}

// The room the counter takes: fixed on the canvas (the node never changes size while the user types); in a
// Vue-rendered node ("Nodes 2.0", which sizes a node to its content) only the lines it shows, so that the prompt
// box keeps the rest
function height(root) {
  return (root.closest?.(".lg-node") ? root.offsetHeight || LINE + 4 : HEIGHT) + 2 * MARGIN;
}

function attach(node) {
  if (typeof node.addDOMWidget !== "function" || widgetOf(node, WIDGET)) return;
  const parts = buildElement(node);
  const counter = {
    node, parts, payload: null, wantedSig: null, lastSig: null, answer: null, exact: null, hashes: [],
    hashedSig: null, seq: 0, inFlight: false, changedAt: 0, perWindow: 50, locale: null,
  };
  const widget = node.addDOMWidget(WIDGET, "chinese_sd_tokens", parts.root, {
    serialize: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => height(parts.root),
    getMaxHeight: () => height(parts.root),
    getHeight: () => height(parts.root),
    margin: MARGIN,
  });
  widget.serialize = false;
  // The counter has its node's width. (Selecting the node lets the frontend's side panel leave its own, narrower
  // width on the widget, which would wrap the counter's lines until they no longer fit.)
  try {
    Object.defineProperty(widget, "width", { get: () => undefined, set: () => {}, configurable: true });
  } catch (e) {
    console.debug(EXTENSION, "width", e);
  }
  counter.widget = widget;
  node.chineseSdTokenCounter = counter;
  counters.add(counter);
  const removed = node.onRemoved;
  node.onRemoved = function () {
    counters.delete(counter);
    return removed?.apply(this, arguments);
  };
  // room for the counter from the start (a node loaded from a workflow keeps its saved size)
  try {
    const size = node.computeSize?.();
    if (size && node.size && node.size[1] < size[1]) node.setSize([node.size[0], size[1]]);
  } catch (e) {
    console.debug(EXTENSION, "resize", e);
  }
  render(counter);
}

function onEncoded(event) {
  const data = event?.detail;
  if (!data || data.node == null || typeof data.text_sha256 !== "string" || typeof data.tokens !== "number") return;
  const id = String(data.node);
  for (const counter of counters) {
    const own = String(counter.node.id);
    // nodes inside subgraphs run under "<parent id>:<id>"
    if (id === own || id.endsWith(`:${own}`) && counter.node.graph !== app.graph) {
      counter.exact = { data, long_prompt: data.long_prompt, model: JSON.stringify(counter.payload?.model ?? null) };
      hash(counter);
    }
  }
}

async function loadModelWidgets() {
  try {
    const res = await api.fetchApi(WIDGETS_ROUTE);
    const table = res.ok ? await res.json() : null;
    if (table && typeof table === "object" && !Array.isArray(table)) {
      modelWidgets = Object.fromEntries(Object.entries(table).filter(([k, v]) => typeof k === "string" && typeof v === "string"));
    }
  } catch (e) {
    console.debug(EXTENSION, "no model widget table: counting with the shipped vocabulary", e);
  }
}

if (!window.__chineseSdTokenCounter) {
  window.__chineseSdTokenCounter = true;
  app.registerExtension({
    name: EXTENSION,
    nodeCreated(node) {
      if ((node?.comfyClass ?? node?.type) !== NODE_TYPE) return;
      try {
        attach(node);
      } catch (e) {
        console.error(EXTENSION, "could not add the token counter", e);
      }
    },
    async setup() {
      api.addEventListener(ENCODED_EVENT, onEncoded);
      setInterval(tick, POLL_MS);
      await loadModelWidgets();
    },
  });
}
