"""Workflow files: only our and core nodes, links join matching types, widget values fit, every task covered."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("workflow_tools", HERE / "workflow_tools.py")
wt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wt)

UI_FILES = sorted((wt.REPO / "workflows").glob("*.json"))
API_DIR = wt.REPO / "tests" / "workflows_api"

# Every task the issue lists, and the composer task key that realises it.
REQUIRED_TASKS = {
    "text-to-image": "t2i",
    "image pair depth": "pair_depth", "image pair canny": "pair_canny", "image pair hed": "pair_hed",
    "image pair openpose": "pair_openpose",
    "subject-driven": "subject", "image editing": "edit",
    "control canny": "control_canny", "control depth": "control_depth", "control pose": "control_pose",
    "control hed": "control_hed",
    "dense depth": "dense_depth", "dense canny": "dense_canny", "dense hed": "dense_hed", "dense pose": "dense_pose",
}


@pytest.fixture(scope="module")
def info() -> dict:
    return wt.object_info()


@pytest.fixture(scope="module")
def allowed(info) -> set[str]:
    core = set(json.loads(wt.CORE_OBJECT_INFO.read_text())["nodes"])
    return core | set(wt.import_pack().NODE_CLASS_MAPPINGS)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_workflows_and_twins():
    assert len(UI_FILES) >= 16
    for path in UI_FILES:
        assert (API_DIR / path.name).is_file(), f"no API twin for {path.name}"


def test_every_workflow_has_a_thumbnail_and_a_title_for_a_name():
    """The Templates dialog shows the file name and the same-named .jpg (made from a run on the demo)."""
    from PIL import Image

    for path in UI_FILES:
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"no thumbnail for {path.name}"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.size == (256, 256)
            assert len(set(image.convert("L").getdata())) > 8  # a picture, not a blank
        assert path.stem == load(path)["extra"]["info"]["title"]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_valid(path, info, allowed):
    workflow = load(path)
    assert wt.validate_ui(workflow, info, allowed) == []


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_is_the_conversion_of_the_ui_file(path, info):
    assert load(API_DIR / path.name) == wt.ui_to_api(load(path), info)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_names_its_task_and_has_a_note(path):
    workflow = load(path)
    composers = [n for n in workflow["nodes"] if n["type"] == "LuminaMGPT2DualPanelComposer"]
    assert len(composers) == 1
    task_title = workflow["extra"]["info"]["title"]
    assert workflow["groups"][0]["title"] == task_title
    assert task_title in composers[0]["title"]
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and "What to set" in notes[0]["widgets_values"][0] and task_title in notes[0]["title"]
    # Something is saved: the graph has an output node.
    assert any(n["type"] == "SaveImage" for n in workflow["nodes"])


def test_every_task_has_a_workflow():
    tasks = {}
    for path in UI_FILES:
        for node in load(path)["nodes"]:
            if node["type"] == "LuminaMGPT2DualPanelComposer":
                tasks.setdefault(node["widgets_values"][0], []).append(path.name)
    missing = {label: key for label, key in REQUIRED_TASKS.items() if key not in tasks}
    assert not missing, f"tasks without a workflow: {missing}"


def test_think_and_best_of_n_workflow_exists():
    kinds = [{n["type"] for n in load(p)["nodes"]} for p in UI_FILES]
    assert any({"LuminaMGPT2ThinkPrompt", "LuminaMGPT2VerifierBestOfN"} <= k for k in kinds)


def test_workflows_use_model_defaults_that_fit_the_7b_and_the_demo(info):
    """Sizes and sampling at "model default" (so one file runs on both), resolved sizes within each budget."""
    from lumina_core.defaults import ModelDefaults
    from lumina_core.request import DEFAULT_MAX_POSITIONS, size_problem

    demo = ModelDefaults.from_folder(wt.REPO / "lumina_core" / "assets" / "demo")
    for path in UI_FILES:
        api = load(API_DIR / path.name)
        by_type = {n["class_type"]: n for n in api.values()}
        composer, sampler = by_type["LuminaMGPT2DualPanelComposer"], by_type["LuminaMGPT2ARSamplerSJD"]
        inputs = composer["inputs"]
        assert (inputs["width"], inputs["height"]) == (0, 0), path.name
        assert (sampler["inputs"]["cfg"], sampler["inputs"]["top_k"], sampler["inputs"]["guidance"]) == \
            (0.0, 0, "model default"), path.name
        loader_id = next(k for k, n in api.items() if n["class_type"] == "LuminaMGPT2Loader")
        assert inputs["pipe"] == [loader_id, 0], path.name  # the composer resolves sizes from the model
        task = inputs["task"]
        for defaults, budget, prompt_tokens in ((ModelDefaults.official(), DEFAULT_MAX_POSITIONS, 300),
                                                (demo, 256, 60)):
            width, height = defaults.size(task)
            assert size_problem(task, width, height, budget, prompt_tokens) is None, (path.name, defaults.source)
        needs_image = task.split("_")[0] in ("subject", "edit", "control", "dense")
        assert ("image" in inputs) == needs_image, path.name


def test_saved_view_frames_the_whole_graph():
    """extra.ds shows every node (Note and group title included) in a 1500x760 canvas when the file opens."""
    for path in UI_FILES:
        workflow = load(path)
        ds = workflow["extra"]["ds"]
        for node in workflow["nodes"]:
            x, y = node["pos"]
            w, h = node["size"]
            left, top = (x + ds["offset"][0]) * ds["scale"], (y - 40 + ds["offset"][1]) * ds["scale"]
            right, bottom = (x + w + ds["offset"][0]) * ds["scale"], (y + h + ds["offset"][1]) * ds["scale"]
            assert 0 <= left and right <= 1500 and 0 <= top and bottom <= 760, (path.name, node["type"])
        group = workflow["groups"][0]["bounding"]
        assert (group[1] + ds["offset"][1]) * ds["scale"] >= 0, path.name


def test_every_note_says_how_to_try_the_demo():
    for path in UI_FILES:
        note = next(n for n in load(path)["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "Try it on the demo:" in note and "It cannot draw anything else" in note, path.name
        assert "t2i, control_canny and dense_canny" in note, path.name


def test_validator_catches_broken_files(info, allowed):
    """The checks above can fail: a type-mismatched link, a bad widget value and a foreign node are reported."""
    workflow = load(wt.REPO / "workflows" / wt.workflow_name("t2i"))
    by_type = {n["type"]: n for n in workflow["nodes"]}
    # codes -> images of SaveImage: LUMINA_CODES into IMAGE
    sampler, save = by_type["LuminaMGPT2ARSamplerSJD"], by_type["SaveImage"]
    link_id = save["inputs"][0]["link"]
    link = next(l for l in workflow["links"] if l[0] == link_id)
    link[1], link[2], link[5] = sampler["id"], 0, "LUMINA_CODES"
    sampler["outputs"][0]["links"].append(link_id)
    by_type["LuminaMGPT2DualPanelComposer"]["widgets_values"][1] = 99999  # width over max
    workflow["nodes"].append({"id": 99, "type": "SomeoneElsesNode", "inputs": [], "outputs": []})
    problems = "\n".join(wt.validate_ui(workflow, info, allowed))
    assert "LUMINA_CODES -> SaveImage.images (IMAGE)" in problems
    assert "widget width: 99999 > max" in problems
    assert "SomeoneElsesNode" in problems


def test_sampler_workflows_saved_before_guidance_still_line_up(info):
    """A sampler saved without the guidance widget keeps its other values in place and queues without it."""
    workflow = load(wt.REPO / "workflows" / wt.workflow_name("t2i"))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "LuminaMGPT2ARSamplerSJD")
    assert sampler["widgets_values"][-2:] == ["model default", "auto"]  # guidance, then kv_cache (added later)
    current = wt.ui_to_api(workflow, info)[str(sampler["id"])]["inputs"]
    sampler["widgets_values"] = sampler["widgets_values"][:-2]  # the old file: without both
    old = wt.ui_to_api(workflow, info)[str(sampler["id"])]["inputs"]
    later = ("guidance", "kv_cache")
    assert not set(later) & set(old) and old == {k: v for k, v in current.items() if k not in later}
    assert "guidance" not in info["LuminaMGPT2ARSamplerSJD"]["input"]["required"]  # optional: no validation error


def test_lora_workflow_puts_the_lora_node_between_loader_and_sampler():
    """Loader -> LoRA -> Sampler; the composer (sizes) and the decoder read the Loader's pipe; the Note names the folder."""
    api = load(API_DIR / wt.workflow_name("t2i_lora"))
    by_type = {n["class_type"]: (k, n) for k, n in api.items()}
    loader_id, _ = by_type["LuminaMGPT2Loader"]
    lora_id, lora = by_type["LuminaMGPT2LoRA"]
    assert lora["inputs"]["pipe"] == [loader_id, 0] and lora["inputs"]["strength"] == 1.0
    assert by_type["LuminaMGPT2ARSamplerSJD"][1]["inputs"]["pipe"] == [lora_id, 0]
    assert by_type["LuminaMGPT2VQDecode"][1]["inputs"]["pipe"] == [loader_id, 0]
    ui = load(wt.REPO / "workflows" / wt.workflow_name("t2i_lora"))
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "models/loras" in note and "adapter_model.safetensors" in note
