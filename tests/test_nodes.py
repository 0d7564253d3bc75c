"""The pack as ComfyUI sees it, without ComfyUI: import by path, six nodes, their contracts, and each node's work."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("workflow_tools", HERE / "workflow_tools.py")
wt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wt)

NODE_IDS = ["LuminaMGPT2Loader", "LuminaMGPT2LoRA", "LuminaMGPT2ThinkPrompt", "LuminaMGPT2DualPanelComposer",
            "LuminaMGPT2ARSamplerSJD", "LuminaMGPT2VQDecode", "LuminaMGPT2VerifierBestOfN"]
KNOWN_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "LUMINA_PIPE", "LUMINA_REQUEST", "LUMINA_CODES"}


@pytest.fixture(scope="module")
def pack():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    return wt.import_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def test_imports_like_comfyui_and_lists_six_nodes(pack):
    assert list(pack.NODE_CLASS_MAPPINGS) == NODE_IDS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_IDS)
    assert pack.WEB_DIRECTORY == "./web"
    assert (wt.REPO / "web").is_dir()
    # Relative imports only: the core comes in under the mangled package name, ComfyUI stays absent.
    assert f"{wt.PACK_MODULE}.lumina_core.request" in sys.modules
    assert "comfy" not in sys.modules


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_contract(nodes, node_id):
    cls = nodes[node_id]
    assert node_id.startswith("LuminaMGPT2") and cls.CATEGORY == "Lumina-mGPT 2.0"
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            assert isinstance(kind, list) and kind or kind in KNOWN_TYPES, (name, kind)
            options = entry[1] if len(entry) > 1 else {}
            if isinstance(kind, list):
                assert options.get("default", kind[0]) in kind
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], name
    assert all(t in KNOWN_TYPES for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls(), cls.FUNCTION))
    # The docs page the frontend shows for the node exists.
    assert (wt.REPO / "web" / "docs" / f"{node_id}.md").is_file()


def test_sampler_seed_has_control_after_generate(nodes):
    seed = nodes["LuminaMGPT2ARSamplerSJD"].INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is True and seed["max"] == 2**64 - 1


def test_sampler_guidance_is_the_last_widget_and_optional(nodes):
    info = wt.node_info("LuminaMGPT2ARSamplerSJD", nodes["LuminaMGPT2ARSamplerSJD"])
    # Last, so widgets_values of workflows saved before it still line up; optional, so their API
    # prompts (without it) still pass ComfyUI's validation.
    # kv_cache came after it, for the same reason.
    assert wt.widget_slots(info)[-2:] == [("guidance", "value"), ("kv_cache", "value")]
    assert info["input"]["optional"]["kv_cache"][0] == ["auto", "bf16", "fp8"]
    kind, options = info["input"]["optional"]["guidance"]
    assert kind == ["model default", "official", "constant"] and options["default"] == "model default"
    assert "4.0" in options["tooltip"] and "constant" in options["tooltip"]


def test_loader_dropdown_lists_local_folders_official_repos_and_the_demo(pack, nodes, tmp_path, monkeypatch):
    (tmp_path / "my-finetune").mkdir()
    (tmp_path / "my-finetune" / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    monkeypatch.setenv("LUMINA_MGPT2_MODELS", str(tmp_path))
    choices = nodes["LuminaMGPT2Loader"].INPUT_TYPES()["required"]["model"][0]
    assert choices[0] == "my-finetune" and "not-a-model" not in choices
    assert "Alpha-VLLM/Lumina-mGPT-2.0" in choices and "Alpha-VLLM/Lumina-mGPT-2.0-Omni" in choices
    # The built-in demo comes after the local folders and the official repos, and the loader accepts it.
    assert choices[-1] == "demo" and choices.index("demo") > choices.index("Alpha-VLLM/Lumina-mGPT-2.0")
    loader = sys.modules[f"{wt.PACK_MODULE}.nodes.loader"]
    assert loader.checked_model_name(" demo ") == "demo"


# --- composer ---------------------------------------------------------------------------------

def comfy_image(width, height, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, 3, generator=g)


def test_composer_t2i(pack):
    out = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 768, 512, "a red fox", "official")
    request, final_prompt = out["result"]
    assert (request.width, request.height, request.task) == (768, 512, "t2i")
    assert final_prompt == "Generate an image of 768x512 according to the following prompt:\na red fox"
    assert out["ui"]["text"][0] == final_prompt


def test_composer_control_center_crops_any_image_size(pack):
    composer = node(pack, "LuminaMGPT2DualPanelComposer")
    request, prompt = composer.compose("control_canny", 256, 512, "a house", "official",
                                       image=comfy_image(300, 170))["result"]
    assert request.reference.size == (300, 170)
    assert request.reference_image().size == (256, 256)  # official center crop to the upper panel
    assert "<upper half> displays a <canny edge map>" in prompt and "256x512" in prompt


def test_composer_refuses_with_reasons(pack):
    composer = node(pack, "LuminaMGPT2DualPanelComposer")
    Error = sys.modules[f"{wt.PACK_MODULE}.nodes.common"].NodeInputError
    with pytest.raises(Error, match="needs an IMAGE"):
        composer.compose("edit", 512, 1024, "make it snow", "official")
    with pytest.raises(Error, match="multiple of 64"):
        composer.compose("dense_depth", 512, 992, "", "official", image=comfy_image(64, 64))
    with pytest.raises(Error, match="needs subject_description"):
        composer.compose("subject", 512, 1024, "on a table", "paper", image=comfy_image(64, 64))


def test_size_widgets_are_checked_by_comfyui_itself(nodes):
    """min/max/step on the size widgets: ComfyUI refuses 0 x -32 or 4096 x 32 at validation, once per input."""
    composer = nodes["LuminaMGPT2DualPanelComposer"]
    spec = composer.INPUT_TYPES()["required"]
    for name in ("width", "height"):
        options = spec[name][1]
        assert (options["min"], options["max"], options["step"], options["default"]) == (0, 2048, 32, 0)
        assert "0 = the model's default" in options["tooltip"]
    # No VALIDATE_INPUTS: naming an input there turns off ComfyUI's own min/max check for it and
    # lists its error once per named input (the same size error showed 4 times).
    assert not hasattr(composer, "VALIDATE_INPUTS")


def test_every_widget_has_a_tooltip(nodes):
    for node_id, cls in nodes.items():
        if node_id == "LuminaMGPT2VerifierBestOfN":  # the batch helper's node
            continue
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                options = entry[1] if len(entry) > 1 else {}
                assert options.get("tooltip"), (node_id, name)


# --- loader safety ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc", "/etc/passwd", "..", "a/../../b", "C:\\models\\x", "x/y/z",
                                  "evil-org/Lumina-mGPT-2.0", "./local"])
def test_loader_refuses_names_that_leave_the_folder_or_foreign_repos(pack, name, tmp_path, monkeypatch):
    monkeypatch.setenv("LUMINA_MGPT2_MODELS", str(tmp_path))
    loader = node(pack, "LuminaMGPT2Loader")
    Error = sys.modules[f"{wt.PACK_MODULE}.nodes.common"].NodeInputError
    with pytest.raises(Error, match="unsafe or invalid model name|not an official"):
        loader.load(name, False, "auto", "none", False)


def test_loader_missing_model_names_folder_and_files(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("LUMINA_MGPT2_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    loader = node(pack, "LuminaMGPT2Loader")
    with pytest.raises(FileNotFoundError) as info:
        loader.load("Alpha-VLLM/Lumina-mGPT-2.0", False, "auto", "none", False)
    message = str(info.value)
    assert str(tmp_path / "Lumina-mGPT-2.0") in message
    assert "config.json" in message and "model.safetensors" in message and "tokenizer.json" in message


# --- bridge outside ComfyUI -------------------------------------------------------------------

def test_bridge_degrades_to_no_ops(pack):
    bridge = sys.modules[f"{wt.PACK_MODULE}.nodes.comfy_bridge"]
    assert not bridge.in_comfyui()
    assert bridge.torch_device() == torch.device("cpu") and bridge.auto_dtype(torch.device("cpu")) == torch.float32
    assert bridge.interrupted() is False
    progress = bridge.Progress(10)
    progress.update(3)
    progress.update(5, preview=object())
    assert (progress.value, progress.updates, progress.previews) == (5, 2, 1)


def test_preview_policy_keeps_previews_within_budget(pack):
    sampler = sys.modules[f"{wt.PACK_MODULE}.nodes.sampler"]
    now = [0.0]
    policy = sampler.PreviewPolicy(budget=0.05, every_rows=2, clock=lambda: now[0])
    made = 0
    for row in range(1, 97):
        now[0] += 1.0                       # one second of generation per row
        if policy.due(row):
            cost = 0.02 * row               # decoding grows with the rows decoded
            now[0] += cost
            policy.record(row, cost)
            made += 1
    assert made >= 6                        # previews keep coming ...
    assert policy.share <= 0.05 + 1e-9      # ... within the budget


# --- best-of-N (pixel verifier, no weights) ---------------------------------------------------

def test_best_of_n_picks_the_matching_image(pack):
    from lumina_core.demo.data import parse_caption, render

    caption = "a red circle in the top left"
    rng = np.random.default_rng(0)
    right = render(parse_caption(caption), rng)
    wrong = [render(parse_caption(c), rng) for c in ("a blue square in the bottom right",
                                                      "a green triangle in the center")]
    batch = torch.from_numpy(np.stack([wrong[0], right, wrong[1]]).astype(np.float32) / 255.0)
    out = node(pack, "LuminaMGPT2VerifierBestOfN").select(batch, caption, "demo_check", "", "rank", False, True)
    best, ranked, text = out["result"]
    assert best.shape == (1, *batch.shape[1:]) and torch.equal(best[0], batch[1])
    assert torch.equal(ranked[0], batch[1]) and ranked.shape == batch.shape
    table = json.loads(text)
    assert table["best_index"] == 1 and table["candidates"][0]["place"] == 1
    assert out["ui"]["lumina_scores"][0]["index"] == 1


def test_best_of_n_weights_are_checked(pack):
    best_of_n = sys.modules[f"{wt.PACK_MODULE}.nodes.best_of_n"]
    assert best_of_n.parse_weights("pickscore=2, aesthetic=0.5", ["pickscore", "aesthetic"]) == \
        {"pickscore": 2.0, "aesthetic": 0.5}
    with pytest.raises(ValueError, match="not among"):
        best_of_n.parse_weights("vqascore=1", ["pickscore"])
    with pytest.raises(ValueError, match="name=number"):
        best_of_n.parse_weights("pickscore", ["pickscore"])


# --- think prompt -----------------------------------------------------------------------------

def test_think_prompt_off_passes_through_and_bad_endpoint_is_refused(pack):
    think = node(pack, "LuminaMGPT2ThinkPrompt")
    assert think.think("a cat", False, "", "gpt-4o")["result"] == ("a cat", "")
    with pytest.raises(ValueError, match="http"):
        think.think("a cat", True, "file:///etc/passwd", "gpt-4o")


# --- the chain on a tiny official-format checkpoint --------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from lumina_core.testing.checkpoints import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(root / "tiny", words="a red fox house on hill")
    # Linear inputs of 128 and 256 features: int4 groups of 128 fit.
    write_tiny_checkpoint(root / "tiny128", words="a red fox", hidden_size=128, intermediate_size=256,
                          num_heads=2, init_std=0.1)
    patch = pytest.MonkeyPatch()
    patch.setenv("LUMINA_MGPT2_MODELS", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def tiny_pipe(pack, tiny_models):
    pipe, = node(pack, "LuminaMGPT2Loader").load("tiny", False, "auto", "none", False)
    return pipe


def run_sampler(pack, *args):
    """The sampler node's codes output (its ui text aside)."""
    return node(pack, "LuminaMGPT2ARSamplerSJD").sample(*args)["result"][0]


def assert_comfy_image(image, batch, height, width):
    assert image.shape == (batch, height, width, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_loader_builds_a_pipeline_on_cpu(tiny_pipe, pack):
    assert "tiny" in pack.NODE_CLASS_MAPPINGS["LuminaMGPT2Loader"].INPUT_TYPES()["required"]["model"][0]
    assert tiny_pipe.device == torch.device("cpu") and tiny_pipe.dtype == torch.float32
    assert tiny_pipe.movqgan is not None and tiny_pipe.tokenizer is not None


@pytest.mark.slow
def test_t2i_chain_outputs_comfy_images(pack, tiny_pipe):
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 64, 32, "a red fox", "official")["result"]
    codes = run_sampler(pack, tiny_pipe, request, 7, 4.0, 16, 1.0, False, 16, 2)
    assert codes.codes.shape == (2, 4, 8) and codes.seeds == [7, 8]
    image, upper, lower = node(pack, "LuminaMGPT2VQDecode").decode(tiny_pipe, codes)
    assert_comfy_image(image, 2, 32, 64)
    assert torch.equal(upper, image) and torch.equal(lower, image)  # single panel: both are the full image
    again = run_sampler(pack, tiny_pipe, request, 7, 4.0, 16, 1.0, False, 16, 2)
    assert torch.equal(again.codes, codes.codes)  # the seed decides


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_loader_runs_the_node_chain(pack, tiny_models, quantization):
    from torch import nn

    pipe, = node(pack, "LuminaMGPT2Loader").load("tiny128", False, "auto", quantization, False)
    assert pipe.quant == quantization
    linear = pipe.transformer.model.layers[0].mlp.down_proj
    assert isinstance(linear, nn.Linear) and type(linear.weight) is not nn.Parameter  # a torchao tensor
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 32, 32, "a red fox", "official")["result"]
    codes = run_sampler(pack, pipe, request, 3, 2.0, 16, 1.0, True, 4, 1)
    assert codes.codes.shape == (1, 4, 4)
    image, _, _ = node(pack, "LuminaMGPT2VQDecode").decode(pipe, codes)
    assert_comfy_image(image, 1, 32, 32)


def test_dual_panel_chain_splits_panels_and_keeps_the_reference(pack, tiny_pipe):
    reference = comfy_image(70, 50)  # any size: center-cropped to the 64x64 upper panel
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose(
        "control_canny", 64, 128, "a house", "official", image=reference)["result"]
    codes = run_sampler(pack, tiny_pipe, request, 0, 4.0, 16, 1.0, True, 4, 1)
    assert codes.codes.shape == (1, 16, 8)
    expected_upper = tiny_pipe.movqgan.encode(request.reference_pixels())[0]
    assert torch.equal(codes.codes[0, :8], expected_upper)  # the given panel is the prefix, not sampled
    image, upper, lower = node(pack, "LuminaMGPT2VQDecode").decode(tiny_pipe, codes)
    assert_comfy_image(image, 1, 128, 64)
    assert_comfy_image(upper, 1, 64, 64)
    assert torch.equal(torch.cat([upper, lower], dim=1), image)


@pytest.mark.slow
def test_sampler_guidance_reaches_the_sampling(pack, tiny_pipe, monkeypatch):
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 32, 32, "a red fox", "official")["result"]
    sampler = node(pack, "LuminaMGPT2ARSamplerSJD")
    used = []
    generate = tiny_pipe.generate
    monkeypatch.setattr(tiny_pipe, "generate", lambda req, sampling, **kw: (used.append(sampling),
                                                                             generate(req, sampling, **kw))[1])

    def codes(cfg, *guidance):
        return sampler.sample(tiny_pipe, request, 5, cfg, 16, 1.0, False, 16, 1, *guidance)["result"][0].codes

    saved_before_guidance = codes(2.0)  # a prompt without the widget: the model's default (official here)
    assert used[-1].guidance == "official"
    constant_low = codes(2.0, "constant")
    assert (used[-1].guidance, used[-1].cfg) == ("constant", 2.0)
    # The official schedule lifts cfg 2 to 4.0 at every image token: the same as constant 4.0.
    assert torch.equal(saved_before_guidance, codes(4.0, "constant"))
    assert not torch.equal(constant_low, saved_before_guidance)  # constant 2 really is weaker
    with pytest.raises(sys.modules[f"{wt.PACK_MODULE}.nodes.common"].NodeInputError, match="official"):
        codes(2.0, "linear")


def test_first_preview_delay_can_be_set_in_the_environment(pack, monkeypatch):
    sampler = sys.modules[f"{wt.PACK_MODULE}.nodes.sampler"]
    monkeypatch.delenv(sampler.PREVIEW_FIRST_AFTER_ENV, raising=False)
    assert sampler.PreviewPolicy().first_after == sampler.PREVIEW_FIRST_AFTER_S == 1.0
    monkeypatch.setenv(sampler.PREVIEW_FIRST_AFTER_ENV, "0")
    policy = sampler.PreviewPolicy(every_rows=4, clock=lambda: 0.0)  # no time passes at all
    assert policy.first_after == 0.0 and not policy.due(3) and policy.due(4)
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(sampler.PREVIEW_FIRST_AFTER_ENV, bad)
        with pytest.raises(ValueError, match=sampler.PREVIEW_FIRST_AFTER_ENV):
            sampler.PreviewPolicy()


def test_progress_moves_per_row_with_previews(pack, tiny_pipe):
    sampler = sys.modules[f"{wt.PACK_MODULE}.nodes.sampler"]
    sampling_cls = sys.modules[f"{wt.PACK_MODULE}.lumina_core.sampling"].SamplingConfig
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 32, 64, "a fox", "official")["result"]
    policy = sampler.PreviewPolicy(budget=1e9, every_rows=2, first_after=0.0)  # preview whenever allowed
    progress = sampler.RowProgress(tiny_pipe, request.height // 8, policy=policy)
    seen = []
    original = progress.bar.update
    progress.bar.update = lambda value, preview=None: (seen.append((value, preview)), original(value, preview))
    tiny_pipe.generate(request, sampling_cls(top_k=16, seed=3), progress=progress)
    values = [v for v, _ in seen]
    assert values == sorted(values) and values[-1] == 8 and len(set(values)) >= 8  # each of the 8 rows
    previews = [p for _, p in seen if p is not None]
    assert len(previews) >= 3 and previews[0].size[0] == 32
    assert [p.size[1] for p in previews] == sorted(p.size[1] for p in previews)  # the preview grows


def test_cancel_stops_within_a_row(pack, tiny_pipe, monkeypatch):
    bridge = sys.modules[f"{wt.PACK_MODULE}.nodes.comfy_bridge"]
    cancelled = sys.modules[f"{wt.PACK_MODULE}.lumina_core.sampling"].GenerationCancelled
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 32, 64, "a fox", "official")["result"]
    rows = []
    flag = {"on": False}
    original = bridge.Progress.update

    def update(self, value, preview=None):
        rows.append(value)
        if value >= 2:
            flag["on"] = True  # the user presses Cancel during row 3
        original(self, value, preview)

    monkeypatch.setattr(bridge.Progress, "update", update)
    monkeypatch.setattr(bridge, "interrupted", lambda: flag["on"])
    with pytest.raises(cancelled):
        node(pack, "LuminaMGPT2ARSamplerSJD").sample(tiny_pipe, request, 0, 4.0, 16, 1.0, False, 16, 1)
    assert max(rows) <= 3


def test_missing_movqgan_names_the_folder_and_file(pack, tiny_models, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "no-movq"
    shutil.copytree(tiny_models / "tiny", broken)
    for ckpt in broken.glob("*.ckpt"):
        ckpt.unlink()
    monkeypatch.setenv("LUMINA_MGPT2_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as info:
        node(pack, "LuminaMGPT2Loader").load("no-movq", False, "auto", "none", False)
    assert "movqgan_270M.ckpt" in str(info.value) and str(broken) in str(info.value)


def test_verifier_weights_are_looked_up_in_the_model_folder(pack, tmp_path, monkeypatch):
    from lumina_core.verify import get_verifier

    best_of_n = sys.modules[f"{wt.PACK_MODULE}.nodes.best_of_n"]
    (tmp_path / "verifiers" / "PickScore_v1").mkdir(parents=True)
    monkeypatch.setenv("LUMINA_MGPT2_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    verifier = get_verifier("pickscore", best_of_n.verifier_dirs(), auto_download=False)
    assert verifier.weights(verifier.model_name) == str(tmp_path / "verifiers" / "PickScore_v1")
    # Not present, not cached and no download: a clear error naming where it looked (no network).
    clip = get_verifier("clipscore", best_of_n.verifier_dirs(), False)
    with pytest.raises(FileNotFoundError, match="auto-download is off") as info:
        clip.weights(clip.model_name)
    assert str(tmp_path / "verifiers" / "clip-vit-large-patch14") in str(info.value)


def test_best_of_n_prompt_is_typed_once_and_judges_the_generated_panel(pack):
    from lumina_core.demo.data import parse_caption, render
    from PIL import Image

    from lumina_core.request import Request

    rng = np.random.default_rng(0)
    upper = render(parse_caption("a green triangle in the center"), rng)
    lowers = [render(parse_caption(c), rng) for c in ("a blue square in the bottom right", "a red circle in the top left")]
    batch = torch.from_numpy(np.stack([np.concatenate([upper, low]) for low in lowers]).astype(np.float32) / 255.0)
    request = Request(task="edit", prompt="a red circle in the top left", width=64, height=128,
                      reference=Image.new("RGB", (64, 64)))
    verifier = node(pack, "LuminaMGPT2VerifierBestOfN")
    out = verifier.select(batch, "", "demo_check", "", "rank", False, True, request=request)
    table = json.loads(out["result"][2])
    assert table["best_index"] == 1 and table["candidates"][0]["demo_check"] == 3.0   # lower panel judged
    # A prompt typed on the node wins over the request's.
    again = verifier.select(batch, "a blue square in the bottom right", "demo_check", "", "rank", False, True,
                            request=request)
    assert json.loads(again["result"][2])["best_index"] == 0
    with pytest.raises(ValueError, match="needs a prompt"):
        verifier.select(batch, "  ", "demo_check", "", "rank", False, True)


# --- "model default": the model's own settings flow from the pipe ----------------------------

@pytest.fixture(scope="module")
def demo_pipe(pack):
    pipe, = node(pack, "LuminaMGPT2Loader").load("demo", False, "auto", "none", False)
    return pipe


def test_model_default_sizes_and_sampling_come_from_the_pipe(pack, demo_pipe):
    assert demo_pipe.defaults.cfg == 1.5 and demo_pipe.defaults.top_k == 50
    composer = node(pack, "LuminaMGPT2DualPanelComposer")
    out = composer.compose("t2i", 0, 0, "a red circle in the top left", "official", pipe=demo_pipe)
    request, final_prompt = out["result"]
    assert (request.width, request.height) == (64, 64) and "64x64" in final_prompt
    assert "size: 64x64" in out["ui"]["text"]
    control = composer.compose("control_canny", 0, 0, "a red circle", "official", image=comfy_image(64, 64),
                               pipe=demo_pipe)["result"][0]
    assert (control.width, control.height) == (64, 128)
    # Explicit values win; one typed side keeps the model's other side.
    assert composer.compose("t2i", 96, 0, "x", "official", pipe=demo_pipe)["result"][0].height == 64
    # No pipe: the official defaults.
    assert composer.compose("t2i", 0, 0, "x", "official")["result"][0].width == 768
    sampler = node(pack, "LuminaMGPT2ARSamplerSJD")
    used = []
    generate = demo_pipe.generate
    demo_pipe.generate = lambda req, sampling, **kw: (used.append(sampling), generate(req, sampling, **kw))[1]
    try:
        shown = sampler.sample(demo_pipe, request, 0, 0.0, 0, 1.0, False, 16, 1)["ui"]["text"]
        assert (used[-1].cfg, used[-1].guidance, used[-1].top_k) == (1.5, "constant", 50)
        assert shown[0].startswith("t2i 64x64, cfg 1.5 (constant guidance), top_k 50")
        sampler.sample(demo_pipe, request, 0, 2.0, 20, 1.0, False, 16, 1, "official")
        assert (used[-1].cfg, used[-1].guidance, used[-1].top_k) == (2.0, "official", 20)
    finally:
        del demo_pipe.generate


def test_size_errors_name_the_largest_size_the_model_allows(pack, demo_pipe):
    composer = node(pack, "LuminaMGPT2DualPanelComposer")
    Error = sys.modules[f"{wt.PACK_MODULE}.nodes.common"].NodeInputError
    with pytest.raises(Error) as info:
        composer.compose("t2i", 256, 256, "a red circle", "official", pipe=demo_pipe)
    assert "largest t2i size this model allows is 96x96" in str(info.value)
    assert "max_positions" not in str(info.value)
    with pytest.raises(Error, match="multiple of 64"):
        composer.compose("dense_depth", 512, 992, "", "official", image=comfy_image(64, 64))
    with pytest.raises(Error, match="not a multiple of 32"):
        composer.compose("t2i", 33, 64, "", "official")


def test_a_task_the_model_does_not_list_warns_on_the_node(pack, demo_pipe):
    out = node(pack, "LuminaMGPT2DualPanelComposer").compose("pair_depth", 0, 0, "a red circle", "official",
                                                             pipe=demo_pipe)
    warning = [t for t in out["ui"]["text"] if t.startswith("warning:")]
    assert warning and "t2i, control_canny, dense_canny" in warning[0]
    assert out["result"][0].height == 128  # the demo's panel size still applies


def test_loader_metadata_tells_the_picker_each_models_limits(nodes):
    facts = nodes["LuminaMGPT2Loader"].INPUT_TYPES()["required"]["model"][1]["lumina_models"]
    assert facts["demo"]["max_positions"] == 256 and facts["demo"]["defaults"]["sizes"]["t2i"] == [64, 64]
    assert facts["Alpha-VLLM/Lumina-mGPT-2.0"]["max_positions"] == 10240
    sizes = nodes["LuminaMGPT2DualPanelComposer"].INPUT_TYPES()["required"]["task"][1]["lumina"]
    demo = {(c["width"], c["height"]) for c in sizes["choices"]["256"]["single"]}
    assert (64, 64) in demo and (768, 768) not in demo
    assert sizes["dual_panel"]["control_canny"] is True and sizes["dual_panel"]["t2i"] is False


# --- installing into a ComfyUI ------------------------------------------------------------------

# The lowest versions a ComfyUI 0.8 install holds (its requirements.txt; tokenizers: the floor of
# transformers 4.50.3 itself). The pack's floors must not be above them, so installing it upgrades nothing.
COMFYUI_08_FLOORS = {"transformers": "4.50.3", "tokenizers": "0.21", "safetensors": "0.4.2", "numpy": "1.25.0"}


def _requirements(lines):
    import re

    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
            out[name.lower()] = spec
    return out


def test_install_never_upgrades_what_comfyui_has():
    import tomllib

    from packaging.version import Version

    project = tomllib.loads((wt.REPO / "pyproject.toml").read_text())
    deps = _requirements(project["project"]["dependencies"])
    reqs = _requirements((wt.REPO / "requirements.txt").read_text().splitlines())
    assert "torch" not in reqs and {k: v for k, v in deps.items() if k != "torch"} == reqs
    for name, spec in deps.items():
        assert spec.startswith(">=") and "," not in spec and "<" not in spec and "==" not in spec, (name, spec)
        floor = COMFYUI_08_FLOORS.get(name)
        if floor:
            assert Version(spec[2:]) <= Version(floor), (name, spec, floor)
    assert not any("git+" in d for d in project["project"]["dependencies"])


def test_pyproject_registry_block_has_an_icon_and_no_invented_urls():
    import tomllib

    project = tomllib.loads((wt.REPO / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith(".png")
    urls = [*project["project"].get("urls", {}).values(), comfy["Icon"]]
    # Only the upstream model's real addresses (the pack's own repository is not published yet).
    assert all(u.split("/")[2] in ("github.com", "huggingface.co", "raw.githubusercontent.com") and
               "Alpha-VLLM/Lumina-mGPT-2.0" in u for u in urls), urls
def test_sampler_refuses_layer_streaming_and_a_plan_that_cannot_fit(pack, tiny_pipe, monkeypatch):
    """Issue 12 items 4-5: node errors before sampling starts (ComfyUI's low-VRAM mode; too little memory)."""
    bridge = sys.modules[f"{wt.PACK_MODULE}.nodes.comfy_bridge"]
    common = sys.modules[f"{wt.PACK_MODULE}.nodes.common"]
    request, _ = node(pack, "LuminaMGPT2DualPanelComposer").compose("t2i", 64, 32, "a red fox", "official")["result"]
    sampler = node(pack, "LuminaMGPT2ARSamplerSJD")
    args = (tiny_pipe, request, 0, 2.0, 8, 1.0, False, 16, 2, "constant")
    monkeypatch.setattr(bridge, "streams_layers", lambda: True)
    with pytest.raises(common.NodeInputError, match="low-VRAM mode.*80 minutes"):
        sampler.sample(*args, kv_cache="auto")
    monkeypatch.setattr(bridge, "streams_layers", lambda: False)
    monkeypatch.setattr(bridge, "plannable_memory", lambda device: 1000)
    with pytest.raises(common.NodeInputError, match=r"64x32 x2 .* needs .* GiB, 0\.0 GiB free"):
        sampler.sample(*args, kv_cache="fp8")
    monkeypatch.setattr(bridge, "plannable_memory", lambda device: 8 * 2**30)
    codes = sampler.sample(*args, kv_cache="fp8")["result"][0]
    assert codes.codes.shape[0] == 2


def test_loader_quantization_auto_picks_by_memory(pack, tiny_models, monkeypatch):
    from lumina_core.config import ModelConfig
    from lumina_core.memory import GIB, choose_quant

    assert "auto" in node(pack, "LuminaMGPT2Loader").INPUT_TYPES()["required"]["quantization"][0]
    pipe, = node(pack, "LuminaMGPT2Loader").load("tiny", False, "auto", "auto", False)
    assert pipe.quant is None  # on the CPU nothing is planned
    seven = ModelConfig.preset("7b")
    # 12 GiB takes int8 with a bf16 MoVQGAN decode (11.3 GiB), 10 GiB int4
    assert [choose_quant(g * GIB, seven) for g in (80, 16, 12, 10)] == [None, "int8", "int8", "int4"]
