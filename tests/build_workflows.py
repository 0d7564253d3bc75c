"""Writes workflows/*.json (UI format, one per task) and their API twins tests/workflows_api/*.json.

Run from the repository root: ``python tests/build_workflows.py``. The files are committed; the tests
validate the committed files (links, types, widget values) and that each twin equals the conversion
of its UI file, so a hand edit of either side is caught.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("workflow_tools", HERE / "workflow_tools.py")
wt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wt)

REPO = wt.REPO
UI_DIR = REPO / "workflows"
API_DIR = REPO / "tests" / "workflows_api"
MODEL = "Alpha-VLLM/Lumina-mGPT-2.0"
EXAMPLE_IMAGE = "example.png"  # ships in ComfyUI's input/ folder
PACK_ID = "lumina-mgpt2"

CONDITION_WORDS = {"depth": "depth map", "canny": "canny edge map", "hed": "HED edge map",
                   "pose": "pose (OpenPose) map", "openpose": "pose (OpenPose) map"}


class Graph:
    """A small builder of UI-format graphs with the frontend's node/link bookkeeping."""

    def __init__(self, info: dict, title: str):
        self.info = info
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.column = 0
        self.view = {"scale": 0.75, "offset": [40, 80]}

    def add(self, node_type: str, widgets: dict | None = None, pos: tuple[int, int] = (0, 0),
            title: str | None = None, size: tuple[int, int] = (320, 200)) -> dict:
        """Add a node; ``widgets`` overrides defaults by input name (seeds get a 'fixed' control)."""
        widgets = dict(widgets or {})
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": node_type}, "widgets_values": []}
        if title:
            node["title"] = title
        if node_type in wt.VIRTUAL_NODES:
            node["widgets_values"] = [widgets.pop("text")]
            node["properties"] = {}
            self.nodes.append(node)
            return node
        spec = self.info[node_type]
        if node_type.startswith("LuminaMGPT2"):
            node["properties"]["cnr_id"] = PACK_ID
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                kind, options = wt.input_spec(spec, name)
                if not wt.is_widget(kind, options):
                    node["inputs"].append({"name": name, "type": kind, "link": None})
        for role_name, role in wt.widget_slots(spec):
            if role == "control":
                node["widgets_values"].append("fixed")
            elif role == "upload":
                node["widgets_values"].append("image")
            else:
                kind, options = wt.input_spec(spec, role_name)
                if role_name in widgets:
                    value = widgets.pop(role_name)
                elif "default" in options:
                    value = options["default"]
                elif isinstance(kind, list):
                    value = kind[0]
                else:
                    raise ValueError(f"{node_type}.{role_name} needs a value")
                node["widgets_values"].append(value)
        if widgets:
            raise ValueError(f"{node_type}: unknown widgets {sorted(widgets)}")
        for slot, (out_type, out_name) in enumerate(zip(spec["output"], spec["output_name"])):
            node["outputs"].append({"name": out_name, "type": out_type, "links": [], "slot_index": slot})
        self.nodes.append(node)
        return node

    def link(self, src: dict, out_name: str, dst: dict, in_name: str) -> None:
        """Connect src's output ``out_name`` to dst's input ``in_name`` (a widget input becomes a socket)."""
        out_slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == out_name)
        out_type = src["outputs"][out_slot]["type"]
        slot = next((i for i, e in enumerate(dst["inputs"]) if e["name"] == in_name), None)
        if slot is None:  # a widget converted to an input: the frontend adds a socket with a widget ref
            kind, _ = wt.input_spec(self.info[dst["type"]], in_name)
            dst["inputs"].append({"name": in_name, "type": kind, "widget": {"name": in_name}, "link": None})
            slot = len(dst["inputs"]) - 1
        link_id = len(self.links) + 1
        dst["inputs"][slot]["link"] = link_id
        src["outputs"][out_slot]["links"].append(link_id)
        self.links.append([link_id, src["id"], out_slot, dst["id"], slot, out_type])

    def to_ui(self) -> dict:
        """The UI-format workflow, with a group titled after the task around all nodes."""
        xs = [n["pos"][0] for n in self.nodes]
        ys = [n["pos"][1] for n in self.nodes]
        x2 = max(n["pos"][0] + n["size"][0] for n in self.nodes)
        y2 = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        return {
            # The frontend's schema wants a string id (a null id raises "Invalid workflow" alerts).
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"lumina-mgpt2/{self.title}")), "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links,
            "groups": [{"id": 1, "title": self.title, "bounding": [min(xs) - 20, min(ys) - 60,
                                                                   x2 - min(xs) + 40, y2 - min(ys) + 80],
                        "color": "#3f789e", "font_size": 24, "flags": {}}],
            "config": {}, "extra": {"ds": self.view, "info": {"title": self.title}},
            "version": 0.4,
        }


DEMO_CAN = ("The demo (Loader: demo) is a 3.6 M-parameter model of coloured shapes, built into the pack: no "
            "download, a few seconds on a CPU. It knows t2i, control_canny and dense_canny at 64 px panels (64x64, "
            "or 64x128 for two panels) and prompts of the form 'a blue square in the bottom right' or 'a red "
            "circle above a green triangle' (colours red, orange, yellow, green, blue, purple; shapes circle, "
            "square, triangle; in the center / top left / top right / bottom left / bottom right; above, below, "
            "to the left of, to the right of). It cannot draw anything else: other prompts and other tasks run "
            "but give noise.")


def note_text(title: str, settings: list[str], demo: str) -> str:
    """The Read-me note: what to set, how to try it on the demo, what the demo can and cannot do."""
    lines = [f"Lumina-mGPT 2.0: {title}", "",
             "Model files go in ComfyUI/models/lumina_mgpt2/<name>/ (config.json, model*.safetensors, "
             "tokenizer.json, tokenizer_config.json, movqgan_270M.ckpt), or turn on auto_download in the Loader "
             "(about 15 GB for the 7B in bf16; int8/int4 quantization for smaller GPUs).", "", "What to set:"]
    lines += [f"- {s}" for s in settings]
    lines += ["", "Sizes and sampling settings left at 0 / 'model default' come from the model (768x768 or "
              "512x1024, cfg 4, top_k 4096 for the released model); type a value to override. Dual-panel tasks "
              "give the FULL size (two panels stacked). The composer's resolution picker lists the sizes that fit "
              "the connected model.", "", "Try it on the demo: " + demo, "", DEMO_CAN]
    return "\n".join(lines)


# Frame of the saved view: the canvas area the frontend shows below its menus, in screen pixels.
VIEW_WIDTH, VIEW_HEIGHT, VIEW_MARGIN = 1500, 760, 40


def framing(nodes: list[dict]) -> dict:
    """The saved view (extra.ds) that shows every node, title bars included, when the workflow opens."""
    title_bar = 40
    x1 = min(n["pos"][0] for n in nodes) - 30
    y1 = min(n["pos"][1] for n in nodes) - title_bar - 70  # the group's title above the nodes
    x2 = max(n["pos"][0] + n["size"][0] for n in nodes) + 30
    y2 = max(n["pos"][1] + n["size"][1] for n in nodes) + 30
    scale = round(min((VIEW_WIDTH - 2 * VIEW_MARGIN) / (x2 - x1), (VIEW_HEIGHT - 2 * VIEW_MARGIN) / (y2 - y1)), 3)
    # The frontend draws graph point p at (p + offset) * scale.
    return {"scale": scale, "offset": [round(VIEW_MARGIN / scale - x1), round(VIEW_MARGIN / scale - y1)]}


def build(info: dict, task: str, title: str, settings: list[str], prompt: str, demo: str, *,
          image: str | None = None, canny: bool = False, think: bool = False, best_of: int = 0,
          lora: str | None = None) -> Graph:
    """One workflow: Loader -> (ThinkPrompt) -> Composer (<- LoadImage) -> Sampler -> VQDecode -> outputs.

    With `lora` (a lora_name), a LoRA node sits between the Loader and the Sampler: the sampler draws
    with the adapted model; the composer (sizes) and the decoder (MoVQGAN) read the Loader's pipe,
    which the adapter does not change.
    Sizes and sampling settings stay at "model default", so the same file runs on the 7B and the demo.
    """
    g = Graph(info, title)
    x = 0
    g.add("Note", {"text": note_text(title, settings, demo)}, pos=(x - 620, -420), size=(580, 560),
          title=f"Read me: {title}")
    loader = g.add("LuminaMGPT2Loader", {"model": MODEL}, pos=(x, 0), size=(340, 180))
    source = None
    if image:
        load = g.add("LoadImage", {"image": image}, pos=(x, 260), size=(320, 340),
                     title="Load control map" if task.startswith("control") else "Load reference image")
        source = (load, "IMAGE")
        if canny:
            edges = g.add("Canny", {}, pos=(x + 360, 420), size=(300, 110))
            g.link(load, "IMAGE", edges, "image")
            source = (edges, "IMAGE")
    think_node = None
    if think:
        think_node = g.add("LuminaMGPT2ThinkPrompt", {"prompt": prompt}, pos=(x + 360, -420), size=(360, 260))
        reasoning = g.add("PreviewAny", {}, pos=(x + 760, -420), size=(320, 200), title="Reasoning")
        g.link(think_node, "reasoning", reasoning, "source")
    composer = g.add("LuminaMGPT2DualPanelComposer", {"task": task, "prompt": prompt}, pos=(x + 720, 0),
                     size=(380, 400), title=f"Composer: {title}")
    g.link(loader, "pipe", composer, "pipe")
    if think_node is not None:
        g.link(think_node, "prompt", composer, "prompt")
    if source is not None:
        g.link(source[0], source[1], composer, "image")
    sampler_pipe = (loader, "pipe")
    if lora is not None:
        lora_node = g.add("LuminaMGPT2LoRA", {"lora_name": lora}, pos=(x, 260), size=(340, 130))
        g.link(loader, "pipe", lora_node, "pipe")
        sampler_pipe = (lora_node, "pipe")
    sampler = g.add("LuminaMGPT2ARSamplerSJD", {"batch_size": max(1, best_of)}, pos=(x + 1140, 0),
                    size=(320, 400))
    g.link(sampler_pipe[0], sampler_pipe[1], sampler, "pipe")
    g.link(composer, "request", sampler, "request")
    decode = g.add("LuminaMGPT2VQDecode", {}, pos=(x + 1500, 0), size=(260, 120))
    g.link(loader, "pipe", decode, "pipe")
    g.link(sampler, "codes", decode, "codes")
    prefix = f"lumina_mgpt2/{task}"
    if best_of:
        best_spec = info["LuminaMGPT2VerifierBestOfN"]
        best_inputs = [n for section in best_spec["input_order"].values() for n in section]
        reads_request = "codes" in best_inputs or "request" in best_inputs
        # The prompt is typed once: the verifier reads it from the request when it can.
        best = g.add("LuminaMGPT2VerifierBestOfN", {} if reads_request else {"prompt": prompt},
                     pos=(x + 1800, 0), size=(340, 300))
        g.link(decode, "image", best, "images")
        if "request" in best_inputs:
            g.link(composer, "request", best, "request")
        save = g.add("SaveImage", {"filename_prefix": prefix}, pos=(x + 2180, 0), size=(360, 400),
                     title="Best image")
        g.link(best, "best", save, "images")
        ranked = g.add("PreviewImage", {}, pos=(x + 2180, 440), size=(360, 400), title="All candidates, best first")
        g.link(best, "sorted", ranked, "images")
        scores = g.add("PreviewAny", {}, pos=(x + 1800, 340), size=(340, 260), title="Scores")
        g.link(best, "scores", scores, "source")
    else:
        save = g.add("SaveImage", {"filename_prefix": prefix}, pos=(x + 1800, 0), size=(360, 420),
                     title="Full image (both panels)" if task != "t2i" else "Image")
        g.link(decode, "image", save, "images")
        if task != "t2i":
            lower = g.add("PreviewImage", {}, pos=(x + 1800, 460), size=(360, 300),
                          title="Lower panel" + (" (condition map)" if task.startswith(("pair", "dense")) else
                                                 " (result)"))
            g.link(decode, "lower_panel", lower, "images")
            upper = g.add("PreviewImage", {}, pos=(x + 2200, 460), size=(360, 300), title="Upper panel")
            g.link(decode, "upper_panel", upper, "images")
    g.view = framing(g.nodes)
    return g


# The LoRA workflow on the demo uses the adapter the pack ships (lumina_core/assets/demo_loras/, which the
# node lists after models/loras): bench/lora_demo.py trained it (rank 8, 1,500 steps, 8.4 CPU minutes).
DEMO_LORA_FOLDER = "demo_bar"
DEMO_LORA = f"{DEMO_LORA_FOLDER}/adapter_model.safetensors"
LORA_DEMO_NOTE = (
    f"switch the Loader to demo and queue as it is: the LoRA node is set to {DEMO_LORA}, the adapter shipped "
    f"with the pack (lumina_core/assets/demo_loras/{DEMO_LORA_FOLDER}/, nothing to copy; listed after the files "
    "of models/loras). bench/lora_demo.py trained it (rank 8, 1,500 steps in 8.4 CPU minutes) to teach the demo a "
    "shape it never saw, a bar (a flat rectangle): the prompt asks for one; compare strength 1 with 0 (no bar), "
    "or try another colour and position. Your own "
    "adapter file goes in ComfyUI/models/loras (or models/lumina_mgpt2/loras); on the 7B pick one trained for "
    "the 7B (the demo's adapter is refused there: another base).")

# Prompts the demo draws right most of the time (and the 7B draws too).
DEMO_T2I_PROMPT = "a blue square in the bottom right"
# The shipped demo adapter's lesson: drawn as a bar in 8 of 8 checked images with it (strength 1), in none without.
DEMO_LORA_PROMPT = "a blue bar in the bottom left"
DEMO_PANEL_PROMPT = "a green circle in the top left"


def catalogue(info: dict) -> dict[str, Graph]:
    """Every shipped workflow, by file stem."""
    common = ["Loader: pick the model (or enable auto_download); demo needs nothing.",
              "Sampler: seed; SJD on for speed; cfg, top_k and guidance at 0 / model default use the model's own "
              "(official schedule: guidance stays at 4.0 or more inside the image; constant: cfg as set)."]
    demo_runs_only = ("switch the Loader to demo and queue: it runs, but this task is not one the demo was trained "
                      "on, so the image is noise (the sampler shows a warning). Use the t2i, control_canny or "
                      "dense_canny workflow to see the demo draw.")
    out: dict[str, Graph] = {}
    title = wt.WORKFLOW_TITLES
    out["t2i"] = build(info, "t2i", title["t2i"],
                       common + ["Composer: write the prompt; model default size (768x768 on the released model)."],
                       DEMO_T2I_PROMPT,
                       "switch the Loader to demo and queue as it is: the prompt is one the demo knows, so it "
                       "draws a blue square in the bottom right (64x64). Change colour, shape or position.")
    out["t2i_think_best_of_n"] = build(
        info, "t2i", title["t2i_think_best_of_n"],
        common + ["ThinkPrompt: endpoint + model of an OpenAI-compatible API (key from OPENAI_API_KEY or the key "
                  "file, never here); off = pass the prompt through.",
                  "Sampler batch_size = N candidates; Verifier-BestOfN keeps the best (verifier weights in "
                  "models/lumina_mgpt2/verifiers/ or auto_download)."],
        DEMO_T2I_PROMPT,
        "switch the Loader to demo, set ThinkPrompt to pass through (an LLM's long prompt is beyond the demo) and "
        "the verifier to demo_check (the demo's pixel checker): it keeps the best of 4 shapes images.",
        think=True, best_of=4)
    out["t2i_lora"] = build(
        info, "t2i", title["t2i_lora"],
        common + ["LoRA: pick the adapter (a peft-format adapter_model.safetensors, alone or in its folder with "
                  "adapter_config.json, in ComfyUI/models/loras or models/lumina_mgpt2/loras; made by "
                  "`python -m lumina_core.train fit --lora` + `train export`) and its strength (0 = off). Chain "
                  "more LoRA nodes to stack adapters; removing the node or changing the strength needs no "
                  "reload. An adapter made for another base model is refused, with the module named.",
                  "Composer: write the prompt (the adapter's words, if it was trained on some)."],
        DEMO_LORA_PROMPT, LORA_DEMO_NOTE, lora=DEMO_LORA)
    for cond in ("depth", "canny", "hed", "openpose"):
        out[f"pair_{cond}"] = build(
            info, f"pair_{cond}", title[f"pair_{cond}"],
            common + [f"Composer: the prompt describes the image; the model draws it in the upper panel and its "
                      f"{CONDITION_WORDS[cond]} in the lower panel."],
            "A cozy reading corner with an armchair, a floor lamp and a bookshelf, soft afternoon light.",
            demo_runs_only)
    out["subject"] = build(
        info, "subject", title["subject"],
        common + ["Load the subject's photo (upper panel); the prompt says where to put it."],
        "The object standing on a wooden table in a sunlit kitchen.", demo_runs_only, image=EXAMPLE_IMAGE)
    out["edit"] = build(
        info, "edit", title["edit"],
        common + ["Load the photo to edit (upper panel); the prompt is the edit instruction (paper-style "
                  "template: the official code has no edit string)."],
        "Make it a snowy winter evening.", demo_runs_only, image=EXAMPLE_IMAGE)
    for cond in ("canny", "depth", "pose", "hed"):
        settings = common + (["LoadImage: any photo; the core Canny node makes the edge map (tune its thresholds)."]
                             if cond == "canny" else
                             [f"LoadImage: a {CONDITION_WORDS[cond]} (e.g. from a preprocessor pack such as "
                              f"comfyui_controlnet_aux); it fills the upper panel."])
        demo = ("switch the Loader to demo: it paints the lower panel from the edge map and the prompt. It learned "
                "white-on-black edge maps of simple shapes with lines about 4 px wide: load such a 64x64 map and "
                "connect it straight to the composer (Canny's 1 px lines are too thin for it); the prompt names "
                "the shapes, e.g. 'a green circle in the top left'." if cond == "canny" else demo_runs_only)
        out[f"control_{cond}"] = build(
            info, f"control_{cond}", title[f"control_{cond}"], settings,
            DEMO_PANEL_PROMPT if cond == "canny" else
            "A futuristic city street at night with neon signs and rain reflections.", demo,
            image=EXAMPLE_IMAGE, canny=(cond == "canny"))
    for cond in ("depth", "canny", "hed", "pose"):
        demo = ("switch the Loader to demo: it draws the edge map of the upper panel. It learned 64x64 pictures of "
                "one or two coloured shapes on a light background: load one (the prompt may name the shapes) and "
                "the lower panel shows its edges." if cond == "canny" else demo_runs_only)
        out[f"dense_{cond}"] = build(
            info, f"dense_{cond}", title[f"dense_{cond}"],
            common + [f"LoadImage: the photo (upper panel); the lower panel becomes its {CONDITION_WORDS[cond]}.",
                      "The prompt can stay short or describe the photo."],
            DEMO_PANEL_PROMPT if cond == "canny" else "A photo.", demo, image=EXAMPLE_IMAGE)
    return out


def main() -> int:
    info = wt.object_info()
    UI_DIR.mkdir(exist_ok=True)
    API_DIR.mkdir(parents=True, exist_ok=True)
    for stem, graph in catalogue(info).items():
        ui = graph.to_ui()
        name = wt.workflow_name(stem)
        (UI_DIR / name).write_text(json.dumps(ui, indent=1) + "\n")
        (API_DIR / name).write_text(json.dumps(wt.ui_to_api(ui, info), indent=1) + "\n")
        print("wrote", stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
