// Token counter of the Chinese-CLIP Text Encode node (ChineseSD_CLIPTextEncode).
//
// When the prompt, the long_prompt mode or the model wired into clip changes, the node asks the server (POST
// /chinese_sd/tokens, nodes/token_route.py, once the changes pause) how many of the window's prompt tokens the
// prompt uses, counted with that model's tokenizer; after a run it shows the exact count the encode made (the
// node's ui output "chinese_sd_tokens", which ComfyUI's "executed" message brings to node.onExecuted) for as long
// as the node's inputs are those of the run. Nothing is asked while nothing changes.
//
// The count is worded by the server (the answer's summary, e.g. `tokens: 63 / 50, 13 dropped: kept up to "…",
// dropped from "…"`, what the run command says too); the page adds its state (estimate, exact · last run, ...)
// and, for the Chinese UI, says the same count in Chinese.
//
// Layout: on the canvas the counter has a fixed height (LINES lines), so the node never changes size while the
// user types and the prompt box keeps its height. In a Vue-rendered node (Nodes 2.0) it takes only the lines it
// shows. A new node is made taller by the counter's and the long_prompt row's height, so that its prompt box is
// as tall as in ComfyUI's own CLIP Text Encode.
//
// DOM contract (kept stable for tests and styles):
//   div.chinese-sd-token-counter[data-node-id][data-state][data-tokens][data-capacity][data-dropped]
//       [data-windows][data-source][data-over]
//                                       data-state: pending | estimate | exact | error | linked
//                                       data-source: shipped | model | missing | run | ""
//     span.chinese-sd-token-count       the count (with .chinese-sd-token-warning when truncate drops tokens)
//     span.chinese-sd-token-note        the state, and where the count comes from
//     span.chinese-sd-token-error       why the prompt is refused (or the count failed)
// The element is a DOM widget named "chinese_sd_token_count" on the node (not serialized).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "ChineseSD.TokenCounter";
const NODE_TYPE = "ChineseSD_CLIPTextEncode";
const ROUTE = "/chinese_sd/tokens";
const WIDGETS_ROUTE = "/chinese_sd/model_widgets"; // {loader node ID: the widget holding its model choice}
const UI_OUTPUT = "chinese_sd_tokens"; // the encode node's ui output (nodes/text_encoder.py)
const WIDGET = "chinese_sd_token_count";
const CLASS = "chinese-sd-token-counter";
const DEBOUNCE_MS = 300;  // quiet time after a change before the server is asked
const MAX_HOPS = 16;      // links followed from the clip input to the loader
const TEXT_WIDGETS = ["text", "value", "string"]; // where a linked prompt's node holds it
const MARGIN = 2;         // the DOM widget's margin, around the element
const LINE = 16;          // px per line of text
const LINES = 3;          // on the canvas
const HEIGHT = LINES * LINE + 4;

// the loaders whose model choice names a tokenizer: the server's table (without it the shipped vocabulary counts)
let modelWidgets = {};
const counters = new Set();

// The page's own words. The count itself is the server's line (summary, summary_zh).
const TEXTS = {
  en: {
    estimate: "estimate",
    shipped: "shipped vocabulary",
    model: "model's vocabulary",
    exact: "exact · last run",
    pending: "counting…",
    linked: "prompt from a link: counted when it runs",
    approx: "{a|b}: the longest choice counted",
    missing: "model not installed: counting with the shipped vocabulary",
    unreadable: "model's vocabulary unreadable: counting with the shipped one",
    recipe: (r) => `recipe: ${r}`,
    failed: "Not counted: ",
    placeholder: "Prompt, in Chinese (English and mixed work too)",
    count: (data) => data.summary,
  },
  zh: {
    estimate: "估计",
    shipped: "插件自带词表",
    model: "模型词表",
    exact: "精确 · 上次运行",
    pending: "计数中…",
    linked: "提示词来自连线：运行时计数",
    approx: "{a|b}：按最长的选项计数",
    missing: "模型未安装：用插件自带词表计数",
    unreadable: "无法读取模型词表：用插件自带词表计数",
    recipe: (r) => `编码方式：${r}`,
    failed: "无法计数：",
    placeholder: "提示词，用中文写（英文和中英混合也可以）",
    count: (data) => data.summary_zh ?? data.summary,
  },
};

function texts() {
  const locale = String(app.extensionManager?.setting?.get?.("Comfy.Locale") || navigator.language || "en");
  return locale.toLowerCase().startsWith("zh") ? TEXTS.zh : TEXTS.en;
}

// ---------------------------------------------------------------------------------------------
// reading the node: its prompt, long_prompt mode and the model wired into clip

function widgetOf(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

// The node linked into the input named so: {node, slot} or null. Asked with getInputLink (frontend 1.58 warns of
// every read of input.link), the base class's, so that a subgraph node answers for its outer input as any node does.
function sourceOf(node, name) {
  const slot = node?.inputs?.findIndex((i) => i.name === name) ?? -1;
  if (slot < 0 || !node.isInputConnected(slot)) return null;
  const link = LiteGraph.LGraphNode.prototype.getInputLink.call(node, slot);
  const source = link && node.graph?.getNodeById(link.origin_id);
  return source ? { node: source, slot: link.origin_slot } : null;
}

// The model choice of the loader wired (through pass-through nodes: LoRA loaders, Set CLIP Last Layer, reroutes,
// bypassed nodes) into the node's clip input: {node, value, installed} or null. installed: the choice is among
// the loader's options (the files the server has).
function modelChoice(node) {
  let source = sourceOf(node, "clip");
  for (let hop = 0; hop < MAX_HOPS && source; hop++) {
    const type = source.node.comfyClass ?? source.node.type;
    const widget = widgetOf(source.node, modelWidgets[type]);
    if (widget) {
      if (typeof widget.value !== "string" || !widget.value) return null;
      let options = widget.options?.values;
      if (typeof options === "function") options = options(widget, source.node);
      return { node: type, value: widget.value, installed: !Array.isArray(options) || options.includes(widget.value) };
    }
    source = sourceOf(source.node, type === "Reroute" ? source.node.inputs?.[0]?.name : "clip");
  }
  return null;
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

// What the server is asked, and what the page says beside it. A prompt from a link into text is the linked node's
// own text (a widget named value, text or string); null when it has none (counted when it runs).
function payloadOf(node) {
  const linked = sourceOf(node, "text")?.node;
  const widget = linked ? linked.widgets?.find((w) => TEXT_WIDGETS.includes(w.name) && typeof w.value === "string")
    : widgetOf(node, "text");
  if (linked && !widget) return null;
  let text = typeof widget?.value === "string" ? widget.value : "";
  let approx = false;
  if (!linked && widget?.dynamicPrompts !== false) {
    text = text.replace(/\/\*[\s\S]*?\*\/|\/\/.*/g, ""); // comments: the frontend removes them too
    if (/[{|}]/.test(text)) [text, approx] = longestChoices(text);
  }
  const mode = widgetOf(node, "long_prompt")?.value === "chunk" ? "chunk" : "truncate";
  const choice = modelChoice(node);
  // a model that is not installed is not asked for: the shipped vocabulary counts, and the node says so
  const model = choice?.installed ? { node: choice.node, value: choice.value } : null;
  return { text, long_prompt: mode, model, approx, missing: !!choice && !choice.installed };
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
.${CLASS} .chinese-sd-token-count { color: var(--input-text, #ddd); font-weight: 600; margin-right: 6px; }
.${CLASS} .chinese-sd-token-count.chinese-sd-token-warning { color: #f0a020; }
.${CLASS} .chinese-sd-token-error { color: var(--error-text, #ff6b6b); }
.lg-node .${CLASS} { height: auto; max-height: ${HEIGHT}px; }
`;
  document.head.appendChild(style);
}

function buildElement() {
  ensureStyle();
  const root = document.createElement("div");
  root.className = CLASS;
  const parts = { root };
  for (const name of ["count", "note", "error"]) {
    parts[name] = document.createElement("span");
    parts[name].className = `chinese-sd-token-${name}`;
    root.appendChild(parts[name]);
  }
  return parts;
}

function render(counter) {
  const T = texts();
  const { root, count, note, error } = counter.parts;
  const payload = counter.payload;
  root.dataset.nodeId = String(counter.node.id); // a new node gets its id when it is added to the graph
  setPlaceholder(counter.node, T);
  let data = counter.answer;
  let state = !payload ? "linked" : !data ? "pending" : data.error ? "error" : "estimate";
  let source = state !== "estimate" ? "" : payload.missing ? "missing" : data.tokenizer === "model" ? "model" : "shipped";
  if (counter.exact && counter.exact.sig === counter.sig) [state, source, data] = ["exact", "run", counter.exact.data];
  const counted = state === "estimate" || state === "exact";
  root.dataset.state = state;
  root.dataset.source = source;
  root.dataset.tokens = counted ? String(data.tokens) : "";
  root.dataset.capacity = counted ? String(data.capacity) : "";
  root.dataset.dropped = counted ? String(data.dropped) : "";
  root.dataset.windows = counted ? String(data.windows) : "";
  root.dataset.over = counted && data.tokens > data.capacity ? "1" : "0";
  count.textContent = counted ? T.count(data) : "";
  count.classList.toggle("chinese-sd-token-warning", counted && data.dropped > 0);
  const notes = {
    pending: [T.pending], linked: [T.linked], error: [],
    estimate: [T.estimate, { missing: T.missing, model: T.model }[source] ?? (data?.model_error ? T.unreadable : T.shipped)],
    exact: [T.exact, data?.recipe ? T.recipe(data.recipe) : ""],
  }[state];
  if (counted && payload?.approx) notes.push(T.approx);
  note.textContent = notes.filter(Boolean).join(" · ");
  error.textContent = state === "error" ? T.failed + data.error : "";
}

// the prompt box's placeholder in the UI's language (the frontend shows the input's name, "text", otherwise)
function setPlaceholder(node, T) {
  const widget = widgetOf(node, "text");
  const box = widget?.element;
  if (box instanceof HTMLTextAreaElement && box.placeholder !== T.placeholder) box.placeholder = T.placeholder;
  if (widget?.options && widget.options.placeholder !== T.placeholder) widget.options.placeholder = T.placeholder;
}

// ---------------------------------------------------------------------------------------------
// reacting to changes

function schedule(counter) {
  clearTimeout(counter.timer);
  counter.timer = setTimeout(() => update(counter), DEBOUNCE_MS);
}

function refreshAll() {
  counters.forEach(schedule);
}

// the node's inputs as they are now: shown, and asked about when the server has not counted them yet
function update(counter) {
  counter.timer = 0;
  if (!counters.has(counter)) return;
  try {
    counter.payload = payloadOf(counter.node);
  } catch (e) {
    console.debug(EXTENSION, e);
    return;
  }
  counter.sig = JSON.stringify(counter.payload);
  if (counter.payload && counter.sig !== counter.askedSig) ask(counter);
  render(counter);
}

async function ask(counter) {
  const sig = (counter.askedSig = counter.sig);
  const seq = ++counter.seq;
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
  }
  if (seq !== counter.seq) return; // asked again meanwhile
  [counter.answer, counter.answerSig] = [answer, sig];
  render(counter);
}

// fn called after what the object's method (or callback) did
function chain(object, name, fn) {
  const original = object[name];
  object[name] = function () {
    const result = original?.apply(this, arguments);
    fn.apply(this, arguments);
    return result;
  };
}

function attach(node) {
  if (typeof node.addDOMWidget !== "function" || widgetOf(node, WIDGET)) return;
  const parts = buildElement();
  const counter = { node, parts, payload: null, sig: null, askedSig: null, answer: null, answerSig: null, exact: null, seq: 0, timer: 0 };
  const widget = node.addDOMWidget(WIDGET, "chinese_sd_tokens", parts.root, {
    serialize: false,
    getValue: () => "",
    setValue: () => {},
    margin: MARGIN,
  });
  widget.serialize = false;
  // The room the counter takes: fixed on the canvas (computeSize: the node never changes size while the user
  // types; LiteGraph adds 4 px to it, the margins take 2 * MARGIN of that). A Vue-rendered node ("Nodes 2.0")
  // gives the widgets that have no computeLayoutSize a row as tall as their content: the counter's lines, the
  // prompt box the node's free room.
  widget.computeSize = () => [0, HEIGHT];
  widget.computeLayoutSize = undefined;
  // The counter has its node's width. (Selecting the node lets the frontend's side panel leave its own, narrower
  // width on the widget, which would wrap the counter's lines until they no longer fit.)
  Object.defineProperty(widget, "width", { get: () => undefined, set: () => {}, configurable: true });
  node.chineseSdTokenCounter = counter;
  counters.add(counter);
  chain(node, "onConfigure", () => schedule(counter)); // loaded from a workflow: values set without callbacks
  chain(node, "onExecuted", (output) => {
    const data = output?.[UI_OUTPUT]?.[0];
    if (typeof data?.summary !== "string") return;
    update(counter); // the inputs as they are now are those of this count
    counter.exact = { sig: counter.sig, data };
    render(counter);
  });
  chain(node, "onRemoved", () => {
    counters.delete(counter);
    clearTimeout(counter.timer);
  });
  // a new node gets room for the long_prompt row and the counter beside a prompt box as tall as ComfyUI's own
  // CLIP Text Encode has (a node loaded from a workflow then takes its saved size)
  node.setSize([node.size[0], node.size[1] + widget.computeSize()[1] + 4 + LiteGraph.NODE_WIDGET_HEIGHT + 4]);
  render(counter);
  schedule(counter);
}

async function loadModelWidgets() {
  try {
    const res = await api.fetchApi(WIDGETS_ROUTE);
    const table = res.ok ? await res.json() : null;
    if (table && typeof table === "object" && !Array.isArray(table)) modelWidgets = table;
  } catch (e) {
    console.debug(EXTENSION, "no model widget table: counting with the shipped vocabulary", e);
  }
}

app.registerExtension({
  name: EXTENSION,
  async init() {
    await loadModelWidgets(); // before the nodes of the open workflow are made
  },
  nodeCreated(node) {
    try {
      // What a counter reads changed, on any node (a prompt, the mode, a model choice, a link: e.g. another
      // loader wired in through a LoRA): the counters look again, each asking only if its node's inputs changed
      const type = node.comfyClass ?? node.type;
      chain(node, "onConnectionsChange", refreshAll);
      for (const w of node.widgets ?? []) {
        if ([...TEXT_WIDGETS, "long_prompt", modelWidgets[type]].includes(w.name)) chain(w, "callback", refreshAll);
      }
      if (type === NODE_TYPE) attach(node);
    } catch (e) {
      console.error(EXTENSION, "could not add the token counter", e);
    }
  },
  setup() {
    app.ui?.settings?.addEventListener?.("Comfy.Locale.change", () => counters.forEach(render));
  },
});
