"""The one reader/writer of official folders: index checks, shard confinement, dtype checks, streaming quantized load."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lumina_core.config import ModelConfig
from lumina_core.errors import InputError
from lumina_core.model import build_transformer
from lumina_core.weights import (CheckpointError, INDEX_FILE, checkpoint_files, load_transformer, read_state_dict,
                                 save_transformer)

ORACLE = Path(__file__).parent / "fixtures" / "oracle_lm_tiny"


def sharded_copy(folder: Path, weight_map_of=lambda names, files: dict(zip(names, files))) -> dict:
    """The oracle split into two shards with an index whose weight_map `weight_map_of` builds."""
    shutil.copy(ORACLE / "config.json", folder / "config.json")
    tensors = load_file(ORACLE / "model.safetensors")
    names = sorted(tensors)
    files = []
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / name)
        files += [name] * len(part)
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map_of(names, files)}))
    return tensors


# --- issue 15 item 9 (index.json part): one line naming the file -------------------------------
@pytest.mark.parametrize("index_text, expected", [
    ('{"weight_map": ["model-00001-of-00002.safetensors"]}', "'weight_map' must be an object .* found list"),
    ('{"metadata": {}}', "'weight_map' must be an object .* found none"),
    ('["weight_map"]', "'weight_map' must be an object"),
    ('{"weight_map": {"lm_head.weight": 7}}', "shard of 'lm_head.weight' must be a file name, found 7"),
    ('{"weight_map": ', "is not valid JSON"),
])
def test_issue15_item9_bad_index_names_the_file(tmp_path, index_text, expected):
    sharded_copy(tmp_path)
    (tmp_path / INDEX_FILE).write_text(index_text)
    with pytest.raises(InputError, match=expected) as err:
        load_transformer(tmp_path, dtype=torch.float32)
    message = str(err.value)
    assert str(tmp_path / INDEX_FILE) in message and "\n" not in message


def test_issue15_item9_index_not_utf8(tmp_path):
    sharded_copy(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(b'{"weight_map": {"\xff\xfe": 1}}')
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE} is not UTF-8"):
        checkpoint_files(tmp_path)


# --- issue 15 item 10: shard names only inside the folder --------------------------------------
@pytest.mark.parametrize("outside", ["/etc/passwd", "../base/model.safetensors", "sub/model.safetensors",
                                     "..", "C:\\Windows\\model.safetensors", "model-00001-of-00002.bin"])
def test_issue15_item10_shards_only_inside_the_folder(tmp_path, monkeypatch, outside):
    folder = tmp_path / "model"
    folder.mkdir()
    base = tmp_path / "base"
    base.mkdir()
    tensors = sharded_copy(folder, lambda names, files: {n: (outside if n == "lm_head.weight" else f)
                                                         for n, f in zip(names, files)})
    save_file(tensors, base / "model.safetensors")  # a real, loadable file outside the folder
    opened = []
    import safetensors

    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: opened.append(str(self)) or real_read_text(self, *a, **k))
    with pytest.raises(CheckpointError, match="is not a .safetensors file name inside the model folder"):
        load_transformer(folder, dtype=torch.float32)
    assert not [p for p in opened if "passwd" in p or "base" in Path(p).parts or "safetensors" in Path(p).suffix]


# --- issue 15 item 12: non-floating tensors are refused, not cast ------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool])
def test_issue15_item12_integer_tensor_refused(tmp_path, dtype):
    shutil.copy(ORACLE / "config.json", tmp_path / "config.json")
    tensors = load_file(ORACLE / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    stored = {torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.bool: "BOOL"}[dtype]
    with pytest.raises(CheckpointError, match=f"model.layers.1.mlp.up_proj.weight is stored as {stored}; "
                                              "weights must be floating point"):
        load_transformer(tmp_path, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="stored as"):
        read_state_dict(tmp_path)


def test_float16_and_bfloat16_files_load(tmp_path):
    model = load_transformer(ORACLE, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        save_transformer(model, tmp_path / str(dtype), dtype=dtype)
        again = load_transformer(tmp_path / str(dtype), dtype=torch.float32)
        for (name, a), b in zip(again.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b.to(dtype).float()), name


# --- the writer ---------------------------------------------------------------------------------
def test_writer_round_trip_single_and_sharded(tmp_path):
    model = load_transformer(ORACLE, dtype=torch.float32)
    folder = tmp_path / "out"
    save_transformer(model, folder, dtype=torch.float32, max_shard_bytes=200_000)
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == [p.name for p in checkpoint_files(folder)]
    first = load_file(folder / shards[0])
    assert "model.embed_tokens.weight" in first  # official order: embeddings first, lm_head last
    assert "lm_head.weight" in load_file(folder / shards[-1])
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    sharded = read_state_dict(folder)
    assert all(torch.equal(sharded[k], v) for k, v in model.state_dict().items())
    # Rewriting as one file removes the shards and the index of the earlier write.
    save_transformer(model, folder, dtype=torch.float32)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
    assert all(torch.equal(load_transformer(folder, dtype=torch.float32).state_dict()[k], v)
               for k, v in model.state_dict().items())


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist .*hub\.resolve_model"):
        load_transformer(tmp_path / "nope")


# --- issue 12 item 3: streaming quantized load -------------------------------------------------
def test_streaming_int8_load_matches_quantizing_after(tmp_path):
    """Quantizing layer by layer during the load gives the same model as quantizing the loaded model."""
    from lumina_core.quant import quantize_module, weight_bytes

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    save_transformer(build_transformer(cfg), tmp_path, dtype=torch.bfloat16)
    streamed = load_transformer(tmp_path, dtype=torch.bfloat16, quant="int8")
    after = load_transformer(tmp_path, dtype=torch.bfloat16)
    quantize_module(after, "int8")
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        assert torch.equal(streamed(ids), after(ids))
    assert weight_bytes(streamed) == weight_bytes(after)
    assert type(streamed.model.layers[0].mlp.up_proj.weight.data) is not torch.Tensor  # quantized
    assert type(streamed.lm_head.weight.data) is torch.Tensor  # lm_head stays high precision


STREAM_CHILD = """
import json, os, sys, torch
torch.set_num_threads(1)
from lumina_core.testing.rss import anon_rss_bytes
from lumina_core.weights import load_transformer
from lumina_core.quant import quantize_module, weight_bytes
from lumina_core.memory import trim_host_heap
# Libraries loaded and torchao's first call made before the baseline: they are not the load's memory.
quantize_module(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(torch.bfloat16), "int8")
trim_host_heap()
folder, quant = FOLDER, QUANT
before = anon_rss_bytes()
model = load_transformer(folder, dtype=torch.bfloat16, quant=None if quant == "none" else quant)
print(json.dumps({"before": before, "weights": weight_bytes(model)}))
sys.stdout.flush()
os._exit(0)  # the measurement ends here: interpreter teardown is not the run's memory
"""


def test_streaming_int8_load_peak_is_quantized_model_plus_one_layer(tmp_path):
    """Anonymous RSS during an int8 load of a float32 folder: the int8 model + one bf16 layer + torchao's
    float32 working set for one linear, far below the whole bf16 model a load-then-quantize holds.

    A float32 file is converted to bf16 on the way (anonymous memory), so a load that did not stream
    would hold the whole bf16 model next to the int8 one.
    """
    from lumina_core.testing.rss import run_child

    cfg = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
                      num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):
        meta = build_transformer(cfg)
    layer_bf16 = sum(p.numel() * 2 for p in meta.model.layers[0].parameters())
    bf16_model = sum(p.numel() * 2 for p in meta.parameters())
    # torchao computes scales and rounding in float32 with a few temporaries (measured: about 7x
    # the float32 weight of the linear being quantized), freed before the next linear.
    quant_working_set = 10 * cfg.hidden_size * cfg.intermediate_size * 4
    torch.manual_seed(0)
    save_transformer(build_transformer(cfg), tmp_path, dtype=torch.float32)
    root = str(Path(__file__).resolve().parents[1])
    code = STREAM_CHILD.replace("FOLDER", repr(str(tmp_path))).replace("QUANT", repr("int8"))
    run = run_child(code, env={"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    peak, weights = run.peak_anon_bytes - run.result["before"], run.result["weights"]
    assert weights < 0.6 * bf16_model
    bound = weights + layer_bf16 + quant_working_set
    assert weights <= peak < bound < weights + bf16_model / 2, (peak, weights, layer_bf16, bf16_model)
