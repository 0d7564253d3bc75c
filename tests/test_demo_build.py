"""The demo rebuild command: the whole chain (data -> train vq -> prepare -> fit -> export) on a micro plan."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lumina_core.demo import build, data


def test_plan_config_and_sampling_defaults():
    cfg = build.model_config(build.BuildPlan(), vocab_size=700)
    assert cfg["model_type"] == "chameleon" and cfg["vocab_size"] == 700
    assert cfg["hidden_size"] == 256 and cfg["num_hidden_layers"] == 4
    defaults = build.sampling_defaults()
    assert defaults["guidance"] == "constant" and 1 < defaults["cfg"] < 3
    assert defaults["sizes"]["control_canny"] == [64, 128]
    assert set(defaults["tasks"]) == set(data.DEMO_TASKS)


def test_install_refuses_a_folder_that_is_not_a_built_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a built demo model"):
        build.install(tmp_path, tmp_path / "target")


@pytest.mark.slow
def test_micro_build_runs_every_stage_and_loads(tmp_path):
    from lumina_core.pipeline import LuminaPipeline
    from lumina_core.request import Request
    from lumina_core.sampling import SamplingConfig

    plan = build.BuildPlan(fit_items=24, vq_items=8, vq_steps=2, vq_batch=2, fit_steps=2, fit_batch=4, fit_warmup=1,
                           hidden_size=64, intermediate_size=128, layers=1, heads=2, vq_min_check=0.0)
    model_dir = build.build(tmp_path / "b", plan, threads=1)
    info = json.loads((tmp_path / "b" / "build_log.json").read_text())
    assert set(info["stages"]) == {"data", "vq data", "tokenizer", "train vq", "train prepare", "train fit",
                                   "train export"}
    assert (model_dir / build.MOVQGAN_NAME).is_file() and (model_dir / build.SAMPLING_DEFAULTS).is_file()
    # A second call finds every stage done and only rewrites the info files.
    assert build.build(tmp_path / "b", plan) == model_dir
    assert 0 < info["vq_eval"]["psnr_db"] < 60 and 0 <= info["vq_eval"]["dense_edge_f1"] <= 1
    # A tokenizer whose reconstructions fail the pixel checker is trained again with another seed;
    # when every attempt fails, the build stops before pre-tokenisation and names each result.
    with pytest.raises(RuntimeError, match=r"fail the pixel checker \(seed 0: .*; seed 1000: .*needs 1.5 each"):
        build.build(tmp_path / "c", dataclasses.replace(plan, vq_min_check=1.5))
    assert not (tmp_path / "c" / build.MOVQGAN_NAME).exists() and not (tmp_path / "c" / "prepared").exists()
    assert (tmp_path / "c" / "vq_run_2" / "movqgan.ckpt").is_file()
    target = build.install(model_dir, tmp_path / "installed")
    pipe = LuminaPipeline.from_pretrained(str(target), dtype=torch.float32, device="cpu")
    out = pipe.generate(Request(task="t2i", prompt="a red circle in the center", width=64, height=64),
                        SamplingConfig(cfg=1.5, guidance="constant", top_k=50, num_images=1))
    assert pipe.decode(out).shape == (1, 3, 64, 64)
