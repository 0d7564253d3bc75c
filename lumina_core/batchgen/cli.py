"""``python -m lumina_core generate``: one prompt (``--prompt``) or a prompt file (``--prompts``), one code path.

The options come from the option dataclasses (``SamplingConfig``'s fields through ``cli_options``);
options the user leaves out stay None until ``apply_model_defaults`` fills them from the model
folder's own settings, so a typed value always wins and an untyped one is the model's.
Everything that can be checked without the model (settings, prompt, reference, output folder,
device) is checked before it loads: a mistake costs a second, not minutes of loading.

Examples::

    python -m lumina_core generate --model demo --prompt "a red circle in the top left"
    python -m lumina_core generate --model M --prompts prompts.txt --output out
    torchrun --nproc-per-node 8 -m lumina_core generate --model M --prompts evaluation_metadata.jsonl \
        --layout geneval --num-images 4 --sjd --output geneval_out
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_options import DTYPES, add_options, from_args, gib_budget, torch_dtype
from ..defaults import ModelDefaults
from ..errors import InputError
from .items import ItemDefaults, single_item
from .layouts import BENCHMARK_IMAGES, LAYOUTS, SINGLE
from .run import FINISH_TIMEOUT, BatchOptions, BatchSummary, run_batch, run_single

AUTO_MODEL = "auto"
OFFICIAL_MODEL = "Alpha-VLLM/Lumina-mGPT-2.0"
# The official release's cfg, guidance and top-k: what a model folder without its own settings gets.
OFFICIAL_SAMPLING = ModelDefaults.official().sampling()

MODEL_DECIDES = "the model's (its folder's sampling_defaults.json), else {}"


def choose_model(name: str, download: bool) -> str:
    """Resolve the 'auto' default: the official model when present locally (or being downloaded), else the demo."""
    if name != AUTO_MODEL:
        return name
    if download:
        return OFFICIAL_MODEL
    from ..hub import ModelNotFoundError, resolve_model

    try:
        return str(resolve_model(OFFICIAL_MODEL))
    except ModelNotFoundError:
        print(f"no local weights of {OFFICIAL_MODEL} (pass --download to fetch them): "
              "using the embedded demo model", file=sys.stderr)
        return "demo"


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    """Every option of ``generate``: the request, SamplingConfig's fields, loading, output, batch-only options."""
    from ..quant import QUANT_MODES
    from ..sampling import SamplingConfig
    from ..tasks import TASKS, TEMPLATE_KINDS

    g.add_argument("--model", default=AUTO_MODEL,
                   help="checkpoint folder, Hugging Face repo id, or 'demo' (the embedded model). Default: "
                        f"{OFFICIAL_MODEL} when its weights are present, else 'demo'")
    g.add_argument("--movqgan", default=None, help="path of movqgan_270M.ckpt (default: in the model folder or hub)")
    g.add_argument("--download", action="store_true", help="download missing weights from the Hugging Face Hub")
    g.add_argument("--prompt", default=None, help="the prompt (or --prompts FILE for a batch)")
    g.add_argument("--task", default="t2i", choices=sorted(TASKS))
    g.add_argument("--template", default="official", choices=TEMPLATE_KINDS)
    g.add_argument("--width", type=int, default=None,
                   help="full output width (default: the model's size for the task; a typed --width alone keeps "
                        "the model's height)")
    g.add_argument("--height", type=int, default=None, help="full output height; dual panel: both panels "
                   "(default: the model's size for the task)")
    g.add_argument("--reference", default=None, help="reference image (upper panel) for image-to-image tasks")
    notes = {name: MODEL_DECIDES.format(value) for name, value in OFFICIAL_SAMPLING.items()}
    add_options(g, SamplingConfig, default_note=notes)
    g.add_argument("--quant", default=None, choices=QUANT_MODES)
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch each decode step's kernels one by one instead of replaying a CUDA graph")
    g.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH]",
                   help="a peft LoRA adapter (folder or its .safetensors) at a strength (default 1); repeat to stack")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--memory-budget", type=gib_budget, default=None, metavar="GIB",
                   help="plan each generation within this many GiB (kv_cache auto may take fp8, images run in "
                        "sub-batches); refused with the options that fit when nothing does")
    g.add_argument("--output", default="outputs", help="folder for the PNGs (created; checked before loading)")
    g.add_argument("--overwrite", action="store_true", help="--prompt: replace PNGs of the same task and seed")
    g.add_argument("--prompts", default=None,
                   help="prompt file: text (a prompt a line) or JSONL (prompt, task, size, reference, seed, "
                        "images, id, template, subject; other fields kept). Runs under torchrun too; one run "
                        "per output folder (a lock)")
    g.add_argument("--layout", default="plain", choices=LAYOUTS,
                   help="--prompts: plain: <key>_<n>.png; geneval: <index>/metadata.jsonl + samples/<n>.png; "
                        "dpg: <id>.png 2x2 grid; pairs: upper/ and lower/ panels + pairs.jsonl")
    g.add_argument("--best-of", type=int, default=1, help="candidates per kept image, ranked by --verifier")
    g.add_argument("--verifier", action="append", default=None,
                   help="verifier for --best-of (repeatable, or a+b): vqascore, aesthetic, pickscore, clipscore, "
                        "demo_check")
    g.add_argument("--think", action="store_true", help="refine each prompt with an LLM first")
    g.add_argument("--think-model", default="gpt-4o", help="LLM for --think")
    g.add_argument("--think-base-url", default="", help="OpenAI-compatible endpoint for --think")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def model_defaults(model: str) -> ModelDefaults:
    """The model's own settings (``pipe.defaults`` once loaded): its folder's sampling_defaults.json, else official."""
    from ..hub import ModelNotFoundError, resolve_model

    try:
        folder = resolve_model(model)
    except (ModelNotFoundError, ValueError):
        return ModelDefaults.official()  # not a local folder (yet): the command reports it when loading
    return ModelDefaults.from_folder(folder)


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Fill options the user did not type (None) from the model's settings (size per task, cfg, guidance,
    top-k); each side of the size on its own, so a typed --width keeps the model's height; warn on stderr
    when the model does not list the task."""
    defaults = model_defaults(args.model)
    for key, value in defaults.sampling(args.cfg, args.guidance, args.top_k).items():
        setattr(args, key, value)
    args.width, args.height = defaults.size(args.task, args.width, args.height)
    warning = defaults.task_warning(args.task)
    if warning:
        print(warning, file=sys.stderr)


def _options(args: argparse.Namespace, layout: str, device: str, defaults: ItemDefaults) -> BatchOptions:
    """The run's options from the arguments (the one place SamplingConfig is built from them)."""
    from ..sampling import SamplingConfig

    sampling = from_args(SamplingConfig, args)
    think = None
    if args.think:
        from ..think import ThinkConfig

        think = ThinkConfig(base_url=args.think_base_url, model=args.think_model)
    verifiers = None
    names: list[str] = []
    if args.best_of > 1:
        from ..verify import get_verifier, verifier_names

        if not args.verifier:
            raise InputError("--best-of needs at least one --verifier to rank the candidates, e.g. --verifier vqascore")
        names = verifier_names(args.verifier)
        verifiers = {name: get_verifier(name, auto_download=args.download, device=device) for name in names}
    settings = {"model": str(args.model), "dtype": args.dtype, "quant": args.quant, "verifiers": names}
    if args.lora:
        from ..lora import check_lora_args, lora_labels

        check_lora_args(args.lora)
        settings["loras"] = lora_labels(args.lora)
    return BatchOptions(layout=layout, defaults=defaults, sampling=sampling, settings=settings, think=think,
                        best_of=args.best_of, verifiers=verifiers, progress=not args.no_progress,
                        memory_budget=args.memory_budget)


def _pipeline_loader(args: argparse.Namespace):
    def load_pipeline(device: str) -> Any:
        from ..lora import load_lora_args
        from ..pipeline import LuminaPipeline

        pipe = LuminaPipeline.from_pretrained(args.model, dtype=torch_dtype(args.dtype), device=device,
                                              quant=args.quant, compile=args.compile,
                                              cuda_graphs=not args.no_cuda_graphs, auto_download=args.download,
                                              movqgan_path=args.movqgan)
        return load_lora_args(pipe, args.lora)

    return load_pipeline


def generate_command(args: argparse.Namespace) -> int:
    """Run ``generate``: one prompt, or a prompt file sharded over torchrun's ranks; return the exit status."""
    from .. import dist

    if args.prompts is None and args.prompt is None:
        raise InputError("generate needs --prompt TEXT (one prompt) or --prompts FILE (a batch)")
    if args.prompts is not None and args.prompt is not None:
        raise InputError("give --prompt TEXT (one prompt) or --prompts FILE (a batch), not both")
    if args.prompts is not None and args.reference:
        raise InputError("--reference is per item in batch mode: give a 'reference' field in the JSONL prompt file")
    defaults = ItemDefaults(task=args.task, width=args.width, height=args.height, seed=args.seed or 0,
                            num_images=args.num_images or 1, template=args.template)
    if args.prompts is None:
        record = {"prompt": args.prompt, "seed": defaults.seed, "images": defaults.num_images}
        if args.reference:
            record["reference"] = args.reference
        item = single_item(record, defaults)
        info = dist.init(args.device)
        run_single(item, args.output, _pipeline_loader(args), _options(args, SINGLE, str(info.device), defaults),
                   str(info.device), overwrite=args.overwrite)
        return 0
    summary = batch_command(args, defaults)
    return 0 if summary.complete else 1


def batch_command(args: argparse.Namespace, defaults: ItemDefaults) -> BatchSummary:
    """Run ``generate --prompts``: parse, shard over torchrun ranks, generate, merge; print the summary on rank 0."""
    from .. import dist

    expected = BENCHMARK_IMAGES.get(args.layout)
    if expected and defaults.num_images != expected:
        print(f"note: the {args.layout} scorer expects {expected} images per prompt; this run makes "
              f"{defaults.num_images} (--num-images)", file=sys.stderr)
    info = dist.init(args.device, timeout=FINISH_TIMEOUT)
    options = _options(args, args.layout, str(info.device), defaults)
    summary = None
    try:
        summary = run_batch(args.prompts, args.output, _pipeline_loader(args), options, info)
    finally:
        dist.shutdown(clean=summary is not None)
    if info.is_main:
        print(summary.text())
    return summary

