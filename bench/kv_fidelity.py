"""Logits with an fp8 KV cache against a bf16 (and the exact float32) cache, teacher-forced.

    python bench/kv_fidelity.py                                  # the oracle checkpoint and the demo model
    python bench/kv_fidelity.py --model tests/fixtures/oracle_lm_tiny --json out.json

Math in float32 throughout; only the cache's storage changes. Each sequence is prefilled up to
its image start, then fed one token per step through the cache (as decoding reads it). Figures
per storage: max and mean |logit diff| relative to the reference's logit range (max - min over the
vocabulary at that position), and top-1 agreement; also for fp8 without scales, with key scales
only and with value scales only (the choice of `FP8_SCALED_KEYS` / `FP8_SCALED_VALUES`).
Both models keep keys and values near 1, where a power-of-two scale changes no rounding; the
"values x 1/64" and "keys x 1/64" rows reparametrise the oracle without changing its function
(v_proj / 64 with o_proj * 64; k LayerNorm affine / 64 with q LayerNorm affine * 64) to show what
happens to a model whose cached values sit below e4m3's normal range (2**-6).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lumina_core.model import LuminaTransformer  # noqa: E402

from lumina_core.kv_cache import FP8_KV_DTYPE, KVCache
from lumina_core.weights import load_transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ORACLE = ROOT / "tests" / "fixtures" / "oracle_lm_tiny"
IMAGE_START = 151665  # the oracle's <racm3:break>

# name -> (storage dtype, scaled keys, scaled values)
STORAGES = {
    "float32": (torch.float32, False, False),
    "bf16": (torch.bfloat16, False, False),
    "fp8 (no scales)": (FP8_KV_DTYPE, False, False),
    "fp8 (key scales)": (FP8_KV_DTYPE, True, False),
    "fp8 (value scales)": (FP8_KV_DTYPE, False, True),
    "fp8 (key + value scales)": (FP8_KV_DTYPE, True, True),
}


@torch.no_grad()
def teacher_forced_logits(model: LuminaTransformer, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                          prefill: int, storage: torch.dtype, scaled_keys: bool, scaled_values: bool) -> torch.Tensor:
    """Logits [B, L - prefill + 1, V] at positions prefill-1 .. L-1: one prefill, then one cached step per token."""
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], dtype=torch.float32, storage=storage,
                    scaled_keys=scaled_keys, scaled_values=scaled_values)
    out = [model(ids[:, :prefill], attention_mask=valid[:, :prefill], position_ids=positions[:, :prefill],
                 cache=cache, num_logits=1)]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], attention_mask=valid[:, t:t + 1], position_ids=positions[:, t:t + 1],
                         cache=cache))
    return torch.cat(out, 1)


def compare(ref: torch.Tensor, got: torch.Tensor, valid: torch.Tensor) -> dict:
    """max / mean |diff| over the logit range, top-1 agreement (valid query positions only)."""
    span = (ref.amax(-1) - ref.amin(-1))[..., None]
    rel = ((got - ref).abs() / span)[valid]
    return {"max_rel": float(rel.max()), "mean_rel": float(rel.mean()),
            "top1": float((got.argmax(-1) == ref.argmax(-1))[valid].float().mean()), "positions": int(valid.sum())}


def oracle_sequences(folder: Path) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, ids, valid, positions) of the oracle cases that hold an image."""
    cases = torch.load(folder / "cases.pt", weights_only=True)
    out = []
    for name in ("t2i_full", "t2i_positions_9000", "sjd_cfg_batch"):
        case = cases[name]
        ids = case["input_ids"]
        valid = torch.ones_like(ids, dtype=torch.bool) if case["attention_mask"] is None else case["attention_mask"].bool()
        positions = case["position_ids"] if case["position_ids"] is not None else torch.arange(ids.shape[1]).expand_as(ids)
        out.append((name, ids, valid, positions))
    return out


def demo_sequences(num: int = 8) -> tuple[LuminaTransformer, list]:
    """The demo model and `num` of its own generated images as token sequences (prompt + image)."""
    from lumina_core.pipeline import LuminaPipeline
    from lumina_core.demo import data
    from lumina_core.request import Request
    from lumina_core.sampling import SamplingConfig

    pipe = LuminaPipeline.from_pretrained("demo", dtype=torch.float32, device="cpu")
    _, held = data.split_captions()
    seqs = []
    for i, caption in enumerate(held[:num]):
        request = Request(task="t2i", prompt=caption.text(), width=data.IMAGE_SIZE, height=data.IMAGE_SIZE)
        job = pipe.prepare(request)
        codes = pipe.generate(request, SamplingConfig(cfg=1.5, guidance="constant", top_k=50, seed=i)).codes[0]
        body = torch.cat([codes + job.code_offset, torch.full((codes.shape[0], 1), job.new_line)], 1).reshape(-1)
        ids = torch.tensor([*job.cond_prefix, *body.tolist(), job.image_end])[None]
        seqs.append((f"demo_{i}", ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(ids.shape[1])[None],
                     len(job.cond_prefix) - 2))
    return pipe.transformer, seqs


def evaluate(model: LuminaTransformer, seqs: list) -> dict:
    """Figures per storage against the float32 and the bf16 cache, pooled over the sequences."""
    pooled: dict[str, list] = {}
    for seq in seqs:
        name, ids, valid, positions = seq[:4]
        prefill = seq[4] if len(seq) > 4 else int((ids[0] == IMAGE_START).nonzero()[0]) + 1
        runs = {key: teacher_forced_logits(model, ids, valid, positions, prefill, *opts) for key, opts in STORAGES.items()}
        query_valid = valid[:, prefill - 1:]
        for key, logits in runs.items():
            pooled.setdefault(key, []).append((runs["float32"], runs["bf16"], logits, query_valid))
    results = {}
    for key, parts in pooled.items():
        ref32, ref16, got, ok = (torch.cat([p[i].reshape(-1, p[i].shape[-1]) if i < 3 else p[i].reshape(-1)
                                            for p in parts]) for i in range(4))
        results[key] = {"vs_float32": compare(ref32, got, ok), "vs_bf16": compare(ref16, got, ok)}
    return results


def shrunk(folder: Path, part: str, factor: float = 1 / 64) -> LuminaTransformer:
    """The oracle, same function, with its cached values (part="values") or keys ("keys") scaled by `factor`."""
    model = load_transformer(folder, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if part == "values":
                small, large = [attn.v_proj.weight], [attn.o_proj.weight]
            else:
                small, large = [attn.k_norm.weight, attn.k_norm.bias], [attn.q_norm.weight, attn.q_norm.bias]
            for t in small:
                t.mul_(factor)
            for t in large:
                t.div_(factor)
    return model


def main(argv: list[str] | None = None) -> int:
    """Print the figures (and write them with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an oracle-format folder (default: the oracle and the demo)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    if args.model is None or Path(args.model).resolve() == ORACLE.resolve():
        folder = Path(args.model) if args.model else ORACLE
        results["oracle_lm_tiny"] = evaluate(load_transformer(folder, dtype=torch.float32), oracle_sequences(folder))
        for part in ("values", "keys"):
            results[f"oracle_lm_tiny, {part} x 1/64"] = evaluate(shrunk(folder, part), oracle_sequences(folder))
    if args.model is None or args.model == "demo":
        model, seqs = demo_sequences()
        results["demo"] = evaluate(model, seqs)
    for model_name, table in results.items():
        print(f"{model_name}: storage | vs float32 cache: max/mean rel, top-1 | vs bf16 cache: max/mean rel, top-1")
        for key, row in table.items():
            a, b = row["vs_float32"], row["vs_bf16"]
            print(f"  {key:26s} {a['max_rel']:.2e} {a['mean_rel']:.2e} {a['top1']:.4f} | "
                  f"{b['max_rel']:.2e} {b['mean_rel']:.2e} {b['top1']:.4f}  ({a['positions']} positions)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
