"""Held-out evaluation of the embedded demo model: prompt following from pixels, CFG, best-of-N, SJD, control, dense.

    python bench/demo_eval.py                      # the shipped model "demo"
    python bench/demo_eval.py --model DIR --per-caption 4 --json results.json
    python bench/demo_eval.py --kv-cache fp8 --skip train bestn control dense   # fp8 KV against --kv-cache bf16

Every figure is checked from pixels by ``lumina_core.demo.checker`` (colour + position; "+shape"
also needs the right shape). Captions are the 50 held out of training, and as many training
captions for comparison. Chance = the same images scored against a shuffled caption.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lumina_core.demo import checker, data  # noqa: E402
from lumina_core.images import tensor_to_uint8, unit_to_uint8  # noqa: E402
from lumina_core.kv_cache import KV_CACHE_MODES  # noqa: E402
from lumina_core.pipeline import LuminaPipeline  # noqa: E402
from lumina_core.request import Request  # noqa: E402
from lumina_core.sampling import SamplingConfig  # noqa: E402

SIZE = data.IMAGE_SIZE
KV_CACHE = "auto"  # the KV cache storage of every generation of a run (--kv-cache)


def sampling(cfg: float, top_k: int, seed: int, n: int, sjd: bool = False) -> SamplingConfig:
    """Constant guidance (the official schedule forces 4.0, far too strong for this model)."""
    return SamplingConfig(cfg=cfg, guidance="constant", top_k=top_k, seed=seed, num_images=n, sjd=sjd,
                          kv_cache=KV_CACHE)


def generate_t2i(pipe: LuminaPipeline, caption: data.Caption, config: SamplingConfig) -> tuple[list[np.ndarray], dict]:
    """Images [64, 64, 3] uint8 for one caption, and the decoder's stats."""
    out = pipe.generate(Request(task="t2i", prompt=caption.text(), width=SIZE, height=SIZE), config)
    pixels = tensor_to_uint8(pipe.decode(out)).numpy()
    return list(pixels), out.stats


def score(images: list[np.ndarray], captions: list[data.Caption]) -> dict[str, float]:
    """Fraction right: colour + position, and with shape."""
    results = [checker.check_image(im, c) for im, c in zip(images, captions)]
    return {"ok": float(np.mean([r.ok for r in results])),
            "ok_shape": float(np.mean([r.ok_with_shape for r in results])), "n": len(results)}


def eval_t2i(pipe: LuminaPipeline, captions: list[data.Caption], cfg: float, top_k: int, per_caption: int,
             seed: int) -> tuple[list[np.ndarray], list[data.Caption]]:
    """per_caption images for every caption (one batch per caption)."""
    images, labels = [], []
    for i, caption in enumerate(captions):
        ims, _ = generate_t2i(pipe, caption, sampling(cfg, top_k, seed + 1000 * i, per_caption))
        images += ims
        labels += [caption] * len(ims)
    return images, labels


def eval_best_of_n(pipe: LuminaPipeline, captions: list[data.Caption], cfg: float, top_k: int, n: int,
                   seed: int) -> dict[str, float]:
    """Best-of-N with the demo pixel verifier (lumina_core.verify.best_of_n) against the first candidate (N = 1)."""
    from lumina_core.verify.best_of_n import best_of_n
    from lumina_core.verify.pixels import DemoCheckVerifier

    verifier = DemoCheckVerifier()
    best, first = [], []
    for i, caption in enumerate(captions):
        request = Request(task="t2i", prompt=caption.text(), width=SIZE, height=SIZE)
        result = best_of_n(pipe, request, sampling(cfg, top_k, seed + 1000 * i, n), {"demo_check": verifier})
        pixels = unit_to_uint8(result.images).permute(0, 2, 3, 1).numpy()
        best.append(checker.check_image(pixels[result.best_index], caption))
        first.append(checker.check_image(pixels[0], caption))  # seed of N = 1
    return {"n1_ok": float(np.mean([r.ok for r in first])), "n1_ok_shape": float(np.mean([r.ok_with_shape for r in first])),
            "bestN_ok": float(np.mean([r.ok for r in best])),
            "bestN_ok_shape": float(np.mean([r.ok_with_shape for r in best])), "N": n, "prompts": len(captions)}


def eval_sjd(pipe: LuminaPipeline, captions: list[data.Caption], cfg: float, top_k: int, seed: int) -> dict:
    """Forward passes per image (one image per call) and accuracy: plain decoding vs SJD."""
    out: dict[str, dict] = {}
    for name, sjd in (("plain", False), ("sjd", True)):
        passes, seconds, images = [], 0.0, []
        for i, caption in enumerate(captions):
            start = time.perf_counter()
            ims, stats = generate_t2i(pipe, caption, sampling(cfg, top_k, seed + i, 1, sjd=sjd))
            seconds += time.perf_counter() - start
            passes.append(stats["forward_passes"])
            images += ims
        out[name] = {"passes_per_image": float(np.mean(passes)), "seconds_per_image": seconds / len(captions),
                     **score(images, captions)}
    out["pass_ratio"] = out["plain"]["passes_per_image"] / out["sjd"]["passes_per_image"]
    out["code_tokens"] = SIZE // 8 * SIZE // 8
    out["pass_ratio_vs_code_tokens"] = out["code_tokens"] / out["sjd"]["passes_per_image"]
    return out


def eval_control(pipe: LuminaPipeline, captions: list[data.Caption], cfg: float, top_k: int, seed: int) -> dict:
    """control_canny: the edge map of a held-out image as the upper panel; the lower panel checked against the caption."""
    rng = np.random.default_rng(seed)
    images, edges = [], []
    for i, caption in enumerate(captions):
        sample = data.make_sample("control_canny", caption, rng)
        request = Request(task="control_canny", prompt=caption.text(), width=SIZE, height=2 * SIZE,
                          reference=Image.fromarray(np.ascontiguousarray(sample.upper)))
        out = pipe.generate(request, sampling(cfg, top_k, seed + i, 1))
        images.append(tensor_to_uint8(pipe.decode(out)).numpy()[0][SIZE:])
        edges.append(sample.upper)
    shuffled = captions[1:] + captions[:1]
    # Spatial following, whatever the colours: edges of the generated panel against the given edge map.
    follow = [checker.edge_f1(data.edge_map(im), e) for im, e in zip(images, edges)]
    follow_chance = [checker.edge_f1(data.edge_map(im), edges[(i + 1) % len(edges)]) for i, im in enumerate(images)]
    return {**score(images, captions), "chance": score(images, shuffled), "edge_f1_to_reference": float(np.mean(follow)),
            "chance_edge_f1": float(np.mean(follow_chance))}


def eval_dense(pipe: LuminaPipeline, captions: list[data.Caption], cfg: float, top_k: int, seed: int) -> dict:
    """dense_canny: a held-out image as the upper panel; the generated edge map against the true one (F1)."""
    rng = np.random.default_rng(seed)
    f1, chance = [], []
    truths = []
    for i, caption in enumerate(captions):
        sample = data.make_sample("dense_canny", caption, rng)
        request = Request(task="dense_canny", prompt=caption.text(), width=SIZE, height=2 * SIZE,
                          reference=Image.fromarray(np.ascontiguousarray(sample.upper)))
        out = pipe.generate(request, sampling(cfg, top_k, seed + i, 1))
        generated = tensor_to_uint8(pipe.decode(out)).numpy()[0][SIZE:]
        truths.append(sample.lower)
        f1.append(checker.edge_f1(generated, sample.lower))
        chance.append((generated, i))
    chance_f1 = [checker.edge_f1(g, truths[(i + 1) % len(truths)]) for g, i in chance]
    return {"edge_f1": float(np.mean(f1)), "chance_edge_f1": float(np.mean(chance_f1)), "n": len(f1)}


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model name or folder (default: the shipped demo)")
    parser.add_argument("--per-caption", type=int, default=4, help="images per caption for the accuracy figures")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale compared against cfg 1")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--best-of", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "bestn", "sjd", "control", "dense"])
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--kv-cache", default="auto", choices=list(KV_CACHE_MODES),
                        help="KV cache storage (auto: the model's float32)")
    args = parser.parse_args(argv)
    global KV_CACHE
    KV_CACHE = args.kv_cache
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    pipe = LuminaPipeline.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    train, held = data.split_captions()
    train_sample = random.Random(args.seed).sample(train, len(held))
    results: dict[str, object] = {"model": args.model, "held_out_captions": len(held), "top_k": args.top_k,
                                  "kv_cache": args.kv_cache}

    for cfg in (1.0, args.cfg):
        images, labels = eval_t2i(pipe, held, cfg, args.top_k, args.per_caption, args.seed)
        results[f"held_out_cfg{cfg:g}"] = score(images, labels)
        if cfg == args.cfg:
            shuffled = random.Random(args.seed + 1).sample(held, len(held))
            remap = dict(zip(held, shuffled))
            results["chance_shuffled_captions"] = score(images, [remap[c] for c in labels])
        print(f"held out, cfg {cfg:g}: {results[f'held_out_cfg{cfg:g}']}", flush=True)
    if "train" not in args.skip:
        images, labels = eval_t2i(pipe, train_sample, args.cfg, args.top_k, args.per_caption, args.seed)
        results[f"training_captions_cfg{args.cfg:g}"] = score(images, labels)
        print(f"training captions, cfg {args.cfg:g}: {results[f'training_captions_cfg{args.cfg:g}']}", flush=True)
    if "bestn" not in args.skip:
        results["best_of_n"] = eval_best_of_n(pipe, held, args.cfg, args.top_k, args.best_of, args.seed + 7)
        print(f"best-of-{args.best_of}: {results['best_of_n']}", flush=True)
    if "sjd" not in args.skip:
        results["sjd"] = eval_sjd(pipe, held, args.cfg, args.top_k, args.seed + 11)
        print(f"sjd: {results['sjd']}", flush=True)
    if "control" not in args.skip:
        results["control_canny"] = eval_control(pipe, held, args.cfg, args.top_k, args.seed + 13)
        print(f"control_canny: {results['control_canny']}", flush=True)
    if "dense" not in args.skip:
        results["dense_canny"] = eval_dense(pipe, held, args.cfg, args.top_k, args.seed + 17)
        print(f"dense_canny: {results['dense_canny']}", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
