"""End-to-end in a real ComfyUI server on CPU (marker ``comfyui``; runs only when COMFYUI_PATH is set).

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/comfy/venv/bin/python] \
        python -m pytest -m comfyui tests/test_comfyui_server.py

The server starts with ``--cpu`` in a temporary base directory holding a tiny official-format
checkpoint as ``models/lumina_mgpt2/Lumina-mGPT-2.0`` (the folder name of the official repo, so the
workflows run as shipped), ComfyUI's example.png as the input image, and this repository linked as a
custom node. Every API twin of workflows/ is queued with only its sizes shrunk (tiny model, CPU),
ThinkPrompt pointed at a closed local port (it falls back to the prompt) and best-of-N set to the
pixel verifier; each must finish with a saved image. Progress, previews and cancel are watched on the
websocket.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "tests" / "workflows_api"
COMFYUI = os.environ.get("COMFYUI_PATH", "")
if not COMFYUI:
    pytest.skip("COMFYUI_PATH is not set (a ComfyUI checkout to run the workflows in)", allow_module_level=True)


def _load_clients():
    """tests/browser_cdp.py (WebSocket, CDP, free_port): tests/ is no package, so load it by path."""
    spec = importlib.util.spec_from_file_location("browser_cdp", REPO / "tests" / "browser_cdp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


clients = _load_clients()
_wt_spec = importlib.util.spec_from_file_location("workflow_tools", REPO / "tests" / "workflow_tools.py")
wt = importlib.util.module_from_spec(_wt_spec)
_wt_spec.loader.exec_module(wt)
# Set to write each workflow's thumbnail (workflows/<name>.jpg) from its run on the demo.
WRITE_THUMBNAILS = os.environ.get("LUMINA_WRITE_THUMBNAILS", "") == "1"
THUMBNAIL_SIDE = 256

DEMO_CAPTION = "a red circle in the top left"


class Server:
    """A ComfyUI server process with a tiny base directory, and a small HTTP client for it."""

    def __init__(self, base: Path):
        self.base = base
        self.port = clients.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        self.log = open(base / "server.log", "w")
        self.process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-api-nodes",
             "--base-directory", str(base), "--preview-method", "auto"],
            cwd=COMFYUI, stdout=self.log, stderr=subprocess.STDOUT,
            # Previews from the first rows on: a fast CPU run would otherwise finish before the
            # sampler's first-preview delay and send none.
            env={**os.environ, "HF_HUB_OFFLINE": "1", "LUMINA_MGPT2_PREVIEW_FIRST_AFTER_S": "0"})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.read_log()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                text = r.read()
                return r.status, (json.loads(text) if text else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict, client_id: str = "") -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        assert status == 200, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish; log:\n{self.read_log()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sys.path.insert(0, str(REPO))
    from lumina_core.testing.checkpoints import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "input", "output", "models/lumina_mgpt2"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.symlink(REPO, base / "custom_nodes" / "lumina_mgpt2")
    write_tiny_checkpoint(base / "models" / "lumina_mgpt2" / "Lumina-mGPT-2.0", words=DEMO_CAPTION)
    # An adapter in ComfyUI's own models/loras for the LoRA workflow on the tiny stand-in of the 7B (on the
    # demo it runs with the adapter the pack ships).
    from lumina_core.testing.adapters import write_random_adapter

    write_random_adapter(base / "models" / "loras" / TINY_LORA.split("/")[0],
                         base / "models" / "lumina_mgpt2" / "Lumina-mGPT-2.0", std=0.05)
    shutil.copy(Path(COMFYUI) / "input" / "example.png", base / "input" / "example.png")
    srv = Server(base)
    yield srv
    srv.stop()


TINY_LORA = "tiny_lumina/adapter_model.safetensors"            # written by the server fixture


def shrink(prompt: dict) -> dict:
    """Tiny sizes for the tiny model on CPU; nothing else changes except offline stand-ins (and its adapter)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LuminaMGPT2LoRA":
            inputs["lora_name"] = TINY_LORA
        if node["class_type"] == "LuminaMGPT2DualPanelComposer":
            dual = inputs["task"] != "t2i"
            inputs["width"], inputs["height"] = (32, 64) if dual else (32, 32)
        if node["class_type"] == "LuminaMGPT2ARSamplerSJD":
            inputs["top_k"] = 16
        if node["class_type"] == "LuminaMGPT2ThinkPrompt":
            inputs["endpoint"] = f"http://127.0.0.1:{clients.free_port()}/v1"  # nothing listens: falls back
        if node["class_type"] == "LuminaMGPT2VerifierBestOfN":
            inputs["verifiers"], inputs["prompt"] = "demo_check", DEMO_CAPTION
    return prompt


def test_server_lists_the_pack(server):
    info = server.get("/object_info")
    ours = sorted(k for k in info if k.startswith("LuminaMGPT2"))
    assert len(ours) == 7
    models = info["LuminaMGPT2Loader"]["input"]["required"]["model"][0]
    assert models[0] == "Lumina-mGPT-2.0" and "Alpha-VLLM/Lumina-mGPT-2.0" in models
    assert "lumina_mgpt2" in server.get("/models")
    assert "lumina_mgpt2.js" in json.dumps(server.get("/extensions"))
    assert "lumina_mgpt2" in server.get("/workflow_templates")


@pytest.mark.parametrize("name", sorted(p.name for p in API_DIR.glob("*.json")))
def test_workflow_runs_to_an_image(server, name):
    prompt = shrink(json.loads((API_DIR / name).read_text()))
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    saved = [img for node_id, out in entry["outputs"].items() if prompt[node_id]["class_type"] == "SaveImage"
             for img in out.get("images", [])]
    assert saved, entry["outputs"]
    for image in saved:
        path = server.base / "output" / image["subfolder"] / image["filename"]
        assert path.is_file() and path.stat().st_size > 0


def test_progress_previews_and_cancel(server):
    prompt = json.loads((API_DIR / wt.workflow_name("t2i")).read_text())
    composer = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2DualPanelComposer")
    composer["inputs"]["width"], composer["inputs"]["height"] = 64, 256   # 32 rows
    sampler_id = next(k for k, n in prompt.items() if n["class_type"] == "LuminaMGPT2ARSamplerSJD")
    prompt[sampler_id]["inputs"]["top_k"] = 16
    client = uuid.uuid4().hex
    ws = clients.WebSocket("127.0.0.1", server.port, f"/ws?clientId={client}", timeout=60)
    try:
        # Full run: progress once per row, previews as binary frames.
        prompt_id = server.queue(prompt, client)
        rows, previews = [], 0
        while True:
            opcode, data = ws.receive()
            if opcode == 2:
                previews += 1
                continue
            event = json.loads(data)
            data_ = event.get("data", {})
            if data_.get("prompt_id") not in (None, prompt_id):
                continue
            if event["type"] == "progress" and data_.get("node") == sampler_id:
                rows.append(data_["value"])
                assert data_["max"] == 32
            if event["type"] == "executing" and data_.get("node") is None:
                break
            if event["type"] in ("execution_error", "execution_interrupted"):
                pytest.fail(json.dumps(event))
        assert rows[-1] == 32 and len(set(rows)) >= 30
        assert previews >= 1

        # Cancel: another seed, interrupt after a few rows; the sampler stops within a row.
        prompt[sampler_id]["inputs"]["seed"] = 1
        prompt_id = server.queue(prompt, client)
        seen_after_interrupt, interrupted_at = [], None
        while True:
            opcode, data = ws.receive()
            if opcode == 2:
                continue
            event = json.loads(data)
            data_ = event.get("data", {})
            if event["type"] == "progress" and data_.get("node") == sampler_id:
                if interrupted_at is None and data_["value"] >= 4:
                    interrupted_at = data_["value"]
                    server.post("/interrupt", {})
                elif interrupted_at is not None:
                    seen_after_interrupt.append(data_["value"])
            if event["type"] == "execution_interrupted":
                break
            if event["type"] == "executing" and data_.get("node") is None and data_.get("prompt_id") == prompt_id:
                pytest.fail("the run finished although it was cancelled")
        assert interrupted_at is not None and len(seen_after_interrupt) <= 1
        entry = server.wait(prompt_id)
        assert entry["status"]["status_str"] == "error"
        # "Unload models" hands the weights back to ComfyUI; the next run loads them again and succeeds.
        assert server.post("/free", {"unload_models": True})[0] == 200
        time.sleep(1)
        again = server.wait(server.queue(shrink(json.loads((API_DIR / wt.workflow_name("t2i")).read_text()))))
        assert again["status"]["status_str"] == "success", again["status"]
    finally:
        ws.close()


def test_prompt_saved_before_the_guidance_widget_still_runs(server):
    prompt = shrink(json.loads((API_DIR / wt.workflow_name("t2i")).read_text()))
    sampler = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2ARSamplerSJD")
    del sampler["inputs"]["guidance"]
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    sampler["inputs"]["guidance"] = "linear"
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 400 and "value_not_in_list" in json.dumps(body)


def test_bad_inputs_are_refused_with_reasons(server):
    prompt = shrink(json.loads((API_DIR / wt.workflow_name("t2i")).read_text()))
    loader = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2Loader")
    for evil in ("../../etc", "/etc/passwd", "evil/Lumina-mGPT-2.0"):
        loader["inputs"]["model"] = evil
        status, body = server.post("/prompt", {"prompt": prompt})
        assert status == 400 and "value_not_in_list" in json.dumps(body)
    composer = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2DualPanelComposer")
    loader["inputs"]["model"] = "Alpha-VLLM/Lumina-mGPT-2.0"
    # ComfyUI's own min/max refuse impossible sizes at queue time, each listed once.
    for width, kind in ((-32, "value_smaller_than_min"), (4096, "value_bigger_than_max")):
        composer["inputs"]["width"] = width
        status, body = server.post("/prompt", {"prompt": prompt})
        assert status == 400 and kind in json.dumps(body), body
        errors = [e for node in body["node_errors"].values() for e in node["errors"]]
        assert len(errors) == 1, errors
    # Off the grid: refused when the composer runs, with the nearest valid sizes.
    composer["inputs"]["width"] = 33
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error" and "nearest valid widths: 32 or 64" in json.dumps(
        entry["status"]["messages"])
    # A model that is not there: the error names the folder and the files to place.
    composer["inputs"]["width"] = 32
    loader["inputs"]["model"] = "Alpha-VLLM/Lumina-mGPT-2.0-Omni"
    entry = server.wait(server.queue(prompt))
    text = json.dumps(entry["status"]["messages"])
    assert entry["status"]["status_str"] == "error"
    assert "lumina_mgpt2" in text and "Lumina-mGPT-2.0-Omni" in text and "config.json" in text
    assert "movqgan_270M.ckpt" in text


DEMO_MODEL = REPO / "lumina_core" / "assets" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the embedded demo is not built")


def on_demo(name: str) -> dict:
    """A shipped workflow's API twin with the Loader on demo; nothing else changes but the offline stand-ins."""
    prompt = json.loads((API_DIR / name).read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LuminaMGPT2Loader":
            inputs["model"] = "demo"
        if node["class_type"] == "LuminaMGPT2ThinkPrompt":
            inputs["endpoint"] = f"http://127.0.0.1:{clients.free_port()}/v1"  # nothing listens: falls back
        if node["class_type"] == "LuminaMGPT2VerifierBestOfN":
            inputs["verifiers"] = "demo_check"  # as its Note says for the demo (the others need weights)
    return prompt


def saved_images(server: Server, prompt: dict, entry: dict) -> list:
    """The SaveImage outputs of a finished prompt as uint8 arrays [H, W, 3], in batch order."""
    import numpy as np
    from PIL import Image

    files = [img for node_id, out in entry["outputs"].items() if prompt[node_id]["class_type"] == "SaveImage"
             for img in out.get("images", [])]
    paths = sorted(server.base / "output" / f["subfolder"] / f["filename"] for f in files)
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


@needs_demo
@pytest.mark.parametrize("name", sorted(p.name for p in API_DIR.glob("*.json")))
def test_every_workflow_runs_on_the_demo_unchanged(server, name):
    """Model-default sizes and sampling: the 7B's workflow runs on the demo with only the Loader switched."""
    prompt = on_demo(name)
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    task = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2DualPanelComposer")["inputs"]["task"]
    images = saved_images(server, prompt, entry)
    assert images and all(im.shape == ((64, 64, 3) if task == "t2i" else (128, 64, 3)) for im in images)
    shown = json.dumps(entry["outputs"])
    assert "cfg 1.5 (constant guidance), top_k 50" in shown  # the sampler shows the settings it used
    if task not in ("t2i", "control_canny", "dense_canny"):
        assert "warning: this model lists only the tasks t2i, control_canny, dense_canny" in shown
    if WRITE_THUMBNAILS:
        write_thumbnail(images[0], REPO / "workflows" / (name[:-len(".json")] + ".jpg"))


def write_thumbnail(image, path: Path) -> None:
    """A square JPEG of a result: scaled up without smoothing (the demo's pixels stay crisp), centred."""
    from PIL import Image

    picture = Image.fromarray(image)
    scale = THUMBNAIL_SIDE // max(picture.size)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE), (32, 32, 32))
    canvas.paste(picture, ((THUMBNAIL_SIDE - picture.width) // 2, (THUMBNAIL_SIDE - picture.height) // 2))
    canvas.save(path, format="JPEG", quality=90)


@needs_demo
@pytest.mark.parametrize("task", ["t2i", "control_canny", "dense_canny"])
def test_the_demo_draws_what_the_prompt_asks(server, task):
    """The demo in the shipped t2i / control_canny / dense_canny workflows: right shapes (or edges), from pixels."""
    import numpy as np
    from PIL import Image
    from lumina_core.demo import checker, data

    prompt = on_demo(wt.workflow_name(task))
    composer = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2DualPanelComposer")
    caption = data.parse_caption(composer["inputs"]["prompt"])  # the workflow's own prompt
    photo = data.render(caption, np.random.default_rng(7), background="white")
    edges = data.edge_map(photo)
    # The demo learned its own pictures: the shapes photo (dense) or its ~4 px edge map (control; ComfyUI's
    # Canny draws 1 px lines, so the map is loaded as it is and the Canny node is left out).
    Image.fromarray(edges if task == "control_canny" else photo).save(server.base / "input" / f"demo_{task}.png")
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = f"demo_{task}.png"
            composer["inputs"]["image"] = [node_id, 0]
        if node["class_type"] == "Canny":
            del prompt[node_id]
        if node["class_type"] == "LuminaMGPT2ARSamplerSJD":
            node["inputs"]["batch_size"] = 4
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    images = saved_images(server, prompt, entry)
    assert len(images) == 4
    if WRITE_THUMBNAILS:  # the demo's own pictures show these three workflows best
        write_thumbnail(images[0], REPO / "workflows" / wt.workflow_name(task).replace(".json", ".jpg"))
    if task == "dense_canny":
        f1 = [checker.edge_f1(im[64:], edges) for im in images]
        assert np.mean(f1) > 0.5, f1  # another image's map scores about 0.25
    else:
        # t2i: the whole image; control_canny: the lower panel, drawn from the edge map and the caption.
        right = [checker.check_image(im[-64:], caption).ok for im in images]
        assert sum(right) >= 3, (task, right)  # a random image passes about 3 % of the time


@needs_demo
def test_the_lora_workflow_teaches_the_demo_a_bar(server):
    """The shipped LoRA workflow on the demo, with the pack's demo adapter: bars at strength 1, none at 0."""
    from lumina_core.demo import checker, data
    from lumina_core.lora import BUILTIN_LORA_DIR

    prompt = on_demo(wt.workflow_name("t2i_lora"))
    lora_node = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2LoRA")
    assert (BUILTIN_LORA_DIR / lora_node["inputs"]["lora_name"]).is_file()   # the shipped one, as the Note says
    composer = next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2DualPanelComposer")
    caption = data.parse_caption(composer["inputs"]["prompt"])
    assert caption.first.shape == "bar"
    next(n for n in prompt.values() if n["class_type"] == "LuminaMGPT2ARSamplerSJD")["inputs"]["batch_size"] = 8
    bars = {}
    for strength in (1.0, 0.0):
        lora_node["inputs"]["strength"] = strength
        entry = server.wait(server.queue(prompt))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
        images = saved_images(server, prompt, entry)
        assert len(images) == 8
        bars[strength] = sum(checker.check_image(im, caption).ok_with_shape for im in images)
    assert bars[1.0] >= 3 and bars[0.0] == 0, bars


UI_DIR = REPO / "workflows"
SCREENSHOT = os.environ.get("LUMINA_SCREENSHOT", "")


def test_browser_loads_every_workflow_and_the_picker_sets_sizes(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    process, cdp = clients.launch(chromium)
    try:
        # A returning user: no first-visit templates dialog over the canvas.
        server.post("/settings/Comfy.TutorialCompleted", True)
        cdp.call("Page.navigate", url=server.url)
        deadline = time.time() + 120
        while not cdp.evaluate("!!(window.app && window.app.graph && window.luminaMGPT2 && "
                               "window.LiteGraph && LiteGraph.registered_node_types['LuminaMGPT2Loader'])"):
            assert time.time() < deadline, cdp.errors()
            time.sleep(1)
        info = server.get("/object_info")

        def declared(class_type):
            spec = info[class_type]["input"]
            return {**spec.get("required", {}), **spec.get("optional", {})}

        boot_errors = cdp.errors()
        cdp.events.clear()
        for path in sorted(UI_DIR.glob("*.json")):
            workflow = path.read_text()
            result = cdp.evaluate(f"""(async () => {{
                const wf = {workflow};
                await app.loadGraphData(wf, true, true, {json.dumps(path.stem)});
                const nodes = app.graph._nodes;
                const unknown = nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
                const out = (await app.graphToPrompt()).output;
                await new Promise(r => setTimeout(r, 300));
                const alerts = [...document.querySelectorAll(".p-toast-message")].map(e => e.textContent);
                document.querySelectorAll(".p-toast-close-button").forEach(b => b.click());
                return {{count: nodes.length, unknown, prompt: out, alerts}};
            }})()""")
            assert result["unknown"] == [] and result["alerts"] == [], (path.name, result["alerts"])
            assert result["count"] == len(json.loads(workflow)["nodes"]), path.name
            twin = json.loads((API_DIR / path.name).read_text())
            strip = lambda p: {k: {"class_type": v["class_type"],  # frontend-only widgets (PreviewAny's) left out
                                   "inputs": {n: x for n, x in v["inputs"].items() if n in declared(v["class_type"])}}
                               for k, v in p.items()}
            assert strip(result["prompt"]) == strip(twin), path.name  # our converter == the frontend's
        assert cdp.errors() == [], cdp.errors()

        # The resolution picker writes the size widgets (t2i, then a dual-panel task).
        picked = cdp.evaluate("""(async () => {
            const res = [];
            for (const task of ["t2i", "dense_depth"]) {
              const node = app.graph._nodes.find(n => n.type === "LuminaMGPT2DualPanelComposer");
              const w = name => node.widgets.find(x => x.name === name);
              w("task").value = task; w("task").callback?.(task);
              const picker = w("resolution");
              const label = picker.options.values.find(v => / · ≈?(4:3|3:4) · /.test(v));
              if (!label) return {error: JSON.stringify({values: picker.options.values, type: picker.type})};
              picker.value = label; picker.callback(label);
              const after = {width: w("width").value, height: w("height").value, tokens: w("resolution").value};
              w("width").value = 100; w("width").callback(100);   // snapped to the 32 px grid
              res.push({task, label, ...after, snapped: w("width").value, choices: picker.options.values.length});
            }
            return res;
        })()""")
        assert "error" not in picked, picked
        for p in picked:
            width, height = (int(v) for v in p["label"].split(" ")[0].split("×"))
            assert (p["width"], p["height"]) == (width, height), p
            assert p["tokens"].startswith(f"{width}×{height}") and p["snapped"] == 96 and p["choices"] > 10, p
            assert p["width"] % 32 == 0 and p["height"] % (64 if p["task"] != "t2i" else 32) == 0
        assert "dual panel" in picked[1]["tokens"] and "two " in picked[1]["label"]

        # The alert check can fail: the frontend's schema refuses a null workflow id with a toast.
        broken = json.loads((UI_DIR / wt.workflow_name("t2i")).read_text())
        broken["id"] = None
        alerts = cdp.evaluate(f"""(async () => {{
            await app.loadGraphData({json.dumps(broken)}, true, true, "broken");
            await new Promise(r => setTimeout(r, 300));
            const alerts = [...document.querySelectorAll(".p-toast-message")].map(e => e.textContent);
            document.querySelectorAll(".p-toast-close-button").forEach(b => b.click());
            return alerts;
        }})()""")
        assert any("Invalid workflow" in a for a in alerts), alerts

        # Run the ThinkPrompt + best-of-N workflow from the browser (tiny sizes, offline stand-ins), then
        # look for the final prompt, the score badges and the images on the nodes.
        closed_port = clients.free_port()
        cdp.evaluate(f"""(async () => {{
            await app.loadGraphData({(UI_DIR / wt.workflow_name('t2i_think_best_of_n')).read_text()}, true, true, "shot");
            const set = (type, name, value) => {{
              const node = app.graph._nodes.find(n => n.type === type);
              const w = node.widgets.find(x => x.name === name); w.value = value; w.callback?.(value);
            }};
            set("LuminaMGPT2DualPanelComposer", "width", 64); set("LuminaMGPT2DualPanelComposer", "height", 64);
            set("LuminaMGPT2ARSamplerSJD", "top_k", 16);
            set("LuminaMGPT2ThinkPrompt", "endpoint", "http://127.0.0.1:{closed_port}/v1");
            set("LuminaMGPT2ThinkPrompt", "prompt", {json.dumps(DEMO_CAPTION)});
            set("LuminaMGPT2VerifierBestOfN", "verifiers", "demo_check");
            set("LuminaMGPT2VerifierBestOfN", "prompt", {json.dumps(DEMO_CAPTION)});
            await app.queuePrompt(0, 1);
        }})()""")
        deadline = time.time() + 300
        while True:
            queue = server.get("/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                break
            assert time.time() < deadline, "the browser's run did not finish"
            time.sleep(1)
        time.sleep(2)
        shown = cdp.evaluate("""(() => ({
            badges: [...document.querySelectorAll(".lumina-mgpt2-badge")].map(b => b.textContent),
            panels: [...document.querySelectorAll(".lumina-mgpt2-panel")].map(p => p.textContent),
        }))()""")
        assert len(shown["badges"]) == 4 and shown["badges"][0].startswith("#1 · img "), shown
        assert any("Generate an image of 64x64" in p for p in shown["panels"]), shown
        cdp.evaluate("(() => { app.canvas.ds.scale = 0.6; app.canvas.ds.offset = [420, 620]; "
                     "app.canvas.setDirty(true, true); })()")
        time.sleep(2)
        shot = cdp.call("Page.captureScreenshot", format="png")["data"]
        target = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "lumina_nodes.png"
        target.write_bytes(base64.b64decode(shot))
        assert target.stat().st_size > 10000
        assert cdp.errors() == [], cdp.errors()
        print("boot console errors (not from the pack):", [e for e in boot_errors if "lumina" not in e.lower()])
        assert not [e for e in boot_errors if "lumina" in e.lower()], boot_errors
    finally:
        process.kill()


def test_templates_dialog_shows_every_workflow_with_its_thumbnail(server, tmp_path):
    """The frontend's Templates dialog lists the pack's workflows by title, each with its .jpg (no grey 404s)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    listed = server.get("/workflow_templates")["lumina_mgpt2"]
    assert sorted(listed) == sorted(p.stem for p in UI_DIR.glob("*.json"))
    process, cdp = clients.launch(chromium)
    try:
        server.post("/settings/Comfy.TutorialCompleted", True)
        cdp.call("Page.navigate", url=server.url)
        deadline = time.time() + 120
        while not cdp.evaluate("!!(window.app && window.app.extensionManager && window.luminaMGPT2)"):
            assert time.time() < deadline, cdp.errors()
            time.sleep(1)
        cdp.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        deadline = time.time() + 60
        while not cdp.evaluate("[...document.querySelectorAll('*')].some(e => e.children.length === 0 && "
                               "e.textContent.trim() === 'lumina_mgpt2')"):
            assert time.time() < deadline, "the templates dialog shows no lumina_mgpt2 entry"
            time.sleep(1)
        cdp.evaluate("[...document.querySelectorAll('*')].filter(e => e.children.length === 0 && "
                     "e.textContent.trim() === 'lumina_mgpt2').pop().click()")
        time.sleep(5)  # the cards' images load lazily
        shown = cdp.evaluate("""(() => ({
            images: [...document.querySelectorAll('img')].map(i => ({src: decodeURIComponent(i.currentSrc || i.src),
                                                                     ok: i.complete && i.naturalWidth > 0})),
            text: document.body.innerText}))()""")
        shot = cdp.call("Page.captureScreenshot", format="png")["data"]
        target = Path(SCREENSHOT).with_name("templates.png") if SCREENSHOT else tmp_path / "templates.png"
        target.write_bytes(base64.b64decode(shot))
        # The dialog fetches each thumbnail and shows it from a blob: every card in view has a decoded picture
        # (a missing .jpg leaves a grey placeholder instead).
        thumbnails = [i for i in shown["images"] if i["src"].startswith("blob:")]
        assert len(thumbnails) >= 4 and all(i["ok"] for i in thumbnails), shown["images"]
        assert sum(name in shown["text"] for name in listed) >= 4, shown["text"][:2000]  # titles, not stems
        # Every card's thumbnail is served (the dialog asks /workflow_templates/<pack>/<name>.jpg).
        for name in listed:
            url = f"{server.url}/api/workflow_templates/lumina_mgpt2/{urllib.parse.quote(name)}.jpg"
            with urllib.request.urlopen(url, timeout=30) as reply:
                assert reply.status == 200 and reply.headers["Content-Type"] == "image/jpeg", name
    finally:
        process.kill()
