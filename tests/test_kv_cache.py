"""The KV cache's storage (fp8 / bf16 / the activation dtype), its byte count, the fused fp8 attention,
and the decode vocabulary (the embedding and lm_head rows decoding meets), on the official oracle."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lumina_core import kv_cache as kv_cache_module
from lumina_core.config import ModelConfig
from lumina_core.errors import InputError
from lumina_core.kv_cache import FP8_KV_DTYPE, KVCache, fused_fp8_attention, kv_storage_dtype, quantize_fp8
from lumina_core.sampling import SamplingConfig
from lumina_core.sampling.ar import decode_ar
from lumina_core.sampling.sjd import decode_sjd
from lumina_core.sampling.state import CFGBatch, DecodeJob
from lumina_core.sampling.step import compile_step
from lumina_core.weights import load_transformer

FIXTURES = Path(__file__).parent / "fixtures"
ORACLE = FIXTURES / "oracle_lm_tiny"
SHARED_ORACLE = Path("/work/shared/reference/oracle/lm_tiny")  # the same checkpoint as shipped with the reference
# The oracle's ids (its README): image start, new line, image end; official image codes 155000..171383.
IMAGE_START, NEW_LINE, IMAGE_END, CODE_OFFSET, NUM_CODES = 151665, 151670, 151666, 155000, 16384
FP8 = FP8_KV_DTYPE


@pytest.fixture(scope="module")
def oracle():
    return torch.load(ORACLE / "cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_model():
    return load_transformer(ORACLE, dtype=torch.float32)


# --- the setting -------------------------------------------------------------------------------
def test_kv_cache_setting_is_validated():
    assert SamplingConfig().kv_cache == "auto"
    with pytest.raises(ValueError, match=r"kv_cache must be one of \['auto', 'bf16', 'fp8'\], got 'fp16'"):
        SamplingConfig(kv_cache="fp16")
    with pytest.raises(InputError, match="unknown kv_cache 'int8'; allowed: auto, bf16, fp8"):
        kv_storage_dtype("int8", torch.float32)


def test_auto_is_the_activation_dtype_unless_a_plan_chose():
    assert kv_storage_dtype("auto", torch.float32) == torch.float32
    assert kv_storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_storage_dtype("auto", torch.bfloat16, planned="fp8") == torch.float8_e4m3fn
    assert kv_storage_dtype("auto", torch.float32, planned="bf16") == torch.bfloat16
    assert kv_storage_dtype("bf16", torch.float32) == torch.bfloat16
    assert kv_storage_dtype("fp8", torch.float32, planned="bf16") == torch.float8_e4m3fn  # an explicit choice wins


def test_fp8_on_a_torch_without_float8(monkeypatch, caplog):
    monkeypatch.setattr(kv_cache_module, "FP8_KV_DTYPE", None)
    with pytest.raises(InputError, match=r"kv_cache='fp8' needs a torch with float8 dtypes .* use kv_cache='bf16' or 'auto'"):
        kv_storage_dtype("fp8", torch.bfloat16)
    with caplog.at_level("WARNING"):
        assert kv_storage_dtype("auto", torch.bfloat16, planned="fp8") == torch.bfloat16  # falls back, says so
    assert "no float8 dtypes" in caplog.text


# --- bytes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("scaled_keys", [False, True])
def test_nbytes_for_is_the_allocation(storage, scaled_keys):
    for config, device, rows, positions in ((ModelConfig.from_pretrained(ORACLE), "cpu", 3, 77),
                                            (ModelConfig.preset("7b"), "meta", 2, 9380)):
        cache = KVCache(config, rows, positions, dtype=torch.bfloat16, device=device, storage=storage,
                        scaled_keys=scaled_keys)
        allocated = sum(t.numel() * t.element_size() for t in cache.tensors())
        assert KVCache.nbytes_for(config, rows, positions, storage, scaled_keys=scaled_keys) == allocated == cache.nbytes
    c7 = ModelConfig.preset("7b")
    bf16 = KVCache.nbytes_for(c7, 2, 9380, torch.bfloat16)
    fp8 = KVCache.nbytes_for(c7, 2, 9380, FP8)
    assert 0.507 < fp8 / bf16 < 0.508  # half, plus one float32 scale per 128-entry value vector


# --- fp8 arithmetic --------------------------------------------------------------------------
def test_fp8_quantization_uses_power_of_two_scales_per_vector():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * torch.logspace(-6, 3, 5)[:, None]  # vectors from 1e-6 to 1e3
    values, scale = quantize_fp8(x, scaled=True)
    assert values.dtype == FP8 and scale.shape == x.shape[:-1]
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())
    amax = values.float().abs().amax(-1)
    assert (amax >= 224).all() and (amax <= 448).all()  # every vector uses e4m3's whole range (224: rounded down)
    rel = ((values.float() * scale[..., None] - x).abs().amax(-1) / x.abs().amax(-1))
    assert rel.max() < 2 ** -4  # half a step of 3 mantissa bits, whatever the vector's magnitude
    unscaled, none = quantize_fp8(x, scaled=False)
    assert none is None and unscaled.float().abs().max() == 448  # saturates instead of overflowing


@pytest.mark.parametrize("storage", [torch.bfloat16, FP8])
def test_cache_with_rollback_and_left_padding(tiny_model, oracle, storage):
    """The CFG batch's row layout over a low-precision cache: a left-padded row equals the unpadded one,
    a rolled-back garbage window leaves no trace, and the logits stay close to the float32 pass."""
    ids = oracle["t2i_full"]["input_ids"]
    pad, split = 3, 20
    batch = torch.cat([torch.cat([ids, ids[:, :pad]], 1), torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)])
    valid = torch.ones_like(batch, dtype=torch.bool)
    valid[1, :pad] = False
    positions = torch.stack([torch.arange(batch.shape[1]), (torch.arange(batch.shape[1]) - pad).clamp(min=0)])
    with torch.no_grad():
        full = tiny_model(ids)
        cache = KVCache(tiny_model.config, 2, 64, storage=storage)
        tiny_model(batch[:, :split], attention_mask=valid[:, :split], position_ids=positions[:, :split], cache=cache)
        tiny_model(torch.full((2, 5), 155123), position_ids=positions[:, split:split + 5], cache=cache)
        cache.rollback(5)
        rest = tiny_model(batch[:, split:], attention_mask=valid[:, split:], position_ids=positions[:, split:], cache=cache)
        clean = KVCache(tiny_model.config, 1, 64, storage=storage)
        tiny_model(ids[:, :split], cache=clean)
        straight = tiny_model(ids[:, split:], cache=clean)
    n = ids.shape[1] - split
    assert (rest[0, :n] - straight[0]).abs().max() < 1e-4
    assert (rest[1, pad:] - straight[0]).abs().max() < 1e-4
    span = (full.amax(-1) - full.amin(-1)).min()
    tolerance = 0.01 if storage == torch.bfloat16 else 0.05
    assert (rest[0, :n] - full[0, split:]).abs().max() < tolerance * span
    assert cache.k[0].dtype == storage and (cache.v_scale is not None) == (storage == FP8)


def test_fused_fp8_attention_compiled_equals_eager():
    """What torch.compile runs for an fp8 cache equals the eager dequantize + SDPA, with GQA, padding and windows."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    fused = torch.compile(fused_fp8_attention, dynamic=False)
    for n, kv_len in ((1, 40), (4, 48)):
        cache = KVCache(config, 2, 64, storage=FP8, scaled_keys=True)
        filled = kv_len - n
        k = torch.randn(2, 2, kv_len, 8) * torch.logspace(-3, 1, kv_len)[:, None]
        v = torch.randn(2, 2, kv_len, 8) * torch.logspace(1, -3, kv_len)[:, None]
        cache.write(0, torch.arange(kv_len).expand(2, -1), k, v)
        q = torch.randn(2, 4, n, 8)
        allowed = torch.ones(2, n, kv_len, dtype=torch.bool)
        allowed[1, :, :5] = False  # a left-padded row
        allowed &= torch.arange(kv_len)[None, None] <= filled + torch.arange(n)[None, :, None]
        mask = torch.zeros(2, 1, n, kv_len).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        eager = cache.attend(0, q, mask)
        compiled = fused(q, cache.k[0][:, :, :kv_len], cache.k_scale[0][:, :, :kv_len], cache.v[0][:, :, :kv_len],
                         cache.v_scale[0][:, :, :kv_len], mask)
        assert (compiled - eager).abs().max() < 1e-5, (n, kv_len)


def test_compiled_step_over_an_fp8_cache_uses_the_fused_attention(tiny_model, oracle):
    """The compiled decode step equals the eager one on an fp8 cache, and its graph has no SDPA (no dequantized copy)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = oracle["t2i_full"]["input_ids"]
    outputs = []
    for step in (tiny_model.decode_step, torch.compile(tiny_model.decode_step, backend=recording_backend, dynamic=False),
                 compile_step(tiny_model)):
        cache = KVCache(tiny_model.config, 1, 48, storage=FP8)
        with torch.no_grad():
            tiny_model(ids[:, :30], cache=cache)
            outputs.append(torch.cat([step(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache, kv_len=40)
                                      for t in range(30, 36)], 1))
    assert (outputs[1] - outputs[0]).abs().max() < 1e-5 and (outputs[2] - outputs[0]).abs().max() < 1e-5
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert not any("scaled_dot_product_attention" in t for t in targets)


def test_fp8_cache_runs_plain_and_sjd_with_cfg(tiny_model):
    job = _oracle_job(rows=2, cols=3)
    for sampling in (SamplingConfig(cfg=3.0, top_k=50, seed=4, num_images=2, kv_cache="fp8"),
                     SamplingConfig(cfg=3.0, top_k=50, seed=4, num_images=2, kv_cache="fp8", sjd=True, sjd_window=4)):
        batch = CFGBatch(tiny_model, job, sampling, 2, window=sampling.sjd_window)
        assert batch.cache.storage == FP8
        batch.release()
        decode = decode_sjd if sampling.sjd else decode_ar
        codes, stats = decode(tiny_model, job, sampling, sampling.seeds)
        assert codes.shape == (2, 2, 3) and ((codes >= 0) & (codes < NUM_CODES)).all()


# --- the decode vocabulary --------------------------------------------------------------------
def _oracle_job(rows: int = 3, cols: int = 5, sizes=(151673, 151674)) -> DecodeJob:
    """An image job over the oracle's ids: its t2i prompt, then image start and the two size tokens."""
    prompt = (151643, 100, 2000, 30000, 151672)
    header = (IMAGE_START, *sizes)
    return DecodeJob(cond_prefix=prompt + header, uncond_prefix=header, rows=rows, cols=cols, new_line=NEW_LINE,
                     image_end=IMAGE_END, code_offset=CODE_OFFSET, num_codes=NUM_CODES)


def _with_decode_vocabulary(folder: Path):
    model = load_transformer(folder, dtype=torch.float32)
    model.use_decode_vocabulary([NEW_LINE, IMAGE_END, IMAGE_START, 151673, 151674], CODE_OFFSET, NUM_CODES)
    return model


@pytest.mark.parametrize("folder", [ORACLE, SHARED_ORACLE], ids=["tests/fixtures", "shared/reference"])
def test_decode_vocabulary_keeps_image_logits_bit_identical(folder, oracle):
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine")
    full = load_transformer(folder, dtype=torch.float32)
    split = _with_decode_vocabulary(folder)
    ids = oracle["t2i_full"]["input_ids"]
    with torch.no_grad():
        hidden = full.hidden_states(ids)
        assert torch.equal(split.hidden_states(ids), hidden)
        today = F.linear(hidden, full.lm_head.weight[CODE_OFFSET:CODE_OFFSET + NUM_CODES]).float()
        assert torch.equal(F.linear(hidden, split.decode_vocab.head).float(), today)
        step_ids = torch.tensor([[CODE_OFFSET + 7, NEW_LINE, CODE_OFFSET + NUM_CODES - 1, IMAGE_END, 151674]])
        assert torch.equal(split.decode_vocab.embed_ids(step_ids), full.model.embed_tokens(step_ids))
    for sampling in (SamplingConfig(cfg=3.0, top_k=4096, seed=2, num_images=2),
                     SamplingConfig(cfg=3.0, top_k=4096, seed=2, num_images=2, sjd=True, sjd_window=4)):
        decode = decode_sjd if sampling.sjd else decode_ar
        traces = [], []
        codes = [decode(m, _oracle_job(), sampling, sampling.seeds, trace=t)[0] for m, t in zip((full, split), traces)]
        assert torch.equal(codes[0], codes[1])
        for a, b in zip(*traces):
            assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a, b))  # bit for bit


def test_decode_steps_read_neither_full_table():
    model = _with_decode_vocabulary(ORACLE)
    calls = {"embed_tokens": 0, "lm_head": 0}
    for name in calls:
        module = model.model.embed_tokens if name == "embed_tokens" else model.lm_head
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    for sampling in (SamplingConfig(cfg=3.0, top_k=50, seed=0), SamplingConfig(cfg=3.0, top_k=50, seed=0, sjd=True)):
        calls.update(embed_tokens=0, lm_head=0)
        (decode_sjd if sampling.sjd else decode_ar)(model, _oracle_job(), sampling, sampling.seeds)
        assert calls == {"embed_tokens": 1, "lm_head": 0}  # the prompt's embedding, nothing else
    vocab = model.decode_vocab
    assert vocab.embed.shape == (NUM_CODES + 5, 16) and vocab.head.shape == (NUM_CODES, 16)
    assert vocab.nbytes == vocab.nbytes_for(16, NUM_CODES + 5, NUM_CODES, torch.float32)
    assert not any("decode_vocab" in k for k in model.state_dict())  # the official names stay as they are


def test_a_job_the_decode_vocabulary_cannot_feed_is_refused():
    model = _with_decode_vocabulary(ORACLE)
    job = _oracle_job(sizes=(151673, 151675))  # a size token the vocabulary was not built with
    with pytest.raises(ValueError, match="decode vocabulary lacks"):
        CFGBatch(model, job, SamplingConfig(cfg=3.0), 1, window=1)


def test_bf16_decode_attention_on_cpu_runs_in_float32():
    """One query (a decode step) over a bf16 cache: computed in float32 on CPU, so within bf16 rounding of the exact result."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    cache = KVCache(cfg, 2, 64, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    cache.write(0, torch.arange(40).expand(2, -1), k.bfloat16(), v.bfloat16())
    q = torch.randn(2, 2, 1, 64)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bfloat16)
    got = cache.attend(0, q.bfloat16(), mask)
    exact = F.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, exact.bfloat16())  # float32 math, rounded once
