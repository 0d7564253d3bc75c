"""The transformer against the official code's outputs (tests/fixtures/oracle_lm_tiny), presets and loading errors."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lumina_core import KVCache, ModelConfig, build_transformer, load_transformer
from lumina_core.model import count_parameters

FIXTURES = Path(__file__).parent / "fixtures"
ORACLE = FIXTURES / "oracle_lm_tiny"
CASE_NAMES = ["t2i_full", "uncond_image_only", "t2i_positions_9000", "sjd_cfg_batch"]


@pytest.fixture(scope="module")
def oracle():
    return torch.load(ORACLE / "cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_model():
    return load_transformer(ORACLE, dtype=torch.float32, device="cpu")


def _valid(case):
    mask = case["attention_mask"]
    return torch.ones_like(case["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_logits_match_official(tiny_model, oracle, name):
    case = oracle[name]
    with torch.no_grad():
        logits = tiny_model(case["input_ids"], attention_mask=case["attention_mask"], position_ids=case["position_ids"])
    assert logits.dtype == torch.float32
    valid = _valid(case)
    probe = logits[..., oracle["vocab_probe_ids"]]
    ref = case["eager"]
    assert (probe - ref["logits_probe"])[valid].abs().max() < 1e-4
    assert (torch.logsumexp(logits, -1) - ref["logsumexp"])[valid].abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1)[valid], ref["argmax"][valid])
    if ref["logits_last_full"] is not None:
        assert (logits[:, -1] - ref["logits_last_full"]).abs().max() < 1e-4


def test_greedy_generation_matches_official(tiny_model, oracle):
    case = oracle["greedy_generate"]
    ids = case["input_ids"]
    cache = KVCache(tiny_model.config, 1, ids.shape[1] + 12)
    out = []
    with torch.no_grad():
        logits = tiny_model(ids, cache=cache, num_logits=1)
        for _ in range(case["output_ids"].shape[1]):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = tiny_model(nxt, cache=cache)
    assert torch.equal(torch.cat(out, 1), case["output_ids"])


def test_cache_with_rollback_and_left_padding_equals_full_pass(tiny_model, oracle):
    ids = oracle["t2i_full"]["input_ids"]
    with torch.no_grad():
        full = tiny_model(ids)
        # Row 1 is the same sequence behind 3 pad tokens; positions count real tokens only.
        pad = 3
        batch = torch.cat([torch.cat([ids, ids[:, :pad]], 1), torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)])
        valid = torch.ones_like(batch, dtype=torch.bool)
        valid[1, :pad] = False
        positions = torch.stack([torch.arange(batch.shape[1]), (torch.arange(batch.shape[1]) - pad).clamp(min=0)])
        cache = KVCache(tiny_model.config, 2, 64)
        split = 20
        tiny_model(batch[:, :split], attention_mask=valid[:, :split], position_ids=positions[:, :split], cache=cache)
        # a speculative window of garbage, then rolled back
        garbage = torch.full((2, 5), 155123)
        tiny_model(garbage, position_ids=positions[:, split:split + 5], cache=cache)
        cache.rollback(5)
        rest = tiny_model(batch[:, split:], attention_mask=valid[:, split:], position_ids=positions[:, split:], cache=cache)
    assert (rest[0, : ids.shape[1] - split] - full[0, split:]).abs().max() < 1e-4
    assert (rest[1] - full[0, split - pad:]).abs().max() < 1e-4
    assert cache.lengths.tolist() == [batch.shape[1], batch.shape[1]]


def test_per_row_rollback(tiny_model, oracle):
    ids = oracle["t2i_full"]["input_ids"].expand(2, -1)
    with torch.no_grad():
        full = tiny_model(ids)
        cache = KVCache(tiny_model.config, 2, 64)
        tiny_model(ids[:, :30], cache=cache)
        cache.rollback(torch.tensor([0, 4]))  # row 1 rejects 4 tokens
        out0 = tiny_model(ids[:1, 30:31].expand(2, 1).clone(), cache=cache)
    assert (out0[0, 0] - full[0, 30]).abs().max() < 1e-4
    assert (out0[1, 0] - full[0, 26]).abs().max() > 1e-3  # row 1 now sees a different context
    assert cache.lengths.tolist() == [31, 27]


def test_cache_pointer_moves_in_place_and_the_graph_step_runs_eagerly_on_cpu(tiny_model, oracle):
    """A CUDA graph captured over a decode step keeps reading the cache's pointer tensor, so forward
    and rollback must move that very tensor; off CUDA, CUDAGraphStep is the plain step."""
    from lumina_core.sampling.step import CUDAGraphStep

    ids = oracle["t2i_full"]["input_ids"]
    cache = KVCache(tiny_model.config, 1, 64)
    pointer = cache.lengths
    step = CUDAGraphStep(tiny_model.hidden_states)
    with torch.no_grad():
        tiny_model(ids[:, :10], cache=cache)
        cache.rollback(3)
        hidden = step(ids[:, 7:9], position_ids=torch.arange(7, 9)[None], cache=cache, kv_len=16)
        expected = tiny_model.hidden_states(ids[:, :9])[:, 7:9]
    assert cache.lengths is pointer and pointer.tolist() == [9]
    assert not step.graphs and step.captures == 0
    assert (hidden - expected).abs().max() < 1e-4


def _read_keys(path):
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            out[name] = tuple(json.loads(shape))
    return out


@pytest.mark.parametrize("preset,params", [("7b", 7_880_273_920), ("2b", 2_849_617_920)])
def test_presets_match_official_key_lists(preset, params):
    with torch.device("meta"):
        model = build_transformer(ModelConfig.preset(preset))
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names == _read_keys(FIXTURES / f"keys_{preset}.txt")
    assert count_parameters(model) == params
    assert all(p.device.type == "meta" for p in model.parameters())


def test_config_reads_official_json_and_ignores_extras(tmp_path):
    data = json.loads((ORACLE / "config.json").read_text())
    cfg = ModelConfig.from_pretrained(ORACLE)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (171385, 16, 2, 8)
    assert "vocabulary_map" in data and "vq_config" in data
    roundtrip = ModelConfig.from_dict(cfg.to_hf_dict())
    assert roundtrip == cfg


def test_unsupported_config_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="swin_norm"):
        ModelConfig.from_dict({"swin_norm": True})
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="allowed"):
        ModelConfig.preset("13b")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_transformer(tmp_path, dtype=torch.float32)


def test_folder_without_weights(tmp_path):
    shutil.copy(ORACLE / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_transformer(tmp_path, dtype=torch.float32)


def test_truncated_shard(tmp_path):
    shutil.copy(ORACLE / "config.json", tmp_path / "config.json")
    data = (ORACLE / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_transformer(tmp_path, dtype=torch.float32)


def test_mismatched_keys_are_named(tmp_path):
    shutil.copy(ORACLE / "config.json", tmp_path / "config.json")
    tensors = load_file(ORACLE / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_transformer(tmp_path, dtype=torch.float32)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.1.mlp.extra.weight" in msg
    assert re.search(r"1 missing keys .* 1 unexpected keys", msg)


def test_shape_mismatch_is_named(tmp_path):
    cfg = json.loads((ORACLE / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ORACLE / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), config.json implies"):
        load_transformer(tmp_path, dtype=torch.float32)


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_model):
    shutil.copy(ORACLE / "config.json", tmp_path / "config.json")
    tensors = load_file(ORACLE / "model.safetensors")
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_transformer(tmp_path, dtype=torch.float32)
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(tiny_model.state_dict().items())):
        assert torch.equal(a, b), k
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_transformer(tmp_path, dtype=torch.float32)


def test_bf16_load_close_to_fp32(oracle):
    model = load_transformer(ORACLE, dtype=torch.bfloat16)
    case = oracle["t2i_full"]
    with torch.no_grad():
        logits = model(case["input_ids"])
    assert logits.dtype == torch.float32
    assert (logits[..., oracle["vocab_probe_ids"]] - case["eager"]["logits_probe"]).abs().max() < 0.25
