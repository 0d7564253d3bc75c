"""LoRA: `fit --lora` (adapter-only checkpoints, resume, SIGTERM, torchrun, quantized bases), peft-format export
(loads in plain peft; --merge), inference beside plain and quantized linears, stacking, CUDA-graph / compile
invalidation, the CLI flag, the ComfyUI node, and the refusals."""
from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lumina_core import lora
from lumina_core.errors import InputError
from lumina_core.weights import load_transformer
from lumina_core.pipeline import LuminaPipeline
from lumina_core.testing.adapters import write_random_adapter
from lumina_core.testing.checkpoints import TINY_MOVQGAN_FILE, write_tiny_checkpoint
from lumina_core.train import FitOptions, fit, prepare
from lumina_core.train.__main__ import main as train_main
from lumina_core.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, latest_checkpoint
from lumina_core.testing.items import write_smooth_t2i_items

REPO = Path(__file__).resolve().parents[1]
WORDS = "a red fox blue sky"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder and a prepared dataset of six small t2i images."""
    root = tmp_path_factory.mktemp("lora")
    model = write_tiny_checkpoint(root / "model", words=WORDS, num_image_codes=64, max_grids=16)
    rng = np.random.default_rng(0)
    items = write_smooth_t2i_items(root, rng)
    (root / "data.jsonl").write_text("\n".join(map(json.dumps, items)) + "\n", encoding="utf-8")
    prepare(root / "data.jsonl", root / "prep", model, model / TINY_MOVQGAN_FILE, target_size=64, shard_size=3,
            progress=False)
    return {"root": root, "model": model, "prep": root / "prep"}


def lora_options(tiny, out: Path, **overrides) -> FitOptions:
    values = dict(data=str(tiny["prep"]), out=str(out), init_from=str(tiny["model"]), steps=6, lr=1e-2, min_lr=1e-3,
                  warmup_steps=1, micro_batch=2, accum=1, max_seq_len=256, dropout=0.0, precision="fp32",
                  save_every=100, uncond_prob=0.25, seed=3, lora_rank=4, lora_dropout=0.1)
    values.update(overrides)
    return FitOptions(**values)


def read_log(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(tiny):
    """A finished 6-step LoRA run and its exported peft adapter folder."""
    out = tiny["root"] / "run"
    result = fit(lora_options(tiny, out))
    adapter = tiny["root"] / "adapter"
    assert train_main(["export", str(out), "--out", str(adapter), "--dtype", "float32"]) == 0
    return {"out": out, "result": result, "adapter": adapter}


def ids_batch(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 60, (2, n), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# Training

def test_lora_fit_trains_only_adapters_and_checkpoints_hold_only_them(tiny, trained):
    losses = trained["result"].losses
    assert len(losses) == 6 and losses[-1] < losses[0]
    ckpt = latest_checkpoint(trained["out"])
    tensors = load_file(str(ckpt / MODEL_FILE))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    # Every targeted projection of both layers has its pair; nothing of the base is saved.
    assert len(tensors) == 2 * 2 * len(lora.DEFAULT_TARGETS)
    base_bytes = (tiny["model"] / "model.safetensors").stat().st_size
    assert (ckpt / MODEL_FILE).stat().st_size < base_bytes / 5
    optim = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)
    assert len(optim["state"]) == len(tensors)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["options"]["lora_rank"] == 4


def test_lora_resume_is_exact(tiny, trained, tmp_path):
    out = tmp_path / "resumed"
    fit(lora_options(tiny, out, stop_after=3))
    fit(lora_options(tiny, out))
    a, b = read_log(trained["out"]), read_log(out)
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    wa = load_file(str(latest_checkpoint(trained["out"]) / MODEL_FILE))
    wb = load_file(str(latest_checkpoint(out) / MODEL_FILE))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("quant,size", [("int8", 32), ("int4", 128)])
def test_lora_trains_through_a_frozen_quantized_base(tmp_path, quant, size):
    model = write_tiny_checkpoint(tmp_path / "model", words=WORDS, hidden_size=size, intermediate_size=2 * size,
                                  num_layers=1, init_std=0.05)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"task": "t2i", "prompt": "a red fox", "image": "a.png"}) + "\n")
    prepare(tmp_path / "d.jsonl", tmp_path / "prep", model, model / TINY_MOVQGAN_FILE, target_size=32, progress=False)
    opts = FitOptions(data=str(tmp_path / "prep"), out=str(tmp_path / "run"), init_from=str(model), steps=3,
                      lr=1e-2, micro_batch=1, precision="bf16", lora_rank=4, base_quant=quant, uncond_prob=0.0)
    result = fit(opts)
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
    tensors = load_file(str(latest_checkpoint(tmp_path / "run") / MODEL_FILE))
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in tensors.items())


class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, recording the shape and bytes of every tensor it moves to host memory."""

    packed: list[tuple[tuple[int, ...], int]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pack = self.pack_hook

        def recording_pack(tensor):
            RecordingSaveOnCpu.packed.append((tuple(tensor.shape), tensor.numel() * tensor.element_size()))
            return pack(tensor)

        self.pack_hook = recording_pack


def test_offloaded_activations_give_the_same_run_and_move_exactly_the_layer_inputs(tiny, trained, tmp_path,
                                                                                  monkeypatch):
    from lumina_core.config import ModelConfig
    from lumina_core.train.lora import checkpointed_input_bytes

    RecordingSaveOnCpu.packed = []
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    out = tmp_path / "offloaded"
    fit(lora_options(tiny, out, offload_activations=True))
    # The same losses and adapters as the run that kept the checkpointed inputs where they were.
    a, b = read_log(trained["out"]), read_log(out)
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    wa = load_file(str(latest_checkpoint(trained["out"]) / MODEL_FILE))
    wb = load_file(str(latest_checkpoint(out) / MODEL_FILE))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # What went to host memory: per layer and micro-batch its input [B, L, H] and RoPE cos / sin [B, L, D],
    # nothing else (no mask: training attention is plain causal), as the memory estimate counts it.
    config = ModelConfig.from_pretrained(tiny["model"])
    layers, steps = config.num_hidden_layers, 6
    packed = RecordingSaveOnCpu.packed
    assert len(packed) == 3 * layers * steps
    for i in range(0, len(packed), 3):
        (hidden, nbytes), cos, sin = packed[i:i + 3]
        b_, l_, h_ = hidden
        assert h_ == config.hidden_size and cos[0] == sin[0] == (b_, l_, config.head_dim)
        assert nbytes + cos[1] + sin[1] == checkpointed_input_bytes(config, b_ * l_, element_size=4)


def test_offload_activations_needs_gradient_checkpointing(tiny, tmp_path, capsys):
    args = cli_fit_args(lora_options(tiny, tmp_path / "r")) + ["--offload-activations", "--no-grad-checkpointing"]
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --offload-activations") and "Traceback" not in err


def test_lora_memory_estimate_7b_fits_24_and_16_gib_cards():
    """The README's figures: rank 16, 768 px, micro-batch 1, checkpointing; int8 base needs the offload for <= 14 GiB."""
    from lumina_core.config import ModelConfig
    from lumina_core.request import Request
    from lumina_core.train.lora import lora_memory_estimate

    seq = Request(task="t2i", prompt="x", width=768, height=768).image_tokens + 128
    est = {(q, o): lora_memory_estimate(ModelConfig.preset("7b"), seq, rank=16, base_quant=q, loss_chunk=512,
                                        offload_activations=o) for q in (None, "int8") for o in (False, True)}
    assert est[None, False]["with_context"] <= 22.0
    assert est["int8", True]["with_context"] <= 14.0 < est["int8", False]["with_context"]
    assert est["int8", True]["host_checkpointed_inputs"] == est[None, True]["host_checkpointed_inputs"] > 2.0


def cli_fit_args(opts: FitOptions) -> list[str]:
    return ["fit", "--data", opts.data, "--out", opts.out, "--init-from", opts.init_from, "--steps", str(opts.steps),
            "--lr", str(opts.lr), "--min-lr", str(opts.min_lr), "--warmup-steps", str(opts.warmup_steps),
            "--micro-batch", str(opts.micro_batch), "--accum", str(opts.accum), "--max-seq-len", str(opts.max_seq_len),
            "--dropout", str(opts.dropout), "--precision", opts.precision, "--save-every", str(opts.save_every),
            "--uncond-prob", str(opts.uncond_prob), "--seed", str(opts.seed), "--device", "cpu",
            "--lora", str(opts.lora_rank), "--lora-dropout", str(opts.lora_dropout)]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_lora_sigterm_saves_then_resume_continues_exactly(tiny, tmp_path):
    from lumina_core.testing.processes import sigterm_after_first_log

    opts = lora_options(tiny, tmp_path / "killed", steps=400)
    returncode, output = sigterm_after_first_log([sys.executable, "-m", "lumina_core.train", *cli_fit_args(opts)],
                                                 tmp_path / "killed" / "log.jsonl", child_env(), tmp_path)
    assert returncode == 0 and "interrupted, checkpoint saved" in output, output[-2000:]
    stopped = json.loads((latest_checkpoint(tmp_path / "killed") / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped < 400
    fit(lora_options(tiny, tmp_path / "killed", steps=400, stop_after=2))
    fit(lora_options(tiny, tmp_path / "straight", steps=400, stop_after=stopped + 2))
    a, b = read_log(tmp_path / "killed"), read_log(tmp_path / "straight")
    for step in range(1, stopped + 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-6), step


@pytest.mark.slow
def test_lora_torchrun_two_processes_match_one_process(tiny, tmp_path):
    """2 data-parallel ranks x micro-batch 1 == 1 process x 2 accumulation steps (adapter gradients averaged)."""
    common = dict(steps=3, micro_batch=1, lora_dropout=0.0, save_every=3)
    fit(lora_options(tiny, tmp_path / "single", accum=2, **common))
    double = lora_options(tiny, tmp_path / "ddp", accum=1, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lumina_core.train", *cli_fit_args(double)]
    done = subprocess.run(cmd, env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    wa = load_file(str(latest_checkpoint(tmp_path / "single") / MODEL_FILE))
    wb = load_file(str(latest_checkpoint(tmp_path / "ddp") / MODEL_FILE))
    assert set(wa) == set(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


# --------------------------------------------------------------------------------------------
# Files: peft format, plain peft, merge

def test_exported_adapter_is_peft_format_and_loads_in_plain_peft(tiny, trained):
    from peft import PeftModel

    folder = trained["adapter"]
    config = json.loads((folder / lora.ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and set(config["target_modules"]) == set(
        lora.DEFAULT_TARGETS)
    keys = load_file(str(folder / lora.ADAPTER_WEIGHTS_FILE)).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    ids = ids_batch()
    pipe = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu")
    with torch.no_grad():
        base = pipe.transformer(ids)
        pipe.load_lora(folder)
        ours = pipe.transformer(ids)
        plain = PeftModel.from_pretrained(load_transformer(tiny["model"], dtype=torch.float32), str(folder))
        theirs = plain.base_model.model(ids)
    assert (ours - base).abs().max() > 1e-3          # the adapter changes the model
    assert torch.allclose(ours, theirs, atol=1e-5)    # exactly as peft applies it


def test_exported_adapter_names_its_base_folder_without_the_path(tiny, trained):
    """The adapter is made to be shared: its config names the base folder ('model'), not where it sat on this disk."""
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == Path(tiny["model"]).name == "model"
    from safetensors import safe_open

    with safe_open(str(trained["adapter"] / "adapter_model.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["adapter_config"])["base_model_name_or_path"] == "model"
    assert str(tiny["root"]) not in (trained["adapter"] / "adapter_model.safetensors").read_bytes().decode("latin-1")


def test_export_merge_writes_an_official_folder_equal_to_the_applied_adapter(tiny, trained, tmp_path):
    merged = tmp_path / "merged"
    assert train_main(["export", str(trained["out"]), "--out", str(merged), "--merge", "--dtype", "float32"]) == 0
    assert {"config.json", "tokenizer.json", TINY_MOVQGAN_FILE} <= {p.name for p in merged.iterdir()}
    ids = ids_batch()
    pipe = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu").load_lora(trained["adapter"])
    with torch.no_grad():
        assert torch.allclose(load_transformer(merged, dtype=torch.float32)(ids), pipe.transformer(ids), atol=1e-4)
    with pytest.raises(InputError, match="not a LoRA run"):
        from lumina_core.train.lora import export_lora

        fake = tmp_path / "full"
        fake.mkdir()
        (fake / "trainer_state.json").write_text(json.dumps({"options": {}}))
        export_lora(fake, tmp_path / "x", merge=True)


# --------------------------------------------------------------------------------------------
# Inference

def manual_logits(model_folder: Path, adapters: list[tuple[Path, float]], ids: torch.Tensor) -> torch.Tensor:
    """Reference: the base with each targeted weight replaced by W + sum strength * alpha/r * B A."""
    model = load_transformer(model_folder, dtype=torch.float32)
    with torch.no_grad():
        for path, strength in adapters:
            adapter = lora.load_adapter(path)
            for name in adapter.modules:
                model.get_submodule(name).weight += adapter.delta(name, strength)
        return model(ids)


def test_strength_stacking_and_removal(tiny, tmp_path):
    a = write_random_adapter(tmp_path / "a", tiny["model"], rank=4, alpha=8, seed=1)
    b = write_random_adapter(tmp_path / "b", tiny["model"], rank=2, targets=("q_proj", "down_proj"), seed=2)
    ids = ids_batch()
    pipe = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu")
    q_proj = pipe.transformer.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        base = pipe.transformer(ids)
        assert torch.equal(pipe.load_lora(a, 0.0).transformer(ids), base)
        pipe.unload_loras()
        pipe.load_lora(a, 1.0).load_lora(b, -0.5)
        expected = manual_logits(tiny["model"], [(a, 1.0), (b, -0.5)], ids)
        assert torch.allclose(pipe.transformer(ids), expected, rtol=1e-4, atol=1e-4)
        assert len(pipe.loras) == 2
        pipe.unload_loras()
        assert pipe.transformer.model.layers[0].self_attn.q_proj is q_proj   # the base module itself is back
        assert torch.equal(pipe.transformer(ids), base)


SHIPPED_DEMO_LORA = lora.BUILTIN_LORA_DIR / "demo_bar"
BAR_PROMPTS = ("a blue bar in the bottom left", "a red bar in the top right", "a yellow bar in the center")


def test_shipped_demo_adapter_teaches_the_demo_the_bar_it_never_saw():
    """bench/lora_demo.py's adapter (rank 8, 1,500 steps, 8.4 CPU minutes): bars with it, none without.

    "bar" is a word the demo never read (its tokenizer gives <unk>); the last two prompts are held-out
    combinations of the bench (never trained on). Fixed seeds; scored from pixels by the demo's checker.
    """
    from lumina_core.demo import checker, data
    from lumina_core.images import tensor_to_uint8
    from lumina_core.request import Request
    from lumina_core.sampling import SamplingConfig

    config = json.loads((SHIPPED_DEMO_LORA / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "demo" and config["r"] == 8
    assert (SHIPPED_DEMO_LORA / "adapter_model.safetensors").stat().st_size < 2_000_000
    pipe = LuminaPipeline.from_pretrained("demo", device="cpu")

    def bars(p) -> int:
        count = 0
        for i, text in enumerate(BAR_PROMPTS):
            out = p.generate(Request(task="t2i", prompt=text, width=64, height=64),
                             SamplingConfig(seed=40 + i, num_images=8, **p.defaults.sampling()))  # cfg 1.5, top-k 50
            caption = data.parse_caption(text)
            count += sum(checker.check_image(im, caption).ok_with_shape for im in tensor_to_uint8(p.decode(out)).numpy())
        return count

    with_adapter = LuminaPipeline.from_pretrained("demo", device="cpu")
    with_adapter.load_lora(SHIPPED_DEMO_LORA, 1.0)
    assert bars(pipe) == 0
    taught = bars(with_adapter)
    assert taught >= 14   # of 24 (18 when the adapter shipped)


def test_a_pipe_with_a_lora_leaves_the_base_pipe_alone(tiny, tmp_path):
    from lumina_core.request import Request
    from lumina_core.sampling import SamplingConfig

    a = write_random_adapter(tmp_path / "a", tiny["model"], std=0.3)
    base = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu")
    request, sampling = Request(task="t2i", prompt="a red fox", width=32, height=32), SamplingConfig(top_k=8, seed=1)
    plain_codes = base.generate(request, sampling).codes
    adapted = base.with_lora(lora.load_adapter(a), 1.0)
    assert base.loras == [] and adapted.transformer is base.transformer
    adapted_codes = adapted.generate(request, sampling).codes
    assert not torch.equal(adapted_codes, plain_codes)
    assert torch.equal(base.generate(request, sampling).codes, plain_codes)   # same weights, own stack


def test_lora_beside_a_quantized_linear_is_not_merged(tiny, tmp_path):
    pytest.importorskip("torchao")
    model = write_tiny_checkpoint(tmp_path / "m", words=WORDS, hidden_size=128, intermediate_size=256, num_layers=1,
                                  init_std=0.05)
    a = write_random_adapter(tmp_path / "a", model, seed=3)
    for quant in ("int8", "int4"):
        pipe = LuminaPipeline.from_pretrained(str(model), device="cpu", quant=quant)
        layer = pipe.transformer.model.layers[0].self_attn.q_proj
        weight = layer.weight
        x = torch.randn(3, 128)
        with torch.no_grad():
            before = layer(x)
            pipe.load_lora(a, 0.7)
            wrapped = pipe.transformer.model.layers[0].self_attn.q_proj
            adapter = pipe.loras[0][0]
            delta = x @ adapter.delta("model.layers.0.self_attn.q_proj", 0.7).T
            assert isinstance(wrapped, lora.LoraLinear) and wrapped.base is layer and layer.weight is weight
            assert type(layer.weight) is type(weight) and type(weight) is not torch.nn.Parameter or \
                type(weight.data) is not torch.Tensor   # still the torchao tensor
            assert torch.allclose(wrapped(x), before + delta, atol=1e-4)
        pipe.unload_loras()
        assert pipe.transformer.model.layers[0].self_attn.q_proj is layer


def test_cuda_graphs_are_dropped_when_adapters_change(tiny, tmp_path):
    from lumina_core.sampling.step import CUDAGraphStep

    a = write_random_adapter(tmp_path / "a", tiny["model"])
    pipe = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu")
    pipe.step_fn = step = CUDAGraphStep(pipe.transformer.hidden_states)
    step.graphs[("captured",)] = object()
    pipe.apply_loras()                       # nothing changed: graphs kept
    assert step.graphs
    pipe.load_lora(a, 1.0)
    assert not step.graphs                   # re-captured on the next request
    step.graphs[("captured",)] = object()
    pipe.generate  # noqa: B018  (generate re-applies the same stack: no change, graphs kept)
    pipe.apply_loras()
    assert step.graphs
    pipe.loras = [(pipe.loras[0][0], 0.5)]   # a strength change is a change
    pipe.apply_loras()
    assert not step.graphs


def test_compiled_step_sees_adapter_changes(tiny, tmp_path):
    a = write_random_adapter(tmp_path / "a", tiny["model"], std=0.2)
    pipe = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu")
    compiled = torch.compile(pipe.transformer.hidden_states, backend="eager", dynamic=False)
    ids = ids_batch()
    with torch.no_grad():
        base = compiled(ids)
        pipe.load_lora(a, 1.0)
        eager = pipe.transformer.hidden_states(ids)
        assert not torch.allclose(eager, base, atol=1e-4)
        assert torch.allclose(compiled(ids), eager, atol=1e-5)   # re-traced: the guards see swapped modules
        pipe.unload_loras()
        assert torch.allclose(compiled(ids), base, atol=1e-6)


def test_generate_cli_takes_lora_path_and_strength(tiny, tmp_path):
    from lumina_core.__main__ import main

    a = write_random_adapter(tmp_path / "a", tiny["model"])
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny["model"]), "--prompt", "a red fox", "--width", "32", "--height",
                 "32", "--top-k", "8", "--output", str(out), "--lora", f"{a}:0.5",
                 "--lora", str(a / lora.ADAPTER_WEIGHTS_FILE)]) == 0
    png = next(out.glob("*.png"))
    meta = json.loads(Image.open(png).text["lumina_mgpt2"])
    assert meta["loras"] == ["a:0.5", "a:1"]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tiny["model"]), "--prompt", "x", "--output", str(out), "--lora", f"{a}:40"])
    assert exit_info.value.code == 2


def test_generate_cli_takes_a_shipped_adapter_by_name(tmp_path, monkeypatch, capsys):
    """`--lora demo_bar` (no such file here) is the adapter shipped with the pack, as `--model demo` is the demo;
    an unknown name is one line that lists the shipped ones."""
    from lumina_core.__main__ import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["generate", "--model", "demo", "--prompt", "a blue bar in the bottom left", "--num-images", "1",
                 "--output", str(out), "--lora", "demo_bar:0.9", "--no-progress"]) == 0
    assert json.loads(Image.open(next(out.glob("*.png"))).text["lumina_mgpt2"])["loras"] == ["demo_bar:0.9"]
    # A wrong --lora fails before the model loads (minutes for the 7B).
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --lora was checked")

    monkeypatch.setattr(LuminaPipeline, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "demo", "--prompt", "x", "--output", str(tmp_path / "o2"), "--lora", "no_such_lora"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "LoRA adapter not found: no_such_lora" in err and "demo_bar" in err, err


# --------------------------------------------------------------------------------------------
# Bad input

def test_rank_of_zero_or_below_is_refused(tiny, tmp_path):
    for rank in (0, -2):
        with pytest.raises(InputError, match="--lora RANK must be >= 1"):
            fit(lora_options(tiny, tmp_path / "r", lora_rank=rank))
    with pytest.raises(InputError, match="--init-from"):
        fit(lora_options(tiny, tmp_path / "r", init_from=None, config="2b"))
    with pytest.raises(InputError, match="allowed projections"):
        fit(lora_options(tiny, tmp_path / "r", lora_targets="lm_head"))


@pytest.mark.parametrize("strength", [10.5, -11, float("nan"), float("inf"), "strong"])
def test_strength_out_of_range_is_refused(strength):
    with pytest.raises(InputError, match="LoRA strength"):
        lora.check_strength(strength)


def test_pickled_lora_files_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("lora.bin", "lora.pt", "lora.ckpt"):
        (tmp_path / name).write_bytes(pickle.dumps(Payload()))
        with pytest.raises(InputError, match="never unpickled"):
            lora.load_adapter(tmp_path / name)
    folder = tmp_path / "peft_bin"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="only safetensors"):
        lora.load_adapter(folder)
    (tmp_path / "fake.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="not a readable safetensors"):
        lora.load_adapter(tmp_path / "fake.safetensors")
    assert not marker.exists()


def test_adapter_for_another_base_is_refused_with_the_module_named(tiny, tmp_path):
    pipe = LuminaPipeline.from_pretrained(str(tiny["model"]), device="cpu")
    renamed = write_random_adapter(tmp_path / "names", tiny["model"], rename={"layers.1.": "layers.7."})
    with pytest.raises(InputError, match=r"target model\.layers\.7\.\w+\.\w+_proj is not a module"):
        pipe.load_lora(renamed)
    bigger = write_tiny_checkpoint(tmp_path / "big", words=WORDS, hidden_size=64, intermediate_size=128)
    other = write_random_adapter(tmp_path / "shapes", bigger)
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.down_proj is 64 -> 32 in this model, "
                                         r"the adapter's is 128 -> 64"):
        pipe.load_lora(other)
    tensors = load_file(str(renamed / lora.ADAPTER_WEIGHTS_FILE))
    tensors["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    (tmp_path / lora.ADAPTER_CONFIG_FILE).write_text((renamed / lora.ADAPTER_CONFIG_FILE).read_text())
    with pytest.raises(InputError, match="is not a LoRA matrix"):
        lora.load_adapter(tmp_path / "extra.safetensors")
    assert pipe.loras == [] and not lora.wrapped_names(pipe.transformer)


# --------------------------------------------------------------------------------------------
# ComfyUI node (plain Python here; the real ModelPatcher in the comfyui-marked test below)

@pytest.fixture
def lora_models_dir(tiny, tmp_path, monkeypatch):
    models = tmp_path / "models"
    write_random_adapter(models / "loras" / "fox", tiny["model"], std=0.3)
    write_random_adapter(models / "loras" / "sky", tiny["model"], seed=5, std=0.3)
    monkeypatch.setenv("LUMINA_MGPT2_MODELS", str(models))
    return models


def import_pack():
    """The repository imported as ComfyUI imports it (tests/workflow_tools.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("workflow_tools", REPO / "tests" / "workflow_tools.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    return tools.import_pack()


def test_lora_node_lists_files_stacks_and_leaves_the_input_pipe_alone(tiny, lora_models_dir):
    pack = import_pack()
    node = pack.NODE_CLASS_MAPPINGS["LuminaMGPT2LoRA"]()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LuminaMGPT2LoRA"] == "Lumina-mGPT 2.0 LoRA"
    names = node.INPUT_TYPES()["required"]["lora_name"][0]
    # The user's files, and the demo adapter the pack ships (lumina_core/assets/demo_loras).
    assert names == ["demo_bar/adapter_model.safetensors", "fox/adapter_model.safetensors",
                     "sky/adapter_model.safetensors"]
    names = names[1:]
    pipe = importlib.import_module(pack.__name__ + ".lumina_core.pipeline").LuminaPipeline.from_pretrained(
        str(tiny["model"]), device="cpu")
    ids = ids_batch()
    with torch.no_grad():
        base = pipe.transformer(ids)
    (one,) = node.apply(pipe, names[0], 0.8)
    (two,) = node.apply(one, names[1], -0.3)
    assert pipe.loras == [] and [s for _, s in one.loras] == [0.8] and [s for _, s in two.loras] == [0.8, -0.3]
    with torch.no_grad():
        two.apply_loras()
        expected = manual_logits(tiny["model"], [(lora_models_dir / "loras" / "fox", 0.8),
                                                  (lora_models_dir / "loras" / "sky", -0.3)], ids)
        assert torch.allclose(two.transformer(ids), expected, rtol=1e-4, atol=1e-4)
        pipe.apply_loras()
        assert torch.equal(pipe.transformer(ids), base)
    error = importlib.import_module(pack.__name__ + ".nodes.common").NodeInputError
    with pytest.raises(error, match="is not in models/loras"):
        node.apply(pipe, "../../etc/passwd", 1.0)
    with pytest.raises(error, match="out of range"):
        node.apply(pipe, names[0], 25.0)


COMFYUI = os.environ.get("COMFYUI_PATH", "")


@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.skipif(not COMFYUI, reason="COMFYUI_PATH is not set (a ComfyUI checkout)")
def test_lora_node_through_comfyui_model_patcher(tiny, tmp_path):
    """In a process running ComfyUI's own model management (CPU): the node's clone patches on load,
    and loading the base again (or a clone at another strength) restores / swaps without a reload."""
    write_random_adapter(tmp_path / "models" / "loras" / "fox", tiny["model"], std=0.3)
    script = REPO / "tests" / "lora_comfyui_check.py"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, str(script), str(tiny["model"]), str(tmp_path / "models")],
                          env={**child_env(), "COMFYUI_PATH": COMFYUI}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["patched_is_lora"] and result["base_restored"] and result["base_weights_unchanged"]
    assert result["lora_matches_lumina_core"] < 1e-5 and result["strength_change_differs"] > 1e-4
