"""The web extension takes every size rule from Python: its picker equals request.size_choices, no constant retyped."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("workflow_tools", HERE / "workflow_tools.py")
wt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wt)

SCRIPT = wt.REPO / "web" / "lumina_mgpt2.js"


def test_the_extension_retypes_no_size_rule():
    source = SCRIPT.read_text()
    code = "\n".join(line.split("//")[0] for line in source.splitlines())  # comments may name things
    assert "t2i" not in code  # the dual-panel flag per task comes from Python
    numbers = {int(n) for n in re.findall(r"(?<![\w.])\d+(?![\w.])", code)}
    # Layout numbers (pixels of a panel, colours) are fine; the grid, the code size, the header and the
    # budgets are not (the picker and the token counts come from Python).
    assert not numbers & {8, 32, 64, 256, 10240}, numbers & {8, 32, 64, 256, 10240}


@pytest.fixture(scope="module")
def run_js(tmp_path_factory):
    """Import the extension in Node with a stand-in for ComfyUI's app.js; return a runner of JS snippets."""
    node = shutil.which("node")
    if not node:
        pytest.skip("no Node.js on PATH")
    root = tmp_path_factory.mktemp("web")
    (root / "scripts").mkdir()
    (root / "scripts" / "app.js").write_text("export const app = { registerExtension() {}, graph: null };\n")
    (root / "extensions" / "pack").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "extensions" / "pack" / "lumina_mgpt2.mjs")
    (root / "scripts" / "package.json").write_text('{"type": "module"}')

    def run(body: str, **values) -> object:
        script = ("globalThis.window = {}; globalThis.document = {};\n"
                  f"const m = await import({json.dumps((root / 'extensions' / 'pack' / 'lumina_mgpt2.mjs').as_uri())});\n"
                  + "".join(f"const {k} = {json.dumps(v)};\n" for k, v in values.items())
                  + f"console.log(JSON.stringify(await (async () => {{ {body} }})()));")
        out = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return run


def test_picker_lists_exactly_the_python_sizes_per_model(run_js):
    from lumina_core.defaults import ModelDefaults
    from lumina_core.request import size_choices

    pack = wt.import_pack()
    sizes = pack.NODE_CLASS_MAPPINGS["LuminaMGPT2DualPanelComposer"].INPUT_TYPES()["required"]["task"][1]["lumina"]
    models = {"demo": {"max_positions": 256, "defaults": ModelDefaults.from_folder(
        wt.REPO / "lumina_core" / "assets" / "demo").to_dict()}}
    got = run_js("""m.setMetadata(sizes, models);
        return {t2i_demo: m.resolutionChoices("t2i", {name: "demo", ...models.demo}),
                dual_official: m.resolutionChoices("dense_canny", null),
                dual: ["t2i", "edit", "control_canny"].map(m.isDualPanel)};""", sizes=sizes, models=models)
    assert [(c["width"], c["height"], c["tokens"]) for c in got["t2i_demo"]] == \
        [(c["width"], c["height"], c["tokens"]) for c in size_choices(False, 256)]
    assert [(c["width"], c["height"]) for c in got["dual_official"]] == \
        [(c["width"], c["height"]) for c in size_choices(True, 10240)]
    assert got["dual"] == [False, True, True]
    assert got["dual_official"][0]["label"].startswith(f"{got['dual_official'][0]['width']}×")
