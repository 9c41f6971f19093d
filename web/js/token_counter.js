// Token counter of the Chinese-CLIP Text Encode node (ChineseSD_CLIPTextEncode).
//
// While the user types, the node shows how many of the 52-token window's prompt tokens (50: [CLS] and [SEP]
// take 2) the prompt uses, counted by the server (POST /chinese_sd/tokens, nodes/token_route.py) with the
// tokenizer of the model wired into the node's clip input, and warns when truncate mode will drop tokens,
// saying where the cut falls. After a run it shows the exact count the node reported in its progress text
// ("tokens: 38 / 50", see loaders/token_count.py summary()).
//
// DOM contract (kept stable for tests and styles):
//   div.chinese-sd-token-counter[data-node-id][data-state][data-tokens][data-capacity][data-dropped]
//       [data-windows][data-source]            data-state: pending | estimate | exact | error | linked
//     div.chinese-sd-token-line
//       span.chinese-sd-token-label             "tokens" / "token数"
//       span.chinese-sd-token-count             "38 / 50" (estimate and exact states), "? / 50" (error), "… / 50"
//       span.chinese-sd-token-note              where the count comes from, windows, limits
//     div.chinese-sd-token-warning[hidden]      truncate mode drops tokens
//       span.chinese-sd-token-warning-text, span.chinese-sd-token-cut-before ("…中国山水画"),
//       span.chinese-sd-token-cut-after ("大雾弥漫…")
//     div.chinese-sd-token-error[hidden]        the prompt is refused (or the count failed): the message
// The element is a DOM widget named "chinese_sd_token_count" on the node (not serialized).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "ChineseSD.TokenCounter";
const NODE_TYPE = "ChineseSD_CLIPTextEncode";
const ROUTE = "/chinese_sd/tokens";
const WIDGET = "chinese_sd_token_count";
const CLASS = "chinese-sd-token-counter";
const MODEL_WIDGETS = {
  ChineseSD_CLIPLoader: "clip_name",
  ChineseSD_ModelScopeLoader: "model_folder",
  ChineseSD_CheckpointLoader: "ckpt_name",
};
const POLL_MS = 250;      // how often the node's inputs are looked at
const DEBOUNCE_MS = 300;  // quiet time after a change before the server is asked
const MAX_HOPS = 16;      // links followed from the clip input to the loader
const MARGIN = 2;         // the DOM widget's margin, around the element

const TEXTS = {
  en: {
    label: "tokens",
    shipped: "estimate · shipped vocabulary",
    model: "estimate · model vocabulary",
    exact: "exact · last run",
    pending: "counting…",
    linked: "the prompt comes from a link: counted when it runs",
    windows: (n) => `${n} windows`,
    limited: (n) => `first ${n} characters counted`,
    approx: "longest {a|b} choices counted",
    modelError: "model vocabulary unreadable, shipped one used",
    dropped: (dropped, tokens) => `Truncate drops ${dropped} of ${tokens} tokens: kept up to “`,
    middle: "”, dropped from “",
    end: "”.",
    failed: "Not counted: ",
  },
  zh: {
    label: "token数",
    shipped: "估计 · 插件自带词表",
    model: "估计 · 模型词表",
    exact: "精确 · 上次运行",
    pending: "计数中…",
    linked: "提示词来自连线：运行时计数",
    windows: (n) => `${n} 个窗口`,
    limited: (n) => `仅统计前 ${n} 个字符`,
    approx: "{a|b} 按最长的选项计数",
    modelError: "无法读取模型词表，已用插件自带词表",
    dropped: (dropped, tokens) => `截断模式将丢弃 ${tokens} 个token中的 ${dropped} 个：保留到“`,
    middle: "”，从“",
    end: "”起丢弃。",
    failed: "无法计数：",
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
// reading the node: its prompt, long_prompt mode and the model wired into clip

function widgetOf(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function linkOf(graph, id) {
  const links = graph?.links;
  if (!links || id == null) return null;
  return typeof links.get === "function" ? links.get(id) : links[id];
}

function sourceOf(node, input) {
  if (!input || input.link == null) return null;
  const graph = node.graph ?? app.graph;
  const link = linkOf(graph, input.link);
  if (!link) return null;
  const source = graph.getNodeById?.(link.origin_id);
  return source ? { node: source, slot: link.origin_slot } : null;
}

function inputNamed(node, name) {
  return node?.inputs?.find((i) => i.name === name);
}

function modelChoice(node) {
  let current = node;
  let input = inputNamed(node, "clip");
  for (let hop = 0; hop < MAX_HOPS && input; hop++) {
    const source = sourceOf(current, input);
    if (!source) return null;
    const type = source.node.comfyClass ?? source.node.type;
    const widgetName = MODEL_WIDGETS[type];
    if (widgetName) {
      const value = widgetOf(source.node, widgetName)?.value;
      return typeof value === "string" && value ? { node: type, value } : null;
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
  if (input?.link != null) {
    const source = sourceOf(node, input);
    const w = source?.node?.widgets?.find((w) => typeof w.value === "string" && ["value", "text", "string"].includes(w.name));
    if (!w) return null; // counted when it runs
    text = w.value;
    dynamic = false;
  } else {
    const value = widgetOf(node, "text")?.value;
    text = typeof value === "string" ? value : "";
  }
  let approx = false;
  if (dynamic) {
    text = stripComments(text);
    if (/[{|}]/.test(text)) [text, approx] = longestChoices(text);
  }
  const mode = widgetOf(node, "long_prompt")?.value === "chunk" ? "chunk" : "truncate";
  return { text, long_prompt: mode, model: modelChoice(node), approx };
}

// ---------------------------------------------------------------------------------------------
// the element

function ensureStyle() {
  if (document.getElementById(`${CLASS}-style`)) return;
  const style = document.createElement("style");
  style.id = `${CLASS}-style`;
  style.textContent = `
.${CLASS} { box-sizing: border-box; width: 100%; height: 100%; overflow: hidden; padding: 1px 4px;
  font: 12px/16px sans-serif; color: var(--descrip-text, #999); pointer-events: none; }
.${CLASS} .chinese-sd-token-count { color: var(--input-text, #ddd); font-weight: 600;
  font-variant-numeric: tabular-nums; margin: 0 6px 0 4px; }
.${CLASS}[data-over="1"] .chinese-sd-token-count { color: #f0a020; }
.${CLASS} .chinese-sd-token-warning { color: #f0a020; }
.${CLASS} .chinese-sd-token-cut-before, .${CLASS} .chinese-sd-token-cut-after { font-weight: 600; }
.${CLASS} .chinese-sd-token-error { color: var(--error-text, #ff6b6b); }
`;
  document.head.appendChild(style);
}

function span(className, parent) {
  const el = document.createElement("span");
  el.className = className;
  parent.appendChild(el);
  return el;
}

function buildElement(node) {
  ensureStyle();
  const root = document.createElement("div");
  root.className = CLASS;
  root.dataset.nodeId = String(node.id);
  root.dataset.state = "pending";
  const line = document.createElement("div");
  line.className = "chinese-sd-token-line";
  root.appendChild(line);
  const parts = { root };
  parts.label = span("chinese-sd-token-label", line);
  parts.count = span("chinese-sd-token-count", line);
  parts.note = span("chinese-sd-token-note", line);
  parts.warning = document.createElement("div");
  parts.warning.className = "chinese-sd-token-warning";
  parts.warning.hidden = true;
  root.appendChild(parts.warning);
  parts.warningText = span("chinese-sd-token-warning-text", parts.warning);
  parts.before = span("chinese-sd-token-cut-before", parts.warning);
  parts.middle = span("chinese-sd-token-warning-middle", parts.warning);
  parts.after = span("chinese-sd-token-cut-after", parts.warning);
  parts.end = span("chinese-sd-token-warning-end", parts.warning);
  parts.error = document.createElement("div");
  parts.error.className = "chinese-sd-token-error";
  parts.error.hidden = true;
  root.appendChild(parts.error);
  return parts;
}

// "tokens: 63 / 50, 13 dropped: kept up to "…中国山水画", dropped from "大雾弥漫…"" (loaders/token_count.py)
const SUMMARY = /^tokens: (\d+) \/ (\d+)(?:, (\d+) windows)?(?:, (\d+) dropped: kept up to "…([\s\S]*)", dropped from "([\s\S]*)…")?$/;

function parseSummary(text) {
  for (const line of String(text).split("\n")) {
    const m = SUMMARY.exec(line.trim());
    if (m) {
      return {
        tokens: Number(m[1]), capacity: Number(m[2]), windows: Number(m[3] ?? 1), dropped: Number(m[4] ?? 0),
        cut_before: m[5] ?? "", cut_after: m[6] ?? "",
      };
    }
  }
  return null;
}

function render(counter) {
  const T = texts();
  const p = counter.parts;
  const root = p.root;
  counter.locale = T;
  root.dataset.nodeId = String(counter.node.id); // a new node gets its id when it is added to the graph
  p.label.textContent = T.label;
  let data = counter.answer;
  let state;
  let source = "";
  if (!counter.payload) {
    state = "linked";
    data = null;
  } else if (counter.exact && counter.exact.sig === counter.wantedSig) {
    state = "exact";
    source = "run";
    data = { ...counter.exact, long_prompt: counter.payload.long_prompt };
  } else if (!data) {
    state = "pending";
  } else if (data.error) {
    state = "error";
  } else {
    state = "estimate";
    source = data.tokenizer === "model" ? "model" : "shipped";
  }
  if (data?.per_window) counter.perWindow = data.per_window;
  const capacity = (state === "estimate" || state === "exact") ? data.capacity : counter.perWindow;
  root.dataset.state = state;
  root.dataset.source = source;
  const counted = state === "estimate" || state === "exact";
  root.dataset.tokens = counted ? String(data.tokens) : "";
  root.dataset.capacity = String(capacity);
  root.dataset.dropped = counted ? String(data.dropped ?? 0) : "";
  root.dataset.windows = counted ? String(data.windows ?? 1) : "";
  root.dataset.over = counted && data.tokens > capacity ? "1" : "0";
  root.dataset.approx = counter.payload?.approx ? "1" : "0";
  p.count.textContent = counted ? `${data.tokens} / ${capacity}` : state === "error" ? `? / ${capacity}` : `… / ${capacity}`;

  const notes = [];
  if (state === "estimate") notes.push(T[source]);
  if (state === "exact") notes.push(T.exact);
  if (state === "pending") notes.push(T.pending);
  if (state === "linked") notes.push(T.linked);
  if (counted && (data.windows ?? 1) > 1) notes.push(T.windows(data.windows));
  if (state === "estimate" && data.limited) notes.push(T.limited(data.chars_counted));
  if (state === "estimate" && data.model_error) notes.push(T.modelError);
  if (counted && counter.payload?.approx) notes.push(T.approx);
  p.note.textContent = notes.join(" · ");
  root.title = state === "estimate" && data.model_error ? data.model_error : "";

  const dropped = counted && data.long_prompt !== "chunk" ? data.dropped ?? 0 : 0;
  p.warning.hidden = !(dropped > 0);
  if (dropped > 0) {
    p.warningText.textContent = T.dropped(dropped, data.tokens);
    p.before.textContent = `…${data.cut_before ?? ""}`;
    p.middle.textContent = T.middle;
    p.after.textContent = `${data.cut_after ?? ""}…`;
    p.end.textContent = T.end;
  }
  p.error.hidden = state !== "error";
  p.error.textContent = state === "error" ? T.failed + data.error : "";
  fit(counter);
}

function fit(counter) {
  const p = counter.parts;
  const lines = 1 + (p.warning.hidden ? 0 : 2) + (p.error.hidden ? 0 : 2);
  let height = 4 + 16 * lines;
  // the content's own height once laid out (a warning may wrap to more lines than estimated)
  const measured = p.root.isConnected
    ? Array.from(p.root.children).reduce((sum, el) => sum + (el.hidden ? 0 : el.offsetHeight), 4) : 0;
  if (measured > height && measured < 200) height = measured;
  if (height === counter.height) return;
  counter.height = height;
  const node = counter.node;
  try {
    const size = node.computeSize?.();
    if (size && node.size && node.size[1] < size[1]) node.setSize([node.size[0], size[1]]);
    node.setDirtyCanvas?.(true, true);
  } catch (e) {
    console.debug(EXTENSION, "resize", e);
  }
}

// ---------------------------------------------------------------------------------------------
// asking the server

async function ask(counter) {
  const sig = counter.wantedSig;
  const seq = ++counter.seq;
  counter.inFlight = true;
  let answer;
  try {
    const { approx, ...body } = counter.payload;
    const res = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
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
    } else if (counter.locale !== texts()) {
      render(counter);
    }
    const quiet = counter.lastSig === null ? 0 : DEBOUNCE_MS;
    if (payload && !counter.inFlight && counter.lastSig !== sig && now - counter.changedAt >= quiet) ask(counter);
  }
}

function attach(node) {
  if (typeof node.addDOMWidget !== "function" || widgetOf(node, WIDGET)) return;
  const parts = buildElement(node);
  const counter = {
    node, parts, payload: null, wantedSig: null, lastSig: null, answer: null, exact: null, seq: 0,
    inFlight: false, changedAt: 0, height: 20, perWindow: 50, locale: null,
  };
  const widget = node.addDOMWidget(WIDGET, "chinese_sd_tokens", parts.root, {
    serialize: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => counter.height + 2 * MARGIN,
    getMaxHeight: () => counter.height + 2 * MARGIN,
    getHeight: () => counter.height + 2 * MARGIN,
    margin: MARGIN,
  });
  widget.serialize = false;
  counter.widget = widget;
  node.chineseSdTokenCounter = counter;
  counters.add(counter);
  const removed = node.onRemoved;
  node.onRemoved = function () {
    counters.delete(counter);
    return removed?.apply(this, arguments);
  };
  render(counter);
}

function onProgressText(event) {
  const { nodeId, text } = event?.detail ?? {};
  if (nodeId == null) return;
  const id = String(nodeId);
  const summary = parseSummary(text ?? "");
  if (!summary) return;
  for (const counter of counters) {
    const own = String(counter.node.id);
    // nodes inside subgraphs run under "<parent id>:<id>"
    if (id === own || id.endsWith(`:${own}`) && counter.node.graph !== app.graph) {
      counter.exact = { ...summary, sig: counter.wantedSig };
      render(counter);
    }
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
    setup() {
      api.addEventListener("progress_text", onProgressText);
      setInterval(tick, POLL_MS);
    },
  });
}
