"""Quantization: any module (a whole transformer or one decoder layer), lm_head kept, kernel choice, fallback, errors."""
import logging

import pytest
import torch
from torch import nn

from lumina_core import quant
from lumina_core.config import ModelConfig
from lumina_core.model import build_transformer
from lumina_core.quant import (KERNELS, OPTIONAL_PACKAGES, QUANT_MODES, Kernel, check_quant, choose_kernels,
                               installed_packages, quantize_module)


def _tiny_transformer(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    return build_transformer(cfg).eval()


def _is_plain(linear: nn.Linear) -> bool:
    return type(linear.weight.data) is torch.Tensor


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_one_decoder_layer_as_the_streaming_loader_does(quant):
    model = _tiny_transformer()
    layer = model.model.layers[0]
    ids = torch.arange(1, 6)[None]
    with torch.no_grad():
        before = model.hidden_states(ids)
    quantize_module(layer, quant, device="cpu")
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    assert linears and not any(_is_plain(m) for m in linears)
    assert all(_is_plain(m) for m in model.model.layers[1].modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        after = model.hidden_states(ids)
    # Weight-only quantization of one layer moves the output a little, not a lot.
    assert 0 < (after - before).abs().max() < 0.25 * before.abs().max()


def test_whole_transformer_keeps_lm_head_high_precision():
    model = _tiny_transformer()
    quantize_module(model, "int8")
    assert _is_plain(model.lm_head)
    assert not _is_plain(model.model.layers[1].mlp.down_proj)


def test_quant_errors_are_named():
    assert QUANT_MODES == ("int8", "int4", "fp8")
    with pytest.raises(ValueError, match="unknown quant 'fp3'"):
        check_quant("fp3", "cpu", torch.float32)
    with pytest.raises(ValueError, match="not on mps"):
        check_quant("int8", "mps", torch.float32)
    odd = nn.Sequential(nn.Linear(100, 128))
    with pytest.raises(ValueError, match="divisible by 128"):
        quantize_module(odd, "int4")


def _names(kernels):
    return [k.name for k in kernels]


def test_kernel_choice_follows_gpu_capability_and_installed_packages():
    # An H200-class GPU (sm90) with both optional packages: GemLite first, then the fallbacks.
    assert _names(choose_kernels("int4", "cuda", (9, 0), {"gemlite", "fbgemm-gpu-genai"})) == [
        "int4-gemlite", "int4-preshuffled", "int4-tile-packed"]
    # fbgemm's preshuffled kernels need sm90: an A100 (sm80) with only fbgemm gets torch's tinygemm.
    assert _names(choose_kernels("int4", "cuda", (8, 0), {"fbgemm-gpu-genai"})) == ["int4-tile-packed"]
    assert _names(choose_kernels("int4", "cuda", (9, 0), ())) == ["int4-tile-packed"]
    with pytest.raises(ValueError, match="needs sm80"):
        choose_kernels("int4", "cuda", (7, 5), {"gemlite"})
    # fp8 matmuls need sm89 (Ada, Hopper); older GPUs keep fp8 weights and compute in bf16.
    assert _names(choose_kernels("fp8", "cuda", (8, 9))) == ["fp8-rowwise", "fp8-weight-only"]
    assert _names(choose_kernels("fp8", "cuda", (8, 0))) == ["fp8-weight-only"]
    assert _names(choose_kernels("int4", "cpu", None, {"gemlite"})) == ["int4-intx"]
    assert _names(choose_kernels("int8", "cpu")) == ["int8-weight-only"]
    with pytest.raises(ValueError, match="not on mps"):
        choose_kernels("fp8", "mps")


def test_every_kernel_has_a_torchao_config_and_extras_name_its_packages():
    import tomllib
    from pathlib import Path

    for kernel in KERNELS:
        if kernel.package is None:  # optional-package configs import their package only when used
            assert kernel.config() is not None
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    listed = {req.split(">")[0].split("=")[0].strip() for req in extras["cuda-kernels"]}
    assert set(OPTIONAL_PACKAGES) <= listed and installed_packages(["surely-not-installed-pkg"]) == frozenset()


def test_fp8_weights_on_cpu_and_the_choice_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(quant, "_logged", set())  # the choice is logged once per process: forget earlier tests'
    model = _tiny_transformer()
    ids = torch.arange(1, 6)[None]
    with torch.no_grad():
        before = model.hidden_states(ids)
    with caplog.at_level(logging.INFO, logger="lumina_core.quant"):
        assert quantize_module(model, "fp8") == "fp8-weight-only"
    assert not _is_plain(model.model.layers[0].self_attn.q_proj) and _is_plain(model.lm_head)
    with torch.no_grad():
        assert (model.hidden_states(ids) - before).abs().max() < 0.25 * before.abs().max()
    assert any("fp8-weight-only" in r.getMessage() for r in caplog.records)


def test_a_failing_kernel_falls_back_to_the_next_with_a_warning(monkeypatch, caplog):
    broken = Kernel("int8-broken", "int8", "cpu", "a kernel without a torchao config")
    monkeypatch.setattr(quant, "KERNELS", (broken,) + quant.KERNELS)
    model = _tiny_transformer()
    with caplog.at_level(logging.WARNING, logger="lumina_core.quant"):
        assert quantize_module(model.model.layers[0], "int8") == "int8-weight-only"
    assert any("int8-broken failed" in r.getMessage() and "falling back to int8-weight-only" in r.getMessage()
               for r in caplog.records)
    assert not _is_plain(model.model.layers[0].mlp.up_proj)
    with pytest.raises(ValueError, match="cannot run"):
        quantize_module(model.model.layers[1], "int8", kernel="int4-gemlite")
