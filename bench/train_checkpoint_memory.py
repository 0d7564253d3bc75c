"""Host memory of one FSDP checkpoint save: sharded (each rank writes its shard) vs a full-state gather.

    python bench/train_checkpoint_memory.py [--layers 8 --hidden 1024]

Starts `torchrun --nproc-per-node 2` (gloo, CPU) twice on a ~120M-parameter model of the official
architecture, gives every parameter an AdamW state, and saves one checkpoint: once through
`save_checkpoint` (torch.distributed.checkpoint, the format `fit` writes under torchrun) and once
through a full-state gather onto rank 0 (what `fit` did before). A second process polls each
rank's anonymous RSS (/proc, 0.5 ms) and the ranks mark when their save starts and ends, so the
figure is the peak during the save minus the memory held just before it. Prints one JSON line per
format with each rank's shard (weights + AdamW state), the largest layer and the save's extra peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    from lumina_core import dist
    from lumina_core.config import ModelConfig
    from lumina_core.model import build_transformer
    from lumina_core.train.checkpoint import _save_full, save_checkpoint
    from lumina_core.train.distributed import shard_model
    from lumina_core.train.loop import TrainingModule

    info = dist.init("cpu")
    marks = Path(args.marks) / f"rank{info.rank}"
    marks.write_text(json.dumps({"pid": os.getpid()}))  # the poller starts here
    cfg = ModelConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):
        module = TrainingModule(build_transformer(cfg))
    shard_model(module, module.transformer.model.layers, None)
    module.to_empty(device="cpu")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    for p in module.parameters():
        torch.nn.init.normal_(p.to_local() if hasattr(p, "to_local") else p, std=0.02)
        p.grad = torch.ones_like(p)
    optimizer.step()  # creates exp_avg / exp_avg_sq: the state a checkpoint holds
    optimizer.zero_grad(set_to_none=True)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    shard_bytes = sum(local(p).numel() * 4 * 3 for p in module.parameters())  # weights + 2 AdamW moments
    layer_bytes = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in module.transformer.model.layers)
    time.sleep(0.5)  # baseline samples: what the rank holds before the save
    dist.barrier(info)
    start = time.time()
    marks.write_text(json.dumps({"pid": os.getpid(), "start": start}))
    if args.format == "sharded":
        save_checkpoint(args.out, module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                        {"step": 1}, info, keep=0)
    else:
        folder = Path(args.out) / f"full{info.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        _save_full(folder, module, optimizer, info)
    end = time.time()
    dist.barrier(info)
    marks.write_text(json.dumps({"pid": os.getpid(), "start": start, "end": end,
                                 "shard_bytes": shard_bytes, "layer_bytes": layer_bytes}))
    dist.barrier(info)
    dist.shutdown()


def measure(fmt: str, layers: int, hidden: int) -> dict:
    from lumina_core.testing.rss import anon_rss_bytes

    with tempfile.TemporaryDirectory() as tmp:
        marks = Path(tmp) / "marks"
        marks.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", __file__, "--worker", "--format", fmt, "--out", str(Path(tmp) / "out"),
                                 "--marks", str(marks), "--layers", str(layers), "--hidden", str(hidden)], env=env)
        samples: dict[int, list[tuple[float, int]]] = {0: [], 1: []}
        while proc.poll() is None:
            for rank in (0, 1):
                mark = marks / f"rank{rank}"
                if mark.is_file():
                    try:
                        pid = json.loads(mark.read_text())["pid"]
                    except (ValueError, KeyError):
                        continue
                    samples[rank].append((time.time(), anon_rss_bytes(pid)))
            time.sleep(0.0005)
        assert proc.returncode == 0, f"torchrun failed ({proc.returncode})"
        report = {"format": fmt}
        for rank in (0, 1):
            mark = json.loads((marks / f"rank{rank}").read_text())
            before = [rss for t, rss in samples[rank] if t <= mark["start"] and rss]
            during = [rss for t, rss in samples[rank] if mark["start"] <= t <= mark["end"] and rss]
            report[f"rank{rank}"] = {"shard_MB": round(mark["shard_bytes"] / 1e6, 1),
                                     "largest_layer_MB": round(mark["layer_bytes"] / 1e6, 1),
                                     "held_before_save_MB": round(before[-1] / 1e6, 1) if before else None,
                                     "extra_peak_during_save_MB": round((max(during) - before[-1]) / 1e6, 1)
                                     if before and during else None}
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--format", choices=["sharded", "full"], default="sharded")
    parser.add_argument("--out", default=None)
    parser.add_argument("--marks", default=None)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for fmt in ("sharded", "full"):
        print(json.dumps(measure(fmt, args.layers, args.hidden)), flush=True)


if __name__ == "__main__":
    main()
