"""Command line: `python -m lumina_core generate --model FOLDER_OR_REPO --prompt "..." [options]`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .fileio import atomic_path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
AUTO_MODEL = "auto"
# The official CLI's sampling defaults, used where neither the user nor the model folder sets one.
OFFICIAL_SAMPLING = {"cfg": 4.0, "guidance": "official", "top_k": 4096}
OFFICIAL_MODEL = "Alpha-VLLM/Lumina-mGPT-2.0"


def choose_model(name: str, download: bool) -> str:
    """Resolve the 'auto' default: the official model when present locally (or being downloaded), else the demo."""
    if name != AUTO_MODEL:
        return name
    if download:
        return OFFICIAL_MODEL
    from .hub import ModelNotFoundError, resolve_model

    try:
        return str(resolve_model(OFFICIAL_MODEL))
    except ModelNotFoundError:
        print(f"no local weights of {OFFICIAL_MODEL} (pass --download to fetch them): "
              "using the embedded demo model", file=sys.stderr)
        return "demo"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `generate` command."""
    from .tasks import TASKS

    parser = argparse.ArgumentParser(prog="python -m lumina_core", description="Lumina-mGPT 2.0 from the shell.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images and write PNGs (settings in their metadata)")
    g.add_argument("--model", default=AUTO_MODEL,
                   help="checkpoint folder, Hugging Face repo id, or 'demo' (the embedded model). Default: "
                        f"{OFFICIAL_MODEL} when its weights are present, else 'demo'")
    g.add_argument("--movqgan", default=None, help="path of movqgan_270M.ckpt (default: in the model folder or hub)")
    g.add_argument("--download", action="store_true", help="download missing weights from the Hugging Face Hub")
    g.add_argument("--prompt", default=None, help="the prompt (or --prompts FILE for a batch)")
    g.add_argument("--task", default="t2i", choices=sorted(TASKS))
    g.add_argument("--template", default="official", choices=["official", "paper"])
    g.add_argument("--width", type=int, default=None, help="full output width (default: the task's)")
    g.add_argument("--height", type=int, default=None, help="full output height; dual panel: both panels")
    g.add_argument("--reference", default=None, help="reference image (upper panel) for image-to-image tasks")
    # None = not typed: filled from the model folder's sampling_defaults.json, else OFFICIAL_SAMPLING.
    g.add_argument("--cfg", type=float, default=None, help=f"default {OFFICIAL_SAMPLING['cfg']}")
    g.add_argument("--guidance", default=None, choices=["official", "constant"],
                   help=f"default {OFFICIAL_SAMPLING['guidance']}")
    g.add_argument("--top-k", type=int, default=None, help=f"default {OFFICIAL_SAMPLING['top_k']}")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--sjd", action="store_true", help="speculative Jacobi decoding (same distribution, fewer passes)")
    g.add_argument("--sjd-window", type=int, default=16)
    g.add_argument("--coupled", action="store_true", help="coupled-noise SJD variant (needs --sjd)")
    g.add_argument("--quant", default=None, choices=["int8", "int4"])
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch each decode step's kernels one by one instead of replaying a CUDA graph")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--output", default="outputs", help="folder for the PNGs")
    from .batch import add_batch_arguments

    add_batch_arguments(g)  # --prompts FILE and the batch-only options (lumina_core/batch.py)
    return parser


def _write_png(image, path: Path, metadata: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("lumina_mgpt2", json.dumps(metadata, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def generate_command(args: argparse.Namespace) -> list[Path]:
    """Run `generate`: load, sample with a progress bar, decode, write PNGs; return their paths."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from .images import tensor_to_pil
    from .pipeline import LuminaPipeline
    from .request import Request
    from .sampling import SamplingConfig
    from .tasks import get_task

    spec = get_task(args.task)
    sampling = SamplingConfig(cfg=args.cfg, guidance=args.guidance, top_k=args.top_k, temperature=args.temperature,
                              sjd=args.sjd, sjd_window=args.sjd_window, sjd_coupled=args.coupled, seed=args.seed,
                              num_images=args.num_images)
    reference = Image.open(args.reference) if args.reference else None
    request = Request(task=args.task, prompt=args.prompt, width=args.width or spec.default_width,
                      height=args.height or spec.default_height, reference=reference, template=args.template)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = LuminaPipeline.from_pretrained(args.model, dtype=dtype, device=args.device, quant=args.quant,
                                          compile=args.compile, auto_download=args.download, movqgan_path=args.movqgan,
                                          cuda_graphs=not args.no_cuda_graphs)
    bar = tqdm(total=None, unit="tok", desc="sampling", disable=getattr(args, "no_progress", False))

    def progress(done: int, total: int, partial) -> None:
        bar.total = total
        bar.update(done - bar.n)

    out = pipe.generate(request, sampling, progress=progress)
    bar.close()
    images = pipe.decode(out)
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(args.model), "task": args.task, "template": args.template, "prompt": args.prompt,
                "width": request.width, "height": request.height, "cfg": args.cfg, "guidance": args.guidance,
                "top_k": args.top_k, "temperature": args.temperature, "sjd": args.sjd,
                "sjd_window": args.sjd_window if args.sjd else None, "coupled": args.coupled, "quant": args.quant,
                "reference": Path(args.reference).name if args.reference else None}
    paths = []
    for i, (seed, image) in enumerate(zip(out.seeds, images)):
        path = folder / f"lumina_{args.task}_{seed:06d}.png"
        _write_png(tensor_to_pil(image), path, {**settings, "seed": seed, "sampler_stats": {
            k: v for k, v in out.stats.items() if isinstance(v, (int, float, str))}})
        paths.append(path)
    print(f"{len(paths)} image(s) in {out.stats['seconds']:.1f} s, {out.stats['forward_passes']} forward passes: "
          + ", ".join(str(p) for p in paths))
    return paths


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Fill options the user did not type (None) from the model folder's sampling_defaults.json
    (sizes per task, cfg, guidance, top-k; the embedded demo has one), else the official defaults."""
    from .hub import ModelNotFoundError, resolve_model

    defaults: dict = {}
    try:
        path = Path(resolve_model(args.model)) / "sampling_defaults.json"
        if path.is_file():
            defaults = json.loads(path.read_text(encoding="utf-8"))
    except (ModelNotFoundError, ValueError):
        pass  # not a local folder (yet): the command reports it when loading
    for key, official in OFFICIAL_SAMPLING.items():
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key, official))
    size = defaults.get("sizes", {}).get(args.task)
    if size and args.width is None and args.height is None:
        args.width, args.height = size


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; bad settings exit with status 2 and a message naming what is allowed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.model = choose_model(args.model, args.download)
        apply_model_defaults(args)
        if args.command == "generate" and args.prompts:
            from .batch import batch_command

            summary = batch_command(args)
            return 0 if summary.complete else 1
        if args.command == "generate":
            if args.prompt is None:
                parser.error("generate needs --prompt TEXT (one prompt) or --prompts FILE (a batch)")
            generate_command(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
