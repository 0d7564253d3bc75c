"""Workflow-file tooling for tests and the workflow builder: object_info of our nodes, widget order, UI -> API.

Loaded by path from the tests (tests/ is not a package). The UI -> API conversion follows what the
ComfyUI frontend's ``graphToPrompt()`` does for plain graphs (no subgraphs, no muted nodes).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CORE_OBJECT_INFO = REPO / "tests" / "fixtures" / "comfyui_core_object_info.json"
# Frontend-only nodes: they never reach the server and carry no inputs.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PACK_MODULE = REPO.as_posix().replace(".", "_x_")

# Each workflow's file name is its title: ComfyUI 0.8's Templates dialog lists a pack's workflows by
# file name (and shows the same-named .jpg beside it), so the name is what a user reads there.
WORKFLOW_TITLES = {
    "t2i": "Text to image",
    "t2i_think_best_of_n": "Text to image with ThinkPrompt and best-of-N",
    "t2i_lora": "Text to image with a LoRA",
    "pair_depth": "Image pair from text - depth map", "pair_canny": "Image pair from text - canny edge map",
    "pair_hed": "Image pair from text - HED edge map", "pair_openpose": "Image pair from text - OpenPose map",
    "subject": "Subject-driven generation", "edit": "Image editing",
    "control_canny": "Controllable generation - canny edge map",
    "control_depth": "Controllable generation - depth map",
    "control_pose": "Controllable generation - pose map", "control_hed": "Controllable generation - HED edge map",
    "dense_depth": "Dense prediction - depth map", "dense_canny": "Dense prediction - canny edge map",
    "dense_hed": "Dense prediction - HED edge map", "dense_pose": "Dense prediction - pose map",
}


def workflow_name(stem: str) -> str:
    """File name (title + .json) of the shipped workflow ``stem`` (a task key, t2i_think_best_of_n or t2i_lora)."""
    return f"{WORKFLOW_TITLES.get(stem, stem)}.json"


def import_pack() -> Any:
    """Import the repository as ComfyUI does: a package under a mangled absolute-path name."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]
        raise
    return module


def node_info(node_id: str, cls: type, display_name: str = "") -> dict:
    """One node's /object_info entry, built the way ComfyUI's server builds it."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {section: list(values) for section, values in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": node_id,
        "display_name": display_name or node_id,
        "category": cls.CATEGORY,
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def object_info() -> dict:
    """Core nodes (recorded from ComfyUI 0.8.0) plus the pack's nodes."""
    nodes = dict(json.loads(CORE_OBJECT_INFO.read_text())["nodes"])
    pack = import_pack()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        nodes[node_id] = node_info(node_id, cls, pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, ""))
    return nodes


def input_spec(info: dict, name: str) -> tuple[Any, dict]:
    """(type, options) of a node input; type is a list for combos."""
    for section in ("required", "optional"):
        entry = info["input"].get(section, {}).get(name)
        if entry is not None:
            return entry[0], (entry[1] if len(entry) > 1 else {})
    raise KeyError(name)


def is_widget(kind: Any, options: dict) -> bool:
    """True when the frontend draws this input as a widget (it then has a value in widgets_values)."""
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(info: dict) -> list[tuple[str, str]]:
    """(input name | '', role) for each entry of widgets_values, in the frontend's order.

    role 'value' = the input's value; 'control' = the control_after_generate combo after a seed;
    'upload' = LoadImage's upload button value.
    """
    slots = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            kind, options = input_spec(info, name)
            if not is_widget(kind, options):
                continue
            slots.append((name, "value"))
            if options.get("control_after_generate"):
                slots.append((name, "control"))
            if options.get("image_upload"):
                slots.append((name, "upload"))
    return slots


def link_table(workflow: dict) -> dict[int, list]:
    """link id -> [id, origin_id, origin_slot, target_id, target_slot, type]."""
    table = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link["type"]]
        table[link[0]] = link
    return table


def ui_to_api(workflow: dict, info: dict) -> dict:
    """Convert a UI-format workflow to the API prompt the frontend would queue."""
    links = link_table(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        spec = info[node["type"]]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        for (name, role), value in zip(widget_slots(spec), values):
            if role == "value":
                inputs[name] = value
        for entry in node.get("inputs", []):
            link_id = entry.get("link")
            if link_id is not None:
                link = links[link_id]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or spec.get("display_name") or node["type"]}}
    return prompt


def types_match(output_type: str, input_type: Any) -> bool:
    """ComfyUI's link rule: equal type strings, '*' on either side, or a comma-separated union."""
    if isinstance(input_type, list):
        input_type = "COMBO"
    if output_type == "*" or input_type == "*":
        return True
    return bool(set(output_type.split(",")) & set(str(input_type).split(",")))


def value_problem(kind: Any, options: dict, value: Any) -> str | None:
    """Why a widget value does not fit its input (type, range, combo list), or None."""
    if isinstance(kind, list):
        return None if value in kind else f"{value!r} not in {kind}"
    if kind == "COMBO":
        choices = options.get("options", [])
        return None if value in choices else f"{value!r} not in {choices}"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an int"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{value!r} is not a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if "min" in options and value < options["min"]:
        return f"{value} < min {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value} > max {options['max']}"
    return None


def validate_ui(workflow: dict, info: dict, allowed_types: set[str]) -> list[str]:
    """Every problem of a UI workflow: unknown nodes, bad links, type mismatches, widget values that do not fit."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = link_table(workflow)
    for node in workflow["nodes"]:
        kind = node["type"]
        where = f"node {node['id']} ({kind})"
        if kind in VIRTUAL_NODES:
            continue
        if kind not in allowed_types:
            problems.append(f"{where}: not a core or Lumina node")
            continue
        spec = info[kind]
        slots = widget_slots(spec)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values for {len(slots)} widgets {slots}")
        for (name, role), value in zip(slots, values):
            if role == "control" and value not in ("fixed", "increment", "decrement", "randomize"):
                problems.append(f"{where}: control_after_generate value {value!r}")
            if role != "value":
                continue
            k, options = input_spec(spec, name)
            problem = value_problem(k, options, value)
            if problem:
                problems.append(f"{where}: widget {name}: {problem}")
        linked = set()
        for slot, entry in enumerate(node.get("inputs", [])):
            if entry.get("link") is None:
                continue
            linked.add(entry["name"])
            link = links.get(entry["link"])
            if link is None:
                problems.append(f"{where}: input {entry['name']} names missing link {entry['link']}")
                continue
            if link[3] != node["id"] or link[4] != slot:
                problems.append(f"{where}: link {link[0]} targets {link[3]}:{link[4]}, not this input slot {slot}")
        required = spec["input"].get("required", {})
        for name, entry in required.items():
            k, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if not is_widget(k, options) and name not in linked:
                problems.append(f"{where}: required input {name} ({k}) is not connected")
    for link in links.values():
        link_id, origin, origin_slot, target, target_slot, link_type = link
        if origin not in nodes or target not in nodes:
            problems.append(f"link {link_id}: joins missing node {origin} or {target}")
            continue
        src, dst = nodes[origin], nodes[target]
        if src["type"] in VIRTUAL_NODES or dst["type"] in VIRTUAL_NODES:
            problems.append(f"link {link_id}: joins a frontend-only node")
            continue
        out_types = info[src["type"]]["output"]
        if origin_slot >= len(out_types):
            problems.append(f"link {link_id}: {src['type']} has no output {origin_slot}")
            continue
        target_input = dst["inputs"][target_slot] if target_slot < len(dst.get("inputs", [])) else None
        if target_input is None:
            problems.append(f"link {link_id}: {dst['type']} has no input slot {target_slot}")
            continue
        in_type, _ = input_spec(info[dst["type"]], target_input["name"])
        if not types_match(out_types[origin_slot], in_type):
            problems.append(f"link {link_id}: {src['type']} output {out_types[origin_slot]} -> "
                            f"{dst['type']}.{target_input['name']} ({in_type})")
        if link_type != out_types[origin_slot]:
            problems.append(f"link {link_id}: recorded type {link_type} differs from output {out_types[origin_slot]}")
        out_entry = src["outputs"][origin_slot]
        if link_id not in (out_entry.get("links") or []):
            problems.append(f"link {link_id}: not listed on {src['type']} output {origin_slot}")
    return problems
