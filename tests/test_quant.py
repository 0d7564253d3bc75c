"""Weight-only quantization: any module (a whole transformer or one decoder layer), lm_head kept, clear errors."""
import pytest
import torch
from torch import nn

from lumina_core.config import ModelConfig
from lumina_core.model import build_transformer
from lumina_core.quant import QUANT_MODES, check_quant, quantize_module


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
    assert "int8" in QUANT_MODES and "int4" in QUANT_MODES
    with pytest.raises(ValueError, match="unknown quant 'fp3'"):
        check_quant("fp3", "cpu", torch.float32)
    with pytest.raises(ValueError, match="not on mps"):
        check_quant("int8", "mps", torch.float32)
    odd = nn.Sequential(nn.Linear(100, 128))
    with pytest.raises(ValueError, match="divisible by 128"):
        quantize_module(odd, "int4")
