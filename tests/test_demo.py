"""The shipped demo model: found by name, real official-format files, follows held-out prompts far above chance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lumina_core.demo import checker, data
from lumina_core.demo.build import ASSET_DIR, MOVQGAN_NAME
from lumina_core.hub import resolve_model
from lumina_core.images import tensor_to_uint8
from lumina_core.request import Request
from lumina_core.sampling import SamplingConfig

SIZE = data.IMAGE_SIZE


@pytest.fixture(scope="module")
def pipe():
    from lumina_core.pipeline import LuminaPipeline

    return LuminaPipeline.from_pretrained("demo", dtype=torch.float32, device="cpu")


def test_demo_is_shipped_small_and_in_official_format():
    assert resolve_model("demo") == ASSET_DIR
    files = {p.name: p.stat().st_size for p in ASSET_DIR.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", MOVQGAN_NAME} <= set(files)
    assert any(name.endswith(".safetensors") for name in files)
    assert sum(files.values()) < 25 * 2**20
    config = json.loads((ASSET_DIR / "config.json").read_text())
    assert config["model_type"] == "chameleon" and config["hidden_size"] >= 128
    info = json.loads((ASSET_DIR / "build_info.json").read_text())
    assert info["built_by"] == "python -m lumina_core.demo.build"
    # The held-out captions recorded at build time are the ones the split gives now.
    assert info["held_out_captions"] == [c.text() for c in data.split_captions()[1]]


def test_demo_follows_held_out_prompts_far_above_chance(pipe):
    held = data.split_captions()[1]
    picks = [held[i] for i in (0, 7, 13, 21, 34, 45)]
    sampling = SamplingConfig(cfg=1.5, guidance="constant", top_k=50, seed=0, num_images=4)
    hits = total = 0
    for caption in picks:
        out = pipe.generate(Request(task="t2i", prompt=caption.text(), width=SIZE, height=SIZE), sampling)
        for image in tensor_to_uint8(pipe.decode(out)).numpy():
            hits += checker.check_image(image, caption).ok
            total += 1
    # Chance (images scored against a shuffled caption) is about 2 %; bench/demo_eval.py measures 0.50
    # on all 50 held-out captions at this setting (single shapes 1.00, pairs 0.37).
    assert hits / total >= 0.35, f"{hits}/{total} held-out images follow their caption"


def test_demo_control_and_dense_tasks_follow_the_reference(pipe):
    """Spatial following from the given upper panel (colours of dual panels are off: see the model card)."""
    rng = np.random.default_rng(5)
    held = data.split_captions()[1]
    sampling = SamplingConfig(cfg=1.5, guidance="constant", top_k=50, seed=1, num_images=4)
    own, other = [], []
    for caption, task in ((held[3], "control_canny"), (held[20], "control_canny"), (held[3], "dense_canny"),
                          (held[20], "dense_canny")):
        sample = data.make_sample(task, caption, rng)
        elsewhere = data.make_sample(task, data.parse_caption("a green square in the bottom right"), rng)
        out = pipe.generate(Request(task=task, prompt=caption.text(), width=SIZE, height=2 * SIZE,
                                    reference=Image.fromarray(np.ascontiguousarray(sample.upper))), sampling)
        images = tensor_to_uint8(pipe.decode(out)).numpy()
        assert images.shape == (4, 2 * SIZE, SIZE, 3)
        for image in images:
            lower = image[SIZE:]
            # control: edges of the painted panel trace the given edge map; dense: the drawn edge map
            # traces the shapes of the given image.
            edges, truth, wrong = ((data.edge_map(lower), sample.upper, elsewhere.upper) if task == "control_canny"
                                   else (lower, sample.lower, elsewhere.lower))
            own.append(checker.edge_f1(edges, truth))
            other.append(checker.edge_f1(edges, wrong))
    assert np.mean(own) > 0.4 and np.mean(own) > np.mean(other) + 0.2, (np.mean(own), np.mean(other))


def test_cli_main_command_runs_on_the_demo_with_its_defaults(tmp_path):
    from lumina_core.__main__ import main

    assert main(["generate", "--model", "demo", "--prompt", "a red circle above a blue square",
                 "--num-images", "2", "--output", str(tmp_path)]) == 0
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) == 2
    meta = json.loads(Image.open(images[0]).info["lumina_mgpt2"])
    assert Image.open(images[0]).size == (SIZE, SIZE)
    assert (meta["cfg"], meta["guidance"], meta["top_k"]) == (1.5, "constant", 50)
    # Typed options win over the model's defaults.
    assert main(["generate", "--model", "demo", "--prompt", "a red circle above a blue square", "--cfg", "1",
                 "--output", str(tmp_path / "b")]) == 0
    assert json.loads(Image.open(next((tmp_path / "b").glob("*.png"))).info["lumina_mgpt2"])["cfg"] == 1.0
