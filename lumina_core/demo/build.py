"""Rebuild the embedded demo model from nothing with our own commands: ``python -m lumina_core.demo.build --out DIR``.

Stages (each one a subprocess running the project's own CLI, so the demo is trained exactly the way
a user trains a model):

1. data: procedural images (``lumina_core.demo.data``) written as a ``train prepare`` description;
2. tokenizer: a tiny real tokenizer (``testing.tokenizer.build_tokenizer``) with the captions' words;
3. ``python -m lumina_core.train vq``: a small MoVQGAN (same architecture and .ckpt format as the 270M);
4. ``python -m lumina_core.train prepare``: pre-tokenisation with that MoVQGAN;
5. ``python -m lumina_core.train fit``: a tiny transformer of the official architecture from a config.json;
6. ``python -m lumina_core.train export``: the official model folder, plus the MoVQGAN checkpoint.

The result is ``DIR/model``; ``--install`` copies it to ``lumina_core/assets/demo`` (the model named
``demo``). Stages whose output exists are skipped, and ``vq``/``fit`` resume their own checkpoints, so
an interrupted build continues where it stopped. Timings go to ``DIR/build_log.json``. A tokenizer
whose reconstructions fail the demo's pixel checker is trained again with another seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..defaults import DEFAULTS_FILE as SAMPLING_DEFAULTS  # read by front ends (lumina_core.defaults)
from ..fileio import atomic_path, atomic_write_text

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
MOVQGAN_NAME = "movqgan_demo.ckpt"
BUILD_INFO = "build_info.json"
VQ_REPORT = "vq_report.json"                  # the chosen tokenizer's checks (and every attempt's)


@dataclass(frozen=True)
class BuildPlan:
    """Sizes and step counts of a demo build (the defaults are the shipped model)."""

    seed: int = 0
    # data
    fit_items: int = 30000          # pre-tokenised training examples (all tasks)
    vq_items: int = 5000            # examples whose panels (about 6500 images) train the MoVQGAN
    # MoVQGAN
    vq_steps: int = 2000
    vq_batch: int = 16
    vq_lr: float = 1.5e-3
    vq_min_lr: float = 5e-5
    vq_reset_dead_every: int = 50
    vq_ch: int = 32
    vq_ch_mult: str = "1,1,2,2"     # 4 levels: 8x downsampling, as the 270M
    vq_codes: int = 512
    vq_min_check: float = 0.95      # a tokenizer whose reconstructions fail the pixel checker more often is retrained
    vq_attempts: int = 2            # tokenizer trainings (other seeds) before the build gives up
    # transformer
    hidden_size: int = 256
    intermediate_size: int = 704
    layers: int = 4
    heads: int = 4
    max_positions: int = 256
    fit_steps: int = 1500
    fit_batch: int = 64
    fit_lr: float = 1.5e-3
    fit_min_lr: float = 1.5e-4
    fit_warmup: int = 100
    uncond_prob: float = 0.1


# A few minutes end to end: checks the whole chain, not a usable model.
QUICK_PLAN = BuildPlan(fit_items=300, vq_items=100, vq_steps=30, vq_batch=8, fit_steps=30, fit_batch=16,
                       fit_warmup=5, vq_min_check=0.0)


def _run(args: list[str], log: Path) -> None:
    """Run one of our CLIs in a subprocess; its output goes to ``log`` (and the tail to stderr on failure)."""
    command = [sys.executable, "-m", *args]
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=Path.cwd())
    if result.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"`{' '.join(args[:3])}` failed with exit status {result.returncode}; "
                           f"last lines of {log}:\n{tail}")


def _train_tokenizer(out: Path, plan: BuildPlan, vq_records: Path, movqgan: Path, log: Path) -> None:
    """`train vq`, then the pixel check of its reconstructions; a tokenizer that fails is trained again
    with another seed (``plan.vq_attempts`` in all: the tokenizer stage is the seed-sensitive one).
    The first that passes is copied to ``movqgan``; every attempt's figures go to ``VQ_REPORT``."""
    from . import data

    attempts = []
    for attempt in range(plan.vq_attempts):
        seed = plan.seed + 1000 * attempt
        run_dir = out / ("vq_run" if attempt == 0 else f"vq_run_{attempt + 1}")
        candidate = run_dir / "movqgan.ckpt"
        if not candidate.is_file():
            _run(["lumina_core.train", "vq", str(vq_records), "--out", str(run_dir), "--ckpt", str(candidate),
                  "--steps", str(plan.vq_steps), "--batch", str(plan.vq_batch), "--lr", str(plan.vq_lr),
                  "--min-lr", str(plan.vq_min_lr), "--precision", "bf16",
                  "--reset-dead-every", str(plan.vq_reset_dead_every), "--ch", str(plan.vq_ch),
                  "--ch-mult", plan.vq_ch_mult, "--n-embed", str(plan.vq_codes), "--size", str(data.IMAGE_SIZE),
                  "--seed", str(seed)], log)
        report = {"seed": seed, **json.loads((run_dir / "vq_eval.json").read_text()),
                  **check_tokenizer(candidate, plan.seed)}
        attempts.append(report)
        print(f"[demo build] tokenizer (seed {seed}): held-out PSNR {report['psnr_db']:.2f} dB (stacked pairs "
              f"{report.get('pair_psnr_db', float('nan')):.2f} dB), {report['codes_used']}/{plan.vq_codes} codes; "
              f"reconstructions checked: t2i {report['t2i_ok']:.2f}, control panel {report['control_ok']:.2f}, "
              f"dense edge F1 {report['dense_edge_f1']:.2f}", flush=True)
        if min(report["t2i_ok"], report["control_ok"], report["dense_edge_f1"]) >= plan.vq_min_check:
            _write_json(out / VQ_REPORT, {**report, "attempts": attempts})
            with atomic_path(movqgan) as tmp:
                shutil.copyfile(candidate, tmp)
            return
    results = "; ".join(f"seed {r['seed']}: t2i {r['t2i_ok']:.2f}, control {r['control_ok']:.2f}, "
                        f"dense edge F1 {r['dense_edge_f1']:.2f}" for r in attempts)
    raise RuntimeError(f"the demo MoVQGAN's reconstructions fail the pixel checker ({results}; this build needs "
                       f"{plan.vq_min_check} each): the model could not learn right colours or edges from its "
                       f"codes. Rebuild with another --seed, or raise BuildPlan.vq_steps")


def _write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def model_config(plan: BuildPlan, vocab_size: int) -> dict:
    """config.json of the tiny transformer (official fields, our sizes)."""
    from ..config import ModelConfig

    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=plan.hidden_size, intermediate_size=plan.intermediate_size,
                      num_hidden_layers=plan.layers, num_attention_heads=plan.heads, num_key_value_heads=plan.heads,
                      max_position_embeddings=plan.max_positions, dropout=0.0)
    return cfg.to_hf_dict()


def build(out: str | os.PathLike, plan: BuildPlan = BuildPlan(), threads: int | None = None) -> Path:
    """Run every stage into ``out``; returns the finished model folder ``out/model``."""
    from ..testing.tokenizer import build_tokenizer
    from . import data

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    info_path = out / "build_log.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"stages": {}}
    info["plan"] = dataclasses.asdict(plan)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)

    def stage(name: str, done: Path, action) -> None:
        if done.exists():
            print(f"[demo build] {name}: already done ({done})", flush=True)
            return
        print(f"[demo build] {name} ...", flush=True)
        start = time.time()
        action()
        seconds = time.time() - start
        info["stages"][name] = round(seconds, 1)
        info["total_seconds"] = round(sum(info["stages"].values()), 1)
        _write_json(info_path, info)
        print(f"[demo build] {name}: {seconds:.0f} s", flush=True)

    train_captions = data.split_captions()[0]
    fit_records = out / "data" / "records.json"
    vq_records = out / "vq_data" / "records.json"
    stage("data", fit_records, lambda: data.write_dataset(out / "data", plan.fit_items, seed=plan.seed,
                                                          captions=train_captions))
    # The MoVQGAN sees its own sample of the same distribution (other seed).
    stage("vq data", vq_records, lambda: data.write_dataset(out / "vq_data", plan.vq_items, seed=plan.seed + 1,
                                                            captions=train_captions))
    tokenizer_dir = out / "tokenizer"
    stage("tokenizer", tokenizer_dir / "tokenizer.json",
          lambda: build_tokenizer(tokenizer_dir, data.vocabulary(), num_image_codes=plan.vq_codes, max_grids=8))
    movqgan = out / MOVQGAN_NAME
    stage("train vq", movqgan, lambda: _train_tokenizer(out, plan, vq_records, movqgan, log))
    vq_report = json.loads((out / VQ_REPORT).read_text())
    info["vq_eval"] = vq_report
    _write_json(info_path, info)
    prepared = out / "prepared"
    stage("train prepare", prepared / "index.json", lambda: _run(
        ["lumina_core.train", "prepare", str(fit_records), "--out", str(prepared), "--tokenizer", str(tokenizer_dir),
         "--movqgan", str(movqgan), "--no-progress", "--max-seq-len", str(plan.max_positions)], log))
    config_path = out / "config.json"
    if not config_path.is_file():
        from ..tokens import load_text_tokenizer

        _write_json(config_path, model_config(plan, len(load_text_tokenizer(tokenizer_dir))))
    run_dir = out / "fit_run"
    stage("train fit", out / "fit_run" / "DONE", lambda: (_run(
        ["lumina_core.train", "fit", "--data", str(prepared), "--out", str(run_dir), "--config", str(config_path),
         "--steps", str(plan.fit_steps), "--micro-batch", str(plan.fit_batch), "--lr", str(plan.fit_lr),
         "--min-lr", str(plan.fit_min_lr), "--warmup-steps", str(plan.fit_warmup), "--dropout", "0",
         "--uncond-prob", str(plan.uncond_prob), "--max-seq-len", str(plan.max_positions),
         "--no-grad-checkpointing", "--group-by-length", "--save-every", str(max(plan.fit_steps // 4, 1)), "--log-every", "50",
         "--seed", str(plan.seed), "--device", "cpu"], log), (run_dir / "DONE").write_text("done\n")))
    model_dir = out / "model"
    stage("train export", model_dir / "config.json", lambda: _run(
        ["lumina_core.train", "export", str(run_dir), "--out", str(model_dir), "--dtype", "bfloat16",
         "--movqgan", str(movqgan)], log))
    _write_json(model_dir / SAMPLING_DEFAULTS, sampling_defaults())
    _write_json(model_dir / BUILD_INFO, {
        "built_by": "python -m lumina_core.demo.build",
        "plan": dataclasses.asdict(plan),
        "stage_seconds": info["stages"],
        "total_seconds": info.get("total_seconds"),
        "movqgan_held_out": vq_report,
        "held_out_captions": [c.text() for c in data.split_captions()[1]],
        "tasks": list(data.DEMO_TASKS),
        "image_size": [data.IMAGE_SIZE, data.IMAGE_SIZE],
        "note": "trained only on 64x64 shapes (t2i) and 64x128 dual panels (control_canny, dense_canny)",
    })
    return model_dir


def check_tokenizer(movqgan_path: str | os.PathLike, seed: int, count: int = 60) -> dict:
    """Pixel-check the demo MoVQGAN's reconstructions of held-out captions, as the transformer will see them.

    t2i: colour + position of a reconstructed image. Dual panels are encoded panel by panel and
    decoded as one stacked picture (as `prepare` and the pipeline do): control = the checker on the
    image panel under an edge map; dense = edge F1 of the edge-map panel under an image.
    """
    import numpy as np
    import torch
    from PIL import Image

    from ..images import pil_to_tensor, tensor_to_uint8
    from ..movqgan import load_movqgan
    from . import checker, data

    movq = load_movqgan(movqgan_path)
    held_out = data.split_captions()[1]
    rng = np.random.default_rng(seed + 7)

    def to_tensor(pixels):
        return pil_to_tensor(Image.fromarray(pixels))[None]

    def to_uint8(images):
        return tensor_to_uint8(images[0]).numpy()

    t2i, control, dense = [], [], []
    size = data.IMAGE_SIZE
    with torch.no_grad():
        for i in range(count):
            caption = held_out[i % len(held_out)]
            image = data.render(caption, rng)
            edges = data.edge_map(image)
            image_codes, edge_codes = movq.encode(to_tensor(image)), movq.encode(to_tensor(edges))
            t2i.append(checker.check_image(to_uint8(movq.decode(image_codes)), caption).ok)
            stacked = to_uint8(movq.decode(torch.cat([edge_codes, image_codes], dim=1)))
            control.append(checker.check_image(stacked[size:], caption).ok)
            stacked = to_uint8(movq.decode(torch.cat([image_codes, edge_codes], dim=1)))
            dense.append(checker.edge_f1(stacked[size:], edges))
    return {"t2i_ok": float(np.mean(t2i)), "control_ok": float(np.mean(control)),
            "dense_edge_f1": float(np.mean(dense)), "checked_images": count}


def sampling_defaults() -> dict:
    """What to sample the demo with when the user does not say: its trained sizes, constant CFG 1.5, top-k 50.

    The official schedule (any cfg in (1, 4) becomes 4.0) and top-k 4096 are far too strong for a
    512-code model trained on shapes; held out, CFG 1.5 beat 1, 2 and 3 (3 breaks single-shape captions).
    """
    from . import data

    sizes = {task: [data.IMAGE_SIZE, data.IMAGE_SIZE * (1 if task == "t2i" else 2)] for task in data.DEMO_TASKS}
    return {"tasks": list(data.DEMO_TASKS), "sizes": sizes, "width": data.IMAGE_SIZE, "height": data.IMAGE_SIZE,
            "cfg": 1.5, "guidance": "constant", "top_k": 50}


def install(model_dir: str | os.PathLike, target: str | os.PathLike = ASSET_DIR) -> Path:
    """Copy a built model folder into the package (``lumina_core/assets/demo``), replacing what was there."""
    model_dir, target = Path(model_dir), Path(target)
    if not (model_dir / "config.json").is_file() or not (model_dir / MOVQGAN_NAME).is_file():
        raise FileNotFoundError(f"{model_dir} is not a built demo model (config.json and {MOVQGAN_NAME} expected)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    for item in model_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, staging / item.name)
            os.chmod(staging / item.name, 0o644)  # atomic writers create 0600 files; package data is world-readable
    os.chmod(staging, 0o755)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m lumina_core.demo.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="build folder (created; an existing one is resumed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the chain in minutes, model unusable")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {ASSET_DIR}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the training subprocesses")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, MoVQGAN and transformer (shipped: 0)")
    args = parser.parse_args(argv)
    start = time.time()
    plan = dataclasses.replace(QUICK_PLAN if args.quick else BuildPlan(), seed=args.seed)
    model_dir = build(args.out, plan, threads=args.threads)
    print(f"[demo build] model written to {model_dir} in {time.time() - start:.0f} s", flush=True)
    if args.install:
        print(f"[demo build] installed as {install(model_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
