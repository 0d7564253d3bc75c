"""The GPU bench's Python parts on CPU with a tiny shape, so `bench/gpu.sh` runs the first time a GPU is lent."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_decode.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_decode"] = module
    spec.loader.exec_module(module)
    return module


def _args(**overrides):
    args = dict(quant="none", kernel=None, accept=2.2, reps=1, compile=False, cuda_graphs=True, modes="plain,sjd",
                fractions="0.5", linear_table=False, cpu_smoke=True)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_decode_figures_print_every_column(gpu_bench, quant, capsys):
    rows = gpu_bench.decode_figures(_args(quant=quant), torch.device("cpu"))
    assert [r["mode"] for r in rows] == ["plain", "sjd"]
    for row in rows:
        assert row["ms_per_step"] > 0 and row["s_per_image"] > 0 and row["ratio"] > 0
        assert row["kernel"] == ("bf16" if quant == "none" else "fp8-weight-only")
        assert row["graphs"] == 0 and "capture_s" in row  # off CUDA the graph step runs eagerly
    # SJD's image time counts tokens / 2.2 steps, plain's one step per token.
    plain, sjd = rows
    assert plain["s_per_image"] / plain["ms_per_step"] == pytest.approx(2.2 * sjd["s_per_image"] / sjd["ms_per_step"])
    out = capsys.readouterr().out
    assert "s/image" in out and "bandwidth limit" in out and "peak" in out


def test_bandwidth_limit_counts_stored_weights_and_the_kv_cache(gpu_bench):
    model = gpu_bench.make_model(torch.device("cpu"), tiny=True)
    job = gpu_bench.job_768(rows=8)
    c = model.config
    linears = sum(p.numel() for n, p in model.named_parameters() if "layers" in n or n == "model.norm.weight") * 2
    head = gpu_bench.NUM_CODES * c.hidden_size * 2
    kv = 100 * 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    assert gpu_bench.bytes_per_step(model, job, 100) == pytest.approx(linears + head + kv)
    from lumina_core.quant import quantize_module
    quantize_module(model, "int8")
    assert gpu_bench.bytes_per_step(model, job, 100) < 0.6 * (linears + head + kv) + head


def test_linear_table_covers_every_kernel_at_2_and_32_rows(gpu_bench, capsys):
    rows = gpu_bench.linear_table(torch.device("cpu"), reps=1, tiny=True)
    kernels = {r["kernel"] for r in rows}
    assert {"bf16", "int8-weight-only", "int4-intx", "fp8-weight-only"} <= kernels
    assert {r["rows"] for r in rows} == {2, 32}
    assert "| kernel |" in capsys.readouterr().out


def test_gpu_script_calls_only_existing_options():
    script = (BENCH.parent / "gpu.sh").read_text()
    for flag in ("--quant", "--cuda-graphs", "--reps", "--linear-table", "--compile"):
        assert flag in script and flag in BENCH.read_text()


@pytest.mark.parametrize("base", ["bf16", "int8"])
def test_lora_memory_step_runs_and_reports_the_estimate(base, capsys):
    """bench/gpu_lora.py on a tiny model on CPU: the same attach_lora, two optimizer steps, one JSON line."""
    import json

    spec = importlib.util.spec_from_file_location("gpu_lora", BENCH.parent / "gpu_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--config", "tiny", "--device", "cpu", "--size", "64", "--base", base, "--offload-activations"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == out and out["measured_peak_GiB"] is None   # no allocator peak on CPU
    from lumina_core.request import Request

    assert out["seq_len"] == Request(task="t2i", prompt="x", width=64, height=64).image_tokens + 128
    assert out["estimate_parts_GiB"]["host_checkpointed_inputs"] >= 0 and 0 < out["loss"] < 20
    script = (BENCH.parent / "gpu.sh").read_text()
    assert "bench/gpu_lora.py --base bf16" in script and "bench/gpu_lora.py --base int8 --offload-activations" in script
