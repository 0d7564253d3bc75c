// Lumina-mGPT 2.0 frontend extension: resolution picker with the sizes that fit the connected model, size
// snapping to the grid, the composer's final prompt, the sampler's settings and ThinkPrompt's result on the
// node, score badges on best-of-N. Every size rule comes from Python (lumina_core.request) through the
// node metadata: the grid, each task's dual-panel flag, the sizes that fit each model; nothing is retyped.
import { app } from "../../scripts/app.js";

const EXTENSION = "lumina.mgpt2";
const LOADER = "LuminaMGPT2Loader";
const COMPOSER = "LuminaMGPT2DualPanelComposer";
const SAMPLER = "LuminaMGPT2ARSamplerSJD";
const THINK = "LuminaMGPT2ThinkPrompt";
const BEST_OF_N = "LuminaMGPT2VerifierBestOfN";
const PIPE = "LUMINA_PIPE";
const PICKER_NONE = "pick a resolution…";

// Filled from /object_info: the composer's task options carry `lumina` (request.web_constants() and the
// picker's sizes per position budget), the Loader's model options carry `lumina_models` (each model's
// positions and defaults).
const metadata = { sizes: null, models: {} };

export function setMetadata(sizes, models) {
  if (sizes) metadata.sizes = sizes;
  if (models) metadata.models = models;
}

export function isDualPanel(task) {
  return Boolean(metadata.sizes?.dual_panel?.[task]);
}

function grid() {
  return metadata.sizes?.grid ?? 1;
}

// The facts of the model connected to a node's pipe input: follows the pipe upstream (through LoRA or
// any other node that passes a pipe on) to the node with a `model` widget that the Loader lists.
export function connectedModel(node, seen = new Set()) {
  if (!node || seen.has(node.id)) return null;
  seen.add(node.id);
  const model = node.widgets?.find((w) => w.name === "model")?.value;
  if (model && metadata.models[model]) return { name: model, ...metadata.models[model] };
  for (const input of node.inputs || []) {
    if (input.type !== PIPE || input.link == null) continue;
    const link = node.graph?.links?.[input.link] ?? app.graph?.links?.[input.link];
    const origin = link && (node.graph ?? app.graph).getNodeById(link.origin_id);
    const found = connectedModel(origin, seen);
    if (found) return found;
  }
  return null;
}

function budgetOf(model) {
  return model?.max_positions ?? metadata.sizes?.default_max_positions;
}

// Grid sizes for a task that fit the model: [{label, width, height, tokens}] (computed in Python).
export function resolutionChoices(task, model = null) {
  const dual = isDualPanel(task);
  const byBudget = metadata.sizes?.choices || {};
  const sizes = byBudget[String(budgetOf(model))] ?? byBudget[String(metadata.sizes?.default_max_positions)] ?? {};
  return (sizes[dual ? "dual" : "single"] || []).map((c) => {
    const panel = dual ? ` (two ${c.panel[0]}×${c.panel[1]} panels)` : "";
    return { label: `${c.width}×${c.height}${panel} · ${c.ratio} · ${c.tokens.toLocaleString("en-US")} tokens`,
             width: c.width, height: c.height, tokens: c.tokens };
  });
}

function snap(value, step) {
  // 0 stays 0: "model default".
  return value <= 0 ? 0 : Math.max(step, Math.round(value / step) * step);
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

// What the picker shows for the current values: the size (the model's default where 0) and its cost.
export function sizeLabel(node) {
  const task = widget(node, "task")?.value;
  let width = widget(node, "width")?.value;
  let height = widget(node, "height")?.value;
  if (width == null || height == null) return "";
  const model = connectedModel(node);
  const modelName = model ? model.name.split("/").pop() : "official";
  const typed = width > 0 && height > 0;
  const size = model?.defaults?.sizes?.[task];
  if (!width && size) width = size[0];
  if (!height && size) height = size[1];
  if (!width || !height) return "model default size";
  const choice = resolutionChoices(task, model).find((c) => c.width === width && c.height === height);
  const cost = choice ? `${choice.tokens.toLocaleString("en-US")} tokens` : "checked when queued";
  return `${typed ? "" : `model default (${modelName}): `}${width}×${height}` +
         `${isDualPanel(task) ? " (dual panel)" : ""}: ${cost}`;
}

function addResolutionPicker(node) {
  const taskWidget = widget(node, "task");
  const refresh = () => {
    const choices = resolutionChoices(taskWidget?.value, connectedModel(node));
    picker.options.values = [PICKER_NONE, ...choices.map((c) => c.label)];
    picker.choices = choices;
    picker.value = sizeLabel(node) || PICKER_NONE;  // the combo shows the current size and its cost
  };
  const picker = nonSerialized(node.addWidget("combo", "resolution", PICKER_NONE, (label) => {
    const choice = picker.choices?.find((c) => c.label === label);
    if (choice) setSize(node, choice.width, choice.height);
    picker.value = sizeLabel(node) || PICKER_NONE;
  }, { values: [PICKER_NONE] }));
  picker.tooltip = "Sizes that fit the connected model, fewest tokens first (from the Loader's model).";

  // Snap sizes to the grid (height to two grids for dual-panel tasks so each panel stays on the grid).
  for (const name of ["width", "height"]) {
    const w = widget(node, name);
    if (!w) continue;
    const original = w.callback;
    w.callback = function (value, ...rest) {
      const step = name === "height" && isDualPanel(taskWidget?.value) ? 2 * grid() : grid();
      const snapped = snap(Number(value) || 0, step);
      if (snapped !== w.value) w.value = snapped;
      picker.value = sizeLabel(node);
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
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const result = onConnectionsChange?.apply(this, args);
    refresh();  // another model connected: other sizes fit
    return result;
  };
  refresh();
  node.luminaRefreshResolution = refresh;
}

function refreshAllComposers() {
  for (const n of app.graph?._nodes || []) n.luminaRefreshResolution?.();
}

function watchModelWidget(node) {
  const w = widget(node, "model");
  if (!w) return;
  const original = w.callback;
  w.callback = function (...args) {
    const result = original?.apply(this, args);
    refreshAllComposers();
    return result;
  };
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
    const type = node.comfyClass || node.type;
    if (type === COMPOSER) addResolutionPicker(node);
    if (type === LOADER) watchModelWidget(node);
  },
  afterConfigureGraph() {
    refreshAllComposers();  // links exist now: each composer sees its model
  },
  loadedGraphNode(node) {
    node.luminaRefreshResolution?.();  // values loaded from the workflow: refresh the choices and cost
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === COMPOSER) setMetadata(nodeData.input?.required?.task?.[1]?.lumina, null);
    if (nodeData.name === LOADER) setMetadata(null, nodeData.input?.required?.model?.[1]?.lumina_models);
    if (![COMPOSER, THINK, BEST_OF_N, SAMPLER].includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message, ...rest) {
      const result = onExecuted?.call(this, message, ...rest);
      if (nodeData.name === COMPOSER && message?.text) showText(this, "final_prompt", message.text);
      if (nodeData.name === THINK && message?.text) showText(this, "refined_prompt", message.text);
      if (nodeData.name === SAMPLER && message?.text) showText(this, "settings_used", message.text);
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

window.luminaMGPT2 = { resolutionChoices, scoreBadges, isDualPanel, sizeLabel, connectedModel, setMetadata, metadata };
