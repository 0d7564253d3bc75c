// Lumina-mGPT 2.0 frontend extension: resolution picker with token costs, size snapping to the 32 px
// grid, the composer's final prompt and ThinkPrompt's result on the node, score badges on best-of-N.
import { app } from "../../scripts/app.js";

const EXTENSION = "lumina.mgpt2";
const GRID = 32;                 // one size token = 32 px
const PIXELS_PER_CODE = 8;       // MoVQGAN downsampling
const MAX_POSITIONS = 10240;     // token budget of the official generate path
const COMPOSER = "LuminaMGPT2DualPanelComposer";
const SAMPLER = "LuminaMGPT2ARSamplerSJD";
const THINK = "LuminaMGPT2ThinkPrompt";
const BEST_OF_N = "LuminaMGPT2VerifierBestOfN";
const RATIOS = [[1, 1], [4, 3], [3, 4], [3, 2], [2, 3], [16, 9], [9, 16], [2, 1], [1, 2]];
const SIDES = [256, 384, 512, 640, 768, 896, 1024];
const PICKER_NONE = "pick a resolution…";

// Same formula as lumina_core.tokens.image_token_count: start, H, W, rows of (cols + new line), end.
export function imageTokenCount(width, height) {
  const rows = Math.floor(height / PIXELS_PER_CODE);
  const cols = Math.floor(width / PIXELS_PER_CODE);
  return 3 + rows * (cols + 1) + 1;
}

export function isDualPanel(task) {
  return task !== "t2i" && typeof task === "string";
}

function snap(value, step) {
  return Math.max(step, Math.round(value / step) * step);
}

// Grid-valid sizes for a task: [{label, width, height, tokens}], panels for dual-panel tasks.
export function resolutionChoices(task) {
  const dual = isDualPanel(task);
  const seen = new Set();
  const out = [];
  for (const side of SIDES) {
    for (const [rw, rh] of RATIOS) {
      const area = side * side;
      const pw = snap(Math.sqrt((area * rw) / rh), GRID);
      const ph = snap(Math.sqrt((area * rh) / rw), GRID);
      const width = pw;
      const height = dual ? 2 * ph : ph;
      const tokens = imageTokenCount(width, height);
      const key = `${width}x${height}`;
      if (tokens > MAX_POSITIONS || seen.has(key)) continue;
      seen.add(key);
      // The nominal aspect ratio; "≈" when the 32 px grid cannot hit it exactly.
      const exact = pw * rh === ph * rw;
      const ratio = `${exact ? "" : "≈"}${rw}:${rh}`;
      const panel = dual ? ` (two ${pw}×${ph} panels)` : "";
      out.push({ label: `${width}×${height}${panel} · ${ratio} · ${tokens.toLocaleString("en-US")} tokens`,
                 width, height, tokens });
    }
  }
  out.sort((a, b) => a.tokens - b.tokens);
  return out;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function nonSerialized(w) {
  // Frontend-only widgets: kept out of widgets_values and of the API prompt.
  w.serialize = false;
  w.options = w.options || {};
  w.options.serialize = false;
  return w;
}

function setSize(node, width, height) {
  const ww = widget(node, "width");
  const hw = widget(node, "height");
  if (!ww || !hw) return;
  ww.value = width;
  hw.value = height;
  ww.callback?.(width);
  hw.callback?.(height);
  node.setDirtyCanvas?.(true, true);
}

function tokenLabel(node) {
  const task = widget(node, "task")?.value;
  const width = widget(node, "width")?.value;
  const height = widget(node, "height")?.value;
  if (!width || !height) return "";
  const tokens = imageTokenCount(width, height);
  const over = tokens > MAX_POSITIONS ? " — over the budget!" : "";
  return `${width}×${height}${isDualPanel(task) ? " (dual panel)" : ""}: ${tokens.toLocaleString("en-US")} tokens${over}`;
}

function addResolutionPicker(node) {
  const taskWidget = widget(node, "task");
  const refresh = () => {
    const choices = resolutionChoices(taskWidget?.value);
    picker.options.values = [PICKER_NONE, ...choices.map((c) => c.label)];
    picker.choices = choices;
    picker.value = tokenLabel(node) || PICKER_NONE;  // the combo shows the current size and its cost
  };
  const picker = nonSerialized(node.addWidget("combo", "resolution", PICKER_NONE, (label) => {
    const choice = picker.choices?.find((c) => c.label === label);
    if (choice) setSize(node, choice.width, choice.height);
    picker.value = tokenLabel(node) || PICKER_NONE;
  }, { values: [PICKER_NONE] }));

  // Snap sizes to the grid (height to 64 px for dual-panel tasks so each panel stays on the grid).
  for (const name of ["width", "height"]) {
    const w = widget(node, name);
    if (!w) continue;
    const original = w.callback;
    w.callback = function (value, ...rest) {
      const step = name === "height" && isDualPanel(taskWidget?.value) ? 2 * GRID : GRID;
      const snapped = snap(Number(value) || step, step);
      if (snapped !== w.value) w.value = snapped;
      picker.value = tokenLabel(node);
      return original?.call(this, snapped, ...rest);
    };
  }
  if (taskWidget) {
    const original = taskWidget.callback;
    taskWidget.callback = function (...args) {
      const result = original?.apply(this, args);
      refresh();
      const hw = widget(node, "height");
      hw?.callback?.(hw.value);
      return result;
    };
  }
  refresh();
  node.luminaRefreshResolution = refresh;
}

function textPanel(node, name, minHeight = 60) {
  let entry = node.luminaPanels?.[name];
  if (entry) return entry;
  const element = document.createElement("div");
  element.className = "lumina-mgpt2-panel";
  element.style.cssText = "font: 12px/1.4 sans-serif; color: var(--input-text, #ddd); background: " +
    "var(--comfy-input-bg, #222); border-radius: 6px; padding: 6px; overflow: auto; white-space: pre-wrap; " +
    "max-height: 220px;";
  const w = node.addDOMWidget(name, "lumina_panel", element, { serialize: false, hideOnZoom: false,
                                                               getMinHeight: () => minHeight });
  nonSerialized(w);
  node.luminaPanels = { ...(node.luminaPanels || {}), [name]: { element, widget: w } };
  return node.luminaPanels[name];
}

export function scoreBadges(rows) {
  // One badge per candidate, best first: "#place · image index · combined (per-verifier scores)".
  const fragment = document.createElement("div");
  fragment.style.cssText = "display: flex; flex-wrap: wrap; gap: 4px;";
  for (const row of rows) {
    const badge = document.createElement("span");
    const verifiers = Object.entries(row)
      .filter(([k]) => !["index", "place", "combined"].includes(k) && !/_(rank|z)$/.test(k))
      .map(([k, v]) => `${k} ${Number(v).toFixed(3)}`).join(", ");
    badge.textContent = `#${row.place} · img ${row.index} · ${Number(row.combined).toFixed(2)}` +
      (verifiers ? ` (${verifiers})` : "");
    badge.className = "lumina-mgpt2-badge";
    badge.dataset.place = String(row.place);
    badge.style.cssText = "padding: 2px 8px; border-radius: 10px; font-size: 11px; color: #111; background: " +
      (row.place === 1 ? "#f5c542" : row.place === 2 ? "#c9d1d9" : "#9fb4c7") + ";";
    fragment.appendChild(badge);
  }
  return fragment;
}

function showText(node, name, lines) {
  const panel = textPanel(node, name);
  panel.element.textContent = (lines || []).join("\n\n");
  node.setDirtyCanvas?.(true, true);
}

// The folder can be served twice (WEB_DIRECTORY and pyproject's [tool.comfy] web): register once.
const extension = {
  name: EXTENSION,
  nodeCreated(node) {
    if (node.comfyClass === COMPOSER || node.type === COMPOSER) addResolutionPicker(node);
  },
  loadedGraphNode(node) {
    node.luminaRefreshResolution?.();  // values loaded from the workflow: refresh the choices and cost
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (![COMPOSER, THINK, BEST_OF_N, SAMPLER].includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message, ...rest) {
      const result = onExecuted?.call(this, message, ...rest);
      if (nodeData.name === COMPOSER && message?.text) showText(this, "final_prompt", message.text);
      if (nodeData.name === THINK && message?.text) showText(this, "refined_prompt", message.text);
      if (nodeData.name === BEST_OF_N && message?.lumina_scores) {
        const panel = textPanel(this, "scores", 30 + 22 * Math.ceil(message.lumina_scores.length / 2));
        panel.element.replaceChildren(scoreBadges(message.lumina_scores));
        this.setDirtyCanvas?.(true, true);
      }
      return result;
    };
  },
};

if (!window.luminaMGPT2) app.registerExtension(extension);

window.luminaMGPT2 = { imageTokenCount, resolutionChoices, scoreBadges, isDualPanel };
