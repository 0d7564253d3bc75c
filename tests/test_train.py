"""Training: prepare (shards, bad items, resume), the official loss, fit, exact resume, export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lumina_core.model import build_transformer
from lumina_core.weights import load_transformer
from lumina_core.testing.checkpoints import TINY_MOVQGAN_FILE, write_tiny_checkpoint
from lumina_core.testing.grammar import codes_from_ids
from lumina_core.tokens import TokenLayout, load_text_tokenizer
from lumina_core.train import (FitOptions, SampleOrder, TokenDataset, causal_lm_loss, export_official, fit, make_sample,
                               prepare)
from lumina_core.train import data as train_data
from lumina_core.train.__main__ import main as cli_main
from lumina_core.train.checkpoint import MODEL_FILE, checkpoint_tensor_names, latest_checkpoint, read_checkpoint_tensors
from lumina_core.testing.items import write_smooth_t2i_items

WORDS = "a red fox blue sky green tree"
GOOD_ITEMS = 8  # 6 t2i + 2 dual-panel


def write_dataset(root: Path) -> Path:
    """Tiny images made with PIL plus one bad item of every kind; returns the JSONL description."""
    rng = np.random.default_rng(0)
    items = write_smooth_t2i_items(root, rng)
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(root / "tall.png")
    items.append({"task": "pair_depth", "prompt": "blue sky", "image": "img0.png", "second_image": "img1.png"})
    items.append({"task": "control_canny", "prompt": "green tree", "image": "img2.png", "second_image": "tall.png"})
    # Bad items: missing file, unreadable image, size off the grid (explicit and too small), broken JSON.
    items.append({"task": "t2i", "prompt": "gone", "image": "missing.png"})
    (root / "broken.png").write_bytes(b"this is not a png")
    items.append({"task": "t2i", "prompt": "broken", "image": "broken.png"})
    items.append({"task": "t2i", "prompt": "off grid", "image": "img0.png", "width": 40, "height": 32})
    Image.fromarray(np.zeros((16, 64, 3), dtype=np.uint8)).save(root / "thin.png")
    items.append({"task": "t2i", "prompt": "thin", "image": "thin.png"})
    items.append({"task": "pair_depth", "prompt": "no lower panel", "image": "img0.png"})
    lines = [json.dumps(x) for x in items] + ["{not json"]
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir = write_tiny_checkpoint(root / "model", words=WORDS, num_image_codes=64, max_grids=16)
    description = write_dataset(root)
    summary = prepare(description, root / "prep", model_dir, model_dir / TINY_MOVQGAN_FILE, target_size=64,
                      shard_size=3, progress=False)
    return {"root": root, "model": model_dir, "description": description, "prep": root / "prep",
            "summary": summary}


def fit_options(setup, out: Path, **overrides) -> FitOptions:
    values = dict(data=str(setup["prep"]), out=str(out), init_from=str(setup["model"]), steps=6, lr=1e-2,
                  min_lr=1e-3, warmup_steps=2, micro_batch=2, accum=2, max_seq_len=256, dropout=0.1,
                  precision="fp32", save_every=100, uncond_prob=0.25, seed=3)
    values.update(overrides)
    return FitOptions(**values)


def read_log(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


# --------------------------------------------------------------------------------------------
# prepare

def test_prepare_reports_every_bad_item_and_keeps_going(setup):
    s = setup["summary"]
    assert (s.items, s.written, s.bad) == (GOOD_ITEMS + 6, GOOD_ITEMS, 6)
    assert s.bad_by_kind == {"missing_file": 1, "unreadable_image": 1, "size_off_grid": 2,
                             "missing_second_image": 1, "bad_json": 1}
    bad = [json.loads(line) for line in (setup["prep"] / "bad_items.jsonl").read_text().splitlines()]
    by_kind = {b["kind"]: b for b in bad}
    assert by_kind["missing_file"]["file"].endswith("missing.png")
    assert by_kind["unreadable_image"]["file"].endswith("broken.png")
    assert "not a multiple of 32" in next(b["reason"] for b in bad if b["item"] == 10)
    assert "smaller than one 32-px grid" in next(b["reason"] for b in bad if b["item"] == 11)
    assert by_kind["bad_json"]["file"].endswith("data.jsonl") and "line 14" in by_kind["bad_json"]["reason"]
    assert all(b["reason"] for b in bad)


def test_records_follow_the_inference_grammar(setup):
    tokenizer = load_text_tokenizer(setup["model"])
    layout = TokenLayout.from_tokenizer(tokenizer)
    ds = TokenDataset(setup["prep"])
    assert len(ds) == GOOD_ITEMS
    shapes = []
    for i in range(len(ds)):
        ids, prompt_len = ds[i]
        assert ids[0] == layout.bos and ids[prompt_len - 1] == layout.separator and ids[-1] == layout.separator
        shapes.append(tuple(codes_from_ids(layout, ids[prompt_len:-1]).shape))
    # 32x32 images with target 64: the official crop list picks 64x64; dual panels (half the area
    # each) keep 32x32, stacked into one 32 wide x 64 high image.
    assert shapes[:6] == [(8, 8)] * 6 and shapes[6:] == [(8, 4)] * 2
    text = tokenizer.decode(ds[6][0][1:ds[6][1] - 1].tolist())
    assert "dual - panel" in text or "dual-panel" in text
    assert "32x64" in text.replace(" ", "")


def test_dual_panel_codes_are_each_panel_encoded_alone(setup):
    """Inference encodes a reference panel on its own; training data must hold the same codes."""
    from lumina_core.images import pil_to_tensor
    from lumina_core.movqgan import load_movqgan

    movq = load_movqgan(setup["model"] / TINY_MOVQGAN_FILE)
    layout = TokenLayout.from_tokenizer(load_text_tokenizer(setup["model"]))
    ids, prompt_len = TokenDataset(setup["prep"])[6]  # pair_depth: img0 above img1, 32x32 panels
    codes = codes_from_ids(layout, ids[prompt_len:-1])
    upper = movq.encode(pil_to_tensor(Image.open(setup["root"] / "img0.png").convert("RGB"))[None])[0]
    lower = movq.encode(pil_to_tensor(Image.open(setup["root"] / "img1.png").convert("RGB"))[None])[0]
    assert torch.equal(codes[:4], upper) and torch.equal(codes[4:], lower)


def test_group_by_length_fills_batches_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = torch.from_numpy(np.where(rng.random(1000) < 0.5, 100, 190))
    plain = SampleOrder(1000, seed=1, uncond_prob=0.0)
    grouped = SampleOrder(1000, seed=1, uncond_prob=0.0, lengths=lengths, group_size=10)
    for order in (plain, grouped):
        epoch = [order.sample_at(p)[0] for p in range(1000)]
        assert sorted(epoch) == list(range(1000))  # every sample once per epoch
    def padded(order):  # tokens computed when each batch is padded to its longest sample
        idx = torch.tensor([order.sample_at(p)[0] for p in range(1000)]).view(100, 10)
        return int(lengths[idx].max(1).values.sum() * 10)
    assert padded(grouped) <= 0.8 * padded(plain)
    assert padded(grouped) < int(lengths.sum()) * 1.05
    again = SampleOrder(1000, seed=1, uncond_prob=0.0, lengths=lengths, group_size=10)
    assert [again.sample_at(p) for p in range(50)] == [grouped.sample_at(p) for p in range(50)]


def test_prepare_resumes_after_a_crash(setup, tmp_path, monkeypatch):
    real = train_data.tokenize_item
    calls = {"n": 0}

    def crashing(item, tk):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # a killed process: not a bad item
        return real(item, tk)

    monkeypatch.setattr(train_data, "tokenize_item", crashing)
    args = (setup["description"], tmp_path / "prep", setup["model"], setup["model"] / TINY_MOVQGAN_FILE)
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, target_size=64, shard_size=3, progress=False)
    index = json.loads((tmp_path / "prep" / "index.json").read_text())
    assert index["items_done"] == 3 and index["num_records"] == 3  # one complete shard survived
    monkeypatch.setattr(train_data, "tokenize_item", real)
    summary = prepare(*args, target_size=64, shard_size=3, progress=False)
    assert summary == setup["summary"]
    a, b = TokenDataset(setup["prep"]), TokenDataset(tmp_path / "prep")
    assert len(a) == len(b) and torch.equal(a.prompt_lengths, b.prompt_lengths)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_sizeless_prompt_option(setup, tmp_path):
    description = tmp_path / "two.json"
    description.write_text(json.dumps([{"prompt": "red fox", "image": str(setup["root"] / f"img{i}.png")}
                                       for i in range(2)]))
    prepare(description, tmp_path / "prep", setup["model"], setup["model"] / TINY_MOVQGAN_FILE, target_size=32,
            progress=False, sizeless_prompt_prob=1.0)
    tokenizer = load_text_tokenizer(setup["model"])
    ids, prompt_len = TokenDataset(tmp_path / "prep")[0]
    text = tokenizer.decode(ids[1:prompt_len - 1].tolist()).replace(" ", "")
    expected = train_data.SIZELESS_T2I_TEMPLATE.format(prompt="red fox")
    assert text == expected.lower().replace(" ", "").replace("\n", "")  # the tiny tokenizer lowercases


def test_labels_follow_the_official_rule():
    ids = torch.tensor([1, 10, 11, 9, 100, 105, 105, 200, 201, 150, 101, 9])  # BOS text SEP | image SEP
    tokens, labels = make_sample(ids, 4, unconditional=False)
    assert torch.equal(tokens, ids)
    assert labels[:4].tolist() == [-100] * 4 and torch.equal(labels[4:], ids[4:])
    tokens, labels = make_sample(ids, 4, unconditional=True)
    assert tokens.tolist() == [100, 105, 105, 200, 201, 150, 101] and torch.equal(labels, tokens)


# --------------------------------------------------------------------------------------------
# loss

def test_chunked_loss_equals_the_official_formula():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, 7:] = -100
    loss, parts = causal_lm_loss(hidden, weight, labels, z_loss_weight=1e-2, chunk_size=3)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    # Official: CE over shifted labels (ignore -100, mean) + w * mean(logsumexp^2) over the same positions.
    logits = (hidden @ weight.t()).float()[:, :-1].reshape(-1, 50)
    target = labels[:, 1:].reshape(-1)
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    z = torch.logsumexp(logits[valid], -1).pow(2).mean()
    ref = ce + 1e-2 * z
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6) and torch.allclose(parts["ce"], ce, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], weight.grad, atol=1e-6)


# --------------------------------------------------------------------------------------------
# fit, resume, export

@pytest.fixture(scope="module")
def straight_run(setup):
    out = setup["root"] / "straight"
    result = fit(fit_options(setup, out))
    return out, result


def test_loss_falls(straight_run):
    out, result = straight_run
    assert result.step == 6 and not result.interrupted and len(result.losses) == 6
    log = read_log(out)
    assert set(log) == set(range(1, 7))
    assert log[6]["loss"] < 0.7 * log[1]["loss"], [log[s]["loss"] for s in sorted(log)]
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["grad_norm"]) for r in log.values())
    assert log[1]["lr"] == 0.0 and abs(log[3]["lr"] - 1e-2) < 1e-12  # warm-up, then cosine from the peak


def test_resume_is_exact(setup, straight_run, tmp_path):
    out, _ = straight_run
    # Image samples on the way must not disturb the training RNG streams either.
    samples = dict(sample_every=3, sample_size=32, sample_prompt="red fox")
    first = fit(fit_options(setup, tmp_path, stop_after=3, **samples))
    assert first.step == 3 and latest_checkpoint(tmp_path).name == "step_0000003"
    second = fit(fit_options(setup, tmp_path, **samples))
    assert second.step == 6
    pngs = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert pngs == ["step_0000003.png", "step_0000006.png"]
    assert Image.open(tmp_path / "samples" / pngs[0]).size == (32, 32)
    straight, resumed = read_log(out), read_log(tmp_path)
    for step in range(1, 7):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-6), step
    a = load_file(str(latest_checkpoint(out) / MODEL_FILE))
    b = load_file(str(latest_checkpoint(tmp_path) / MODEL_FILE))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_export_loads_with_identical_logits(setup, straight_run, tmp_path):
    out, _ = straight_run
    ckpt = latest_checkpoint(out)
    trained = load_file(str(ckpt / MODEL_FILE))
    export_official(out, tmp_path / "fp32", dtype=torch.float32, max_shard_bytes=20_000)
    folder = tmp_path / "fp32"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(name.startswith("model-0000") for name in shards)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "chameleon" and config["torch_dtype"] == "float32"
    vocab = load_text_tokenizer(setup["model"]).get_vocab()
    assert config["vocabulary_map"] == vocab and config["dropout"] == 0.1
    model = load_transformer(folder, dtype=torch.float32)
    reference = build_transformer(model.config)
    reference.load_state_dict(trained, strict=True)
    reference.eval()
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    assert torch.equal(model(ids), reference(ids))
    assert load_text_tokenizer(folder).get_vocab() == load_text_tokenizer(setup["model"]).get_vocab()
    # The default bf16 export through the CLI, one shard, MoVQGAN copied in: the pipeline (Loader node) reads it.
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "bf16"), "--movqgan",
                     str(setup["model"] / TINY_MOVQGAN_FILE)]) == 0
    bf16 = load_transformer(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(bf16(ids), reference.to(torch.bfloat16)(ids))
    from lumina_core.pipeline import LuminaPipeline
    from lumina_core.request import Request
    from lumina_core.sampling import SamplingConfig

    pipe = LuminaPipeline.from_pretrained(tmp_path / "bf16", device="cpu", dtype=torch.float32)
    images = pipe.decode(pipe.generate(Request(prompt="red fox", width=32, height=32), SamplingConfig(top_k=8)))
    assert images.shape == (1, 3, 32, 32)


def test_fit_refuses_data_from_another_tokenizer(setup, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other", words="purple cat", num_image_codes=64, max_grids=16)
    with pytest.raises(ValueError, match="another tokenizer"):
        fit(fit_options(setup, tmp_path / "run", init_from=str(other)))


def test_fit_from_config_without_checkpoint(setup, tmp_path):
    config = json.loads((setup["model"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = cli_main(["fit", "--data", str(setup["prep"]), "--out", str(tmp_path / "run"), "--config",
                     str(tmp_path / "config.json"), "--steps", "2", "--precision", "bf16", "--lr", "1e-3",
                     "--max-seq-len", "64"])
    assert code == 0
    log = read_log(tmp_path / "run")
    assert set(log) == {1, 2} and all(np.isfinite(r["loss"]) for r in log.values())
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 2 and state["model_config"]["dropout"] == 0.05


# --------------------------------------------------------------------------------------------
# Processes: SIGTERM and torchrun (slow: each starts fresh Python processes)

REPO = Path(__file__).resolve().parents[1]


def cli_args(opts: FitOptions) -> list[str]:
    args = ["--data", opts.data, "--out", opts.out, "--init-from", opts.init_from, "--steps", str(opts.steps),
            "--lr", str(opts.lr), "--min-lr", str(opts.min_lr), "--warmup-steps", str(opts.warmup_steps),
            "--micro-batch", str(opts.micro_batch), "--accum", str(opts.accum), "--max-seq-len", str(opts.max_seq_len),
            "--dropout", str(opts.dropout), "--precision", opts.precision, "--save-every", str(opts.save_every),
            "--uncond-prob", str(opts.uncond_prob), "--seed", str(opts.seed), "--clip-grad", str(opts.clip_grad),
            "--device", "cpu"]
    return args


def child_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_sigterm_saves_then_resume_continues_exactly(setup, tmp_path):
    import sys

    from lumina_core.testing.processes import sigterm_after_first_log

    opts = fit_options(setup, tmp_path / "killed", steps=500)
    returncode, output = sigterm_after_first_log([sys.executable, "-m", "lumina_core.train", "fit", *cli_args(opts)],
                                                 tmp_path / "killed" / "log.jsonl", child_env(), tmp_path)
    assert returncode == 0, output
    assert "interrupted, checkpoint saved" in output
    ckpt = latest_checkpoint(tmp_path / "killed")
    stopped = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped < 500 and max(read_log(tmp_path / "killed")) == stopped
    # Resume for two more steps; a straight run to the same step must agree.
    fit(fit_options(setup, tmp_path / "killed", steps=500, stop_after=2))
    fit(fit_options(setup, tmp_path / "straight", steps=500, stop_after=stopped + 2))
    a, b = read_log(tmp_path / "killed"), read_log(tmp_path / "straight")
    for step in range(1, stopped + 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-6), step


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a training checkpoint, full or sharded (official names)."""
    return read_checkpoint_tensors(folder, list(checkpoint_tensor_names(folder)))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(setup, tmp_path):
    """2 FSDP ranks x micro-batch 1 == 1 process x 2 accumulation steps; the 2-rank checkpoint is sharded
    (each rank wrote its shard), resumes on 1 process bit-identically and exports to the official layout."""
    import subprocess
    import sys

    # Clipping off (its norm sums shards in another order); halving a sum is exact in binary floating point,
    # so (g0 + g1) / 2 over 2 ranks equals g0 / 2 + g1 / 2 accumulated in one process, bit for bit.
    common = dict(steps=4, micro_batch=1, dropout=0.0, warmup_steps=1, save_every=2, clip_grad=1e9)
    fit(fit_options(setup, tmp_path / "single", accum=2, **common))
    double = fit_options(setup, tmp_path / "fsdp", accum=1, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lumina_core.train", "fit", *cli_args(double), "--stop-after", "2"]
    done = subprocess.run(cmd, env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sharded = latest_checkpoint(tmp_path / "fsdp")
    state = json.loads((sharded / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["global_batch"]) == (2, 2, 2)
    files = sorted(p.name for p in sharded.iterdir())
    assert ".metadata" in files and "__0_0.distcp" in files and "__1_0.distcp" in files, files
    assert MODEL_FILE not in files and "optimizer.pt" not in files  # nothing was gathered into one file
    single_2 = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000002" / MODEL_FILE))
    fsdp_2 = checkpoint_weights(sharded)
    assert set(single_2) == set(fsdp_2) and all(torch.equal(single_2[k], fsdp_2[k]) for k in single_2)
    # The sharded checkpoint exports to the official layout (read one output shard at a time).
    export_official(sharded, tmp_path / "exported", dtype=torch.float32, max_shard_bytes=20_000)
    exported = load_transformer(tmp_path / "exported", dtype=torch.float32).state_dict()
    assert all(torch.equal(exported[k], single_2[k]) for k in single_2)
    # Steps 3-4: the 2-rank checkpoint continues in one process with the same global batch.
    fit(fit_options(setup, tmp_path / "fsdp", accum=2, **common))
    a, b = read_log(tmp_path / "single"), read_log(tmp_path / "fsdp")
    assert set(a) == set(b) == {1, 2, 3, 4}
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
    assert a[4]["loss"] < a[1]["loss"]
    wa = load_file(str(latest_checkpoint(tmp_path / "single") / MODEL_FILE))
    wb = load_file(str(latest_checkpoint(tmp_path / "fsdp") / MODEL_FILE))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture
def one_thread():
    # Convolution backward with 2 threads on 2 shared, busy cores is many times slower than with 1.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_train_vq_writes_a_loadable_tokenizer(setup, tmp_path, one_thread):
    from lumina_core.movqgan import load_movqgan
    from lumina_core.train.vq import VQOptions, train_vq

    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(setup["root"] / "img0.png").save(folder / "only.png")
    # Over-fitting one image: the reconstruction error must fall well below its start.
    opts = VQOptions(images=str(folder), out=str(tmp_path / "run"), steps=20, size=32, batch=2, lr=2e-3,
                     ch=32, ch_mult=(1, 1, 1, 1), n_embed=32, reset_dead_every=0, log_every=1, save_every=10)
    ckpt = train_vq(opts)
    log = [json.loads(line) for line in (tmp_path / "run" / "vq_log.jsonl").read_text().splitlines()]
    assert len(log) == 20
    first, last = np.mean([r["rec"] for r in log[:3]]), np.mean([r["rec"] for r in log[-3:]])
    assert last < 0.5 * first, (first, last)
    movq = load_movqgan(ckpt)
    assert movq.config.n_embed == 32 and movq.config.ch_mult == (1, 1, 1, 1)
    image = torch.from_numpy(np.asarray(Image.open(folder / "only.png"), dtype=np.float32) / 127.5 - 1)
    codes = movq.encode(image.permute(2, 0, 1)[None])
    assert codes.shape == (1, 4, 4) and int(codes.max()) < 32
    assert movq.decode(codes).shape == (1, 3, 32, 32)


def test_train_vq_reports_held_out_reconstruction(setup, tmp_path, one_thread):
    from lumina_core.movqgan import load_movqgan
    from lumina_core.train.vq import EVAL_FILE, VQOptions, train_vq

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.open(setup["root"] / f"img{i}.png").save(folder / f"{i}.png")
    opts = VQOptions(images=str(folder), out=str(tmp_path / "run"), steps=4, size=32, batch=2, ch=32,
                     ch_mult=(1, 1, 1, 1), n_embed=16, embed_dim=8, reset_dead_every=0, eval_images=2)
    movq = load_movqgan(train_vq(opts))
    assert movq.config.embed_dim == 8 and movq.config.z_channels == 8
    report = json.loads((tmp_path / "run" / EVAL_FILE).read_text())
    assert report["images"] == 1 and report["step"] == 4  # a fifth of 6 images at most
    assert 0 < report["psnr_db"] < 60 and 1 <= report["codes_used"] <= 16


def test_train_vq_also_learns_stacked_dual_panel_pairs(setup, tmp_path, one_thread):
    from lumina_core.train.vq import VQOptions, load_pairs, pair_paths, train_vq

    pairs = pair_paths(setup["description"])
    assert [(u.name, l.name) for u, l in pairs] == [("img0.png", "img1.png"), ("img2.png", "tall.png")]
    stacked = load_pairs(pairs, 32)
    assert stacked.shape == (2, 3, 64, 32)
    assert torch.allclose(stacked[0, :, 32:], load_pairs([(pairs[0][1], pairs[0][0])], 32)[0, :, :32])
    opts = VQOptions(images=str(setup["description"]), out=str(tmp_path / "run"), steps=3, size=32, batch=2,
                     ch=32, ch_mult=(1, 1, 1, 1), n_embed=16, reset_dead_every=0, pair_fraction=1.0)
    assert train_vq(opts).is_file()


# --------------------------------------------------------------------------------------------
# Bad input and faults (issue 15 items 5-8): one line and exit 2, resume from what is intact

def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of `python -m lumina_core.train ARGV`, in this process."""
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line and " WARNING " not in line]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def bad_input_cases(setup, tmp_path) -> dict[str, tuple[list[str], str]]:
    """Case -> (argv, a phrase the message must hold)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    model, movq = str(setup["model"]), str(setup["model"] / TINY_MOVQGAN_FILE)
    images = tmp_path / "images"
    images.mkdir()
    Image.open(setup["root"] / "img0.png").save(images / "only.png")
    damaged_vq_run = tmp_path / "damaged_vq_run"
    damaged_vq_run.mkdir()
    (damaged_vq_run / "vq_state.pt").write_bytes(b"PK\x03\x04 cut short")   # an interrupted run's state, cut
    fit_args = ["fit", "--out", str(tmp_path / "run"), "--init-from", model, "--steps", "1"]
    return {
        "fit --data on an empty folder": (fit_args + ["--data", str(empty)], "not a folder written by `prepare`"),
        "fit --data that does not exist": (fit_args + ["--data", str(tmp_path / "nowhere")], "does not exist"),
        "fit --micro-batch 0": (fit_args + ["--data", str(setup["prep"]), "--micro-batch", "0"], "micro_batch"),
        "fit --resume a folder that is no checkpoint": (
            fit_args + ["--data", str(setup["prep"]), "--resume", str(not_a_run)], "cannot resume from it"),
        "export of a folder that is not a run": (["export", str(not_a_run), "--out", str(tmp_path / "x")],
                                                 "is not a training checkpoint"),
        "export of a path that does not exist": (["export", str(tmp_path / "gone"), "--out", str(tmp_path / "x")],
                                                 "does not exist"),
        "prepare --tokenizer nowhere": (["prepare", str(setup["description"]), "--out", str(tmp_path / "p"),
                                         "--tokenizer", "nowhere", "--movqgan", movq], "no tokenizer.json"),
        "prepare --movqgan missing": (["prepare", str(setup["description"]), "--out", str(tmp_path / "p"),
                                       "--tokenizer", model, "--movqgan", str(tmp_path / "m.ckpt")], "no such file"),
        "prepare with the demo's tokenizer and a tiny MoVQGAN": (
            ["prepare", str(setup["description"]), "--out", str(tmp_path / "p"), "--tokenizer", "demo",
             "--movqgan", movq, "--target-size", "64"], "give the pair made together"),
        "vq on an empty folder": (["vq", str(empty), "--out", str(tmp_path / "vq")], "no images found"),
        "vq resuming from a damaged vq_state.pt": (
            ["vq", str(images), "--out", str(damaged_vq_run), "--steps", "2", "--size", "32"],
            "vq_state.pt is truncated or corrupted"),
    }


def test_issue15_item5_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys):
    for case, (argv, phrase) in bad_input_cases(setup, tmp_path).items():
        line = assert_one_line_error(*run_cli(argv, capsys))
        assert phrase in line, (case, line)


def test_issue15_item5_prepare_takes_the_demo_by_name(setup, tmp_path, capsys):
    code, err = run_cli(["prepare", str(setup["description"]), "--out", str(tmp_path / "p"), "--tokenizer", "demo",
                         "--movqgan", "demo", "--target-size", "64", "--no-progress"], capsys)
    assert code == 0, err
    assert len(TokenDataset(tmp_path / "p")) == GOOD_ITEMS


def limited_file_size_run(argv: list[str], limit: int, cwd: Path):
    """Run the CLI with a file-size limit: every write past `limit` bytes fails as on a full disk."""
    import resource
    import subprocess
    import sys

    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    # Python ignores SIGXFSZ, so the write returns EFBIG, as ENOSPC comes back from a full disk.
    return subprocess.run([sys.executable, "-m", "lumina_core.train", *argv], env=child_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=180, preexec_fn=limit_writes)


def test_issue15_item5_full_disk_is_one_line_and_exit_2(setup, straight_run, tmp_path):
    model_bytes = (latest_checkpoint(straight_run[0]) / MODEL_FILE).stat().st_size
    # The weights fit, the optimizer state (twice their size) does not: torch's own zip writer fails
    # ("[enforce fail at inline_container.cc:672] unexpected pos"), as it does on a full disk.
    argv = ["fit", *cli_args(fit_options(setup, tmp_path / "run", steps=1))]
    done = limited_file_size_run(argv, int(model_bytes * 1.2), tmp_path)
    line = assert_one_line_error(done.returncode, done.stderr)
    assert "checkpoints/step_0000001" in line and "torch's writer lost bytes" in line, line
    assert "the disk took no more bytes" in line and "GiB free" in line, line
    assert not list((tmp_path / "run" / "checkpoints").glob(".step_*")), "the failed save left its temp folder"
    # The export's shards (safetensors' writer) fail the same way.
    done = limited_file_size_run(["export", str(straight_run[0]), "--out", str(tmp_path / "exp"), "--dtype",
                                  "float32"], model_bytes // 2, tmp_path)
    line = assert_one_line_error(done.returncode, done.stderr)
    assert str(tmp_path / "exp") in line and "the disk took no more bytes" in line, line


def test_issue15_item6_prepare_checks_the_target_size_before_encoding(setup, tmp_path, capsys, monkeypatch):
    def never(*args):
        raise AssertionError("encoding started although the settings could not work")

    monkeypatch.setattr(train_data, "tokenize_item", never)
    # The tiny tokenizer has size tokens up to 16 grids (512 px); 768 needs 24.
    code, err = run_cli(["prepare", str(setup["description"]), "--out", str(tmp_path / "p"), "--tokenizer",
                         str(setup["model"]), "--movqgan", str(setup["model"] / TINY_MOVQGAN_FILE),
                         "--target-size", "768", "--no-progress"], capsys)
    line = assert_one_line_error(code, err)
    assert "--target-size 768" in line and "use --target-size 512 or less" in line, line
    assert not (tmp_path / "p" / "index.json").exists()


def test_issue15_item6_prepare_that_writes_nothing_fails_with_the_reason_and_the_fix(setup, tmp_path, capsys):
    description = tmp_path / "thin.json"
    description.write_text(json.dumps([{"prompt": "thin", "image": str(setup["root"] / "thin.png")}] * 3))
    code, err = run_cli(["prepare", str(description), "--out", str(tmp_path / "p"), "--tokenizer",
                         str(setup["model"]), "--movqgan", str(setup["model"] / TINY_MOVQGAN_FILE),
                         "--target-size", "64", "--no-progress"], capsys)
    line = assert_one_line_error(code, err)
    assert "wrote none of the 3 items" in line and "size_off_grid 3" in line, line
    assert "smaller than one 32-px grid" in line and "images need at least 32 px" in line, line
    assert not (tmp_path / "p" / "index.json").exists()  # a fixed rerun starts over instead of resuming "done"


@pytest.fixture
def three_checkpoints(setup, tmp_path):
    """A 6-step run (the straight run's settings) saved at steps 2, 4 and 6."""
    out = tmp_path / "run"
    fit(fit_options(setup, out, save_every=2, keep=3))
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == \
        ["step_0000002", "step_0000004", "step_0000006"]
    return out


def final_weights_equal(run: Path, straight: Path) -> bool:
    a = load_file(str(latest_checkpoint(run) / MODEL_FILE))
    b = load_file(str(latest_checkpoint(straight) / MODEL_FILE))
    return max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_issue15_item7_resume_auto_past_a_latest_pointer_to_a_missing_folder(setup, straight_run, three_checkpoints,
                                                                             caplog):
    import shutil

    out = three_checkpoints
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # `latest` still names it
    with caplog.at_level("WARNING"):
        result = fit(fit_options(setup, out, save_every=2, keep=3))
    assert "resuming from step_0000004, the newest intact checkpoint: latest names step_0000006, which is gone" \
        in caplog.text
    assert result.step == 6 and len(result.losses) == 2  # steps 5 and 6 redone, not a restart from step 0
    assert (out / "checkpoints" / "step_0000002").is_dir()  # nothing pruned beyond `keep`
    assert final_weights_equal(out, straight_run[0])


def test_issue15_item7_resume_auto_past_a_corrupt_latest_checkpoint(setup, straight_run, three_checkpoints, caplog):
    out = three_checkpoints
    damaged = out / "checkpoints" / "step_0000006" / MODEL_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])  # a truncated write
    with caplog.at_level("WARNING"):
        result = fit(fit_options(setup, out, save_every=2, keep=2))
    assert "resuming from step_0000004" in caplog.text and "step_0000006 is damaged (model.safetensors" in caplog.text
    assert result.step == 6 and len(result.losses) == 2
    # The damaged checkpoint was set aside, not deleted or overwritten; keep=2 pruned only this run's history.
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_0000004", "step_0000006", "step_0000006.damaged"], names
    assert final_weights_equal(out, straight_run[0])


def test_issue15_item7_nothing_intact_fails_loudly_and_deletes_nothing(setup, three_checkpoints, capsys):
    out = three_checkpoints
    for folder in (out / "checkpoints").glob("step_*"):
        (folder / MODEL_FILE).write_bytes(b"garbage")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    code, err = run_cli(["fit", *cli_args(fit_options(setup, out))], capsys)
    line = assert_one_line_error(code, err)
    assert "nothing intact to resume from" in line and "step_0000006: model.safetensors is unreadable" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    code, err = run_cli(["fit", *cli_args(fit_options(setup, out)), "--resume", "never"], capsys)
    assert "already holds checkpoints" in assert_one_line_error(code, err)


def test_issue15_item8_a_killed_save_is_cleaned_and_the_log_has_each_step_once(setup, straight_run, tmp_path):
    out = tmp_path / "run"
    fit(fit_options(setup, out, stop_after=3, save_every=2))
    # As a SIGKILL during the step-3 save leaves it: step 3 logged, its checkpoint a temp folder.
    import shutil

    root = out / "checkpoints"
    shutil.rmtree(root / "step_0000003")
    (root / "latest").write_text("step_0000002")
    stale = root / ".step_0000003.4242.tmp"
    stale.mkdir()
    (stale / MODEL_FILE).write_bytes(b"half a file")
    assert sorted(read_log(out)) == [1, 2, 3]
    fit(fit_options(setup, out, save_every=2))
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    straight = read_log(straight_run[0])
    assert all(read_log(out)[s]["loss"] == pytest.approx(straight[s]["loss"], rel=1e-6, abs=1e-6) for s in straight)


@pytest.mark.slow
def test_issue15_item8_checkpoints_and_exports_get_the_umask_permissions(setup, tmp_path):
    import shlex
    import stat
    import subprocess
    import sys

    run, exported = tmp_path / "run", tmp_path / "exported"
    fit_cmd = [sys.executable, "-m", "lumina_core.train", "fit", *cli_args(fit_options(setup, run, steps=2))]
    export_cmd = [sys.executable, "-m", "lumina_core.train", "export", str(run), "--out", str(exported),
                  "--movqgan", str(setup["model"] / TINY_MOVQGAN_FILE)]
    script = f"umask 027 && {shlex.join(fit_cmd)} && {shlex.join(export_cmd)}"
    done = subprocess.run(["sh", "-c", script], env=child_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for root in (run, exported) for p in [root, *root.rglob("*")]}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o750 if (tmp_path / p).is_dir() else 0o640)}
    assert not wrong, wrong
    assert any(p.endswith("optimizer.pt") for p in modes) and any(p.endswith("tokenizer.json") for p in modes)


# --------------------------------------------------------------------------------------------
# Issue 14: an exported fine-tune of the demo samples at the demo's settings

def test_issue14_exported_fine_tune_of_the_demo_generates_at_the_demo_settings(tmp_path, capsys):
    from lumina_core.__main__ import main as generate_main
    from lumina_core.demo.data import write_dataset
    from lumina_core.hub import BUILTIN_MODELS

    records = write_dataset(tmp_path / "data", count=4, seed=1)
    assert run_cli(["prepare", str(records), "--out", str(tmp_path / "prep"), "--tokenizer", "demo", "--movqgan",
                    "demo", "--no-progress"], capsys)[0] == 0
    assert run_cli(["fit", "--data", str(tmp_path / "prep"), "--out", str(tmp_path / "run"), "--init-from", "demo",
                    "--steps", "1", "--lr", "1e-6", "--precision", "fp32", "--max-seq-len", "256",
                    "--device", "cpu"], capsys)[0] == 0
    exported = tmp_path / "exported"
    assert run_cli(["export", str(tmp_path / "run"), "--out", str(exported), "--movqgan", "demo"], capsys)[0] == 0
    demo_defaults = json.loads((BUILTIN_MODELS["demo"] / "sampling_defaults.json").read_text())
    assert json.loads((exported / "sampling_defaults.json").read_text()) == demo_defaults
    assert generate_main(["generate", "--model", str(exported), "--prompt", "a red circle",
                          "--output", str(tmp_path / "images")]) == 0
    png = next((tmp_path / "images").glob("*.png"))
    settings = json.loads(Image.open(png).text["lumina_mgpt2"])
    assert Image.open(png).size == tuple(demo_defaults["sizes"]["t2i"])
    assert (settings["cfg"], settings["top_k"], settings["guidance"]) == \
        (demo_defaults["cfg"], demo_defaults["top_k"], demo_defaults["guidance"])


def test_vq_images_blend_transparency_onto_white_like_the_training_data(tmp_path):
    from lumina_core.images import pil_to_tensor
    from lumina_core.train.vq import load_images

    rgba = np.zeros((32, 32, 4), dtype=np.uint8)   # black, fully transparent ...
    rgba[8:24, 8:24] = (200, 40, 40, 255)           # ... around an opaque red square
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut_out.png")
    pixels = load_images([tmp_path / "cut_out.png"], 32)[0]
    assert torch.equal(pixels, pil_to_tensor(train_data._open_image(str(tmp_path / "cut_out.png"))))
    assert torch.equal(pixels[:, 0, 0], torch.ones(3)) and pixels[0, 16, 16] > 0.5
