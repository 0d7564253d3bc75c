"""`fit`: fine-tuning (or training from a config) with the official loss, AdamW, warm-up + cosine,
gradient accumulation, clipping, bf16 autocast over float32 master weights, per-layer activation
checkpointing, FSDP2 under torchrun, exact resume and SIGTERM-safe checkpoints.

Data order: optimizer step s consumes stream positions [s*G, (s+1)*G) of a seeded per-epoch
permutation (G = micro_batch x accum x world_size); micro-batch m of rank r takes positions
(m*W + r)*micro_batch ..., and whether a sample is unconditional is decided by its position alone.
So a run with the same G gives the same batches for any split into processes and accumulation.

SIGTERM/SIGINT set a flag; the loop saves at the next step boundary (all ranks agree through an
all-reduce) and returns. Note that torchrun's agent, when it is the one signalled, gives its workers
about 30 s before SIGKILL: with very large models, signal the workers (e.g. SLURM's srun) or rely
on --save-every.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import LuminaTransformer, build_transformer
from ..errors import InputError
from ..fileio import atomic_path, atomic_write_text
from .checkpoint import (choose_resume, load_checkpoint, load_full_model_state, read_official_weights,
                         save_checkpoint, set_aside, start_run_folder)
from .stream import IGNORE_INDEX, SampleOrder, TokenDataset, collate, global_batch_positions, make_sample, \
    rank_micro_batches
from .. import dist
from ..dist import RankInfo, barrier
from .distributed import all_reduce_mean, any_rank, shard_model
from .files import writing
from .options import FitOptions
from .lora import average_adapter_gradients, build_lora_training_module

logger = logging.getLogger(__name__)
LOG_FILE = "log.jsonl"


# --------------------------------------------------------------------------------------------
# Loss

def _chunk_loss_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # the official model casts logits to float32 after lm_head
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
    return torch.stack((ce.sum(), lse.pow(2).sum()))


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   z_loss_weight: float, chunk_size: int = 4096) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Official loss: mean CE over shifted labels != -100, plus z_loss_weight * mean logsumexp^2.

    Only labelled positions are projected to the vocabulary, `chunk_size` rows at a time, each
    chunk recomputed in backward, so the [tokens, vocab] logits (171k columns) never exist at once.
    """
    shifted = labels[:, 1:]
    valid = shifted != IGNORE_INDEX
    h = hidden[:, :-1][valid]
    targets = shifted[valid]
    sums = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        part = (h[start:start + chunk_size], lm_head_weight, targets[start:start + chunk_size])
        if torch.is_grad_enabled():
            sums = sums + torch.utils.checkpoint.checkpoint(_chunk_loss_sums, *part, use_reentrant=False)
        else:
            sums = sums + _chunk_loss_sums(*part)
    count = max(int(targets.numel()), 1)
    ce, z = sums[0] / count, sums[1] / count
    # A micro-batch without labelled tokens still has to touch every parameter (FSDP, gradient sync).
    loss = ce + z_loss_weight * z + 0.0 * hidden.sum()
    return loss, {"ce": ce.detach(), "z": z.detach(), "tokens": torch.tensor(float(targets.numel()))}


class TrainingModule(nn.Module):
    """Transformer + loss in one forward, so FSDP's root hooks cover the embeddings and lm_head."""

    def __init__(self, transformer: LuminaTransformer, loss_chunk: int = 4096, grad_checkpointing: bool = False,
                 offload_activations: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        self.loss_chunk = loss_chunk
        transformer.gradient_checkpointing = grad_checkpointing
        transformer.offload_checkpointed_inputs = offload_activations

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.transformer.hidden_states(input_ids)
        return causal_lm_loss(hidden, self.transformer.lm_head.weight, labels,
                              self.transformer.config.z_loss_weight, self.loss_chunk)


# --------------------------------------------------------------------------------------------
# Schedule, optimizer, model

def lr_at(step: int, opts: FitOptions, total_steps: int) -> float:
    """Official schedule: linear warm-up to lr, then half-cosine down to min_lr at the last step."""
    min_lr = opts.lr if opts.min_lr is None else opts.min_lr
    if step < opts.warmup_steps:
        return opts.lr * step / opts.warmup_steps
    span = max(1, total_steps - opts.warmup_steps)
    progress = min(1.0, (step - opts.warmup_steps) / span)
    return min_lr + (opts.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(module: nn.Module, opts: FitOptions) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)


def model_config(opts: FitOptions) -> ModelConfig:
    """The architecture: from the init checkpoint, a config.json, or a preset; with training overrides."""
    if opts.init_from:
        cfg = ModelConfig.from_pretrained(opts.init_from)
    else:
        path = Path(opts.config)
        if path.is_dir():
            cfg = ModelConfig.from_pretrained(path)
        elif path.is_file():
            cfg = ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        else:
            cfg = ModelConfig.preset(opts.config)
    return dataclasses.replace(cfg, dropout=opts.dropout, z_loss_weight=opts.z_loss_weight)


def build_training_module(cfg: ModelConfig, opts: FitOptions, info: RankInfo, initial: bool) -> TrainingModule:
    """Build on the meta device, shard with FSDP2 when distributed, materialise, load the starting weights."""
    if opts.lora_rank is not None:  # frozen base + adapters; a full replica per rank (train/lora.py)
        return build_lora_training_module(cfg, opts, info.device)
    with torch.device("meta"):
        transformer = build_transformer(cfg)
    module = TrainingModule(transformer, opts.loss_chunk, opts.grad_checkpointing, opts.offload_activations)
    if info.distributed:
        shard_model(module, transformer.model.layers, opts.dtype if opts.dtype != torch.float32 else None)
    module.to_empty(device=info.device)
    if initial and info.distributed and not info.is_main:
        load_full_model_state(module, {}, info)  # receives rank 0's weights
    elif initial:  # a resumed run loads its own checkpoint instead
        if opts.init_from:
            state = read_official_weights(opts.init_from)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(opts.seed)
                fresh = build_transformer(cfg)  # CPU, seeded (init_weights): the same weights for any world size
            state = {k: v.detach() for k, v in fresh.state_dict().items()}
        load_full_model_state(module, state, info)
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


# --------------------------------------------------------------------------------------------
# The loop

class _StopRequest:
    """SIGTERM/SIGINT handler: remember the request; the loop saves at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: no handler, the run still works
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("signal %d received: saving at the end of this step, then exiting", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class FitResult:
    """What a `fit` call did."""

    step: int
    total_steps: int
    losses: list[float]
    interrupted: bool
    checkpoint: str | None


def fit(opts: FitOptions) -> FitResult:
    """Train; returns after `steps`, after `stop_after`, or after a SIGTERM (checkpoint saved in each case)."""
    info = dist.init(opts.device)
    dataset = TokenDataset(opts.data)
    tokenizer_dir = str(dataset.tokenizer_dir) if (dataset.tokenizer_dir / "tokenizer.json").is_file() else (
        opts.init_from if opts.init_from else None)
    if opts.init_from and tokenizer_dir != opts.init_from:
        _check_same_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, Path(opts.init_from))
    cfg = model_config(opts)
    global_batch = opts.micro_batch * opts.accum * info.world_size
    total_steps = opts.steps if opts.steps is not None else math.ceil(opts.epochs * len(dataset) / global_batch)
    order = SampleOrder(len(dataset), opts.seed, opts.uncond_prob,
                        lengths=dataset.lengths() if opts.group_by_length else None, group_size=global_batch)
    out = Path(opts.out)
    if info.is_main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        start_run_folder(out)
    resume = choose_resume(out, opts.resume)  # every rank reads the same files and picks the same folder
    barrier(info)
    if info.is_main:
        if resume.note:
            logger.warning("%s", resume.note)
        set_aside(resume.damaged)
    torch.manual_seed(opts.seed + info.rank)
    module = build_training_module(cfg, opts, info, initial=resume.folder is None)
    # LoRA (train/lora.py) wraps the model here: before the optimizer collects its trainable parameters.
    optimizer = make_optimizer(module, opts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, opts, total_steps) / opts.lr)
    step = 0
    if resume.folder is not None:
        state = load_checkpoint(resume.folder, module, optimizer, scheduler, info)
        if state["global_batch"] != global_batch:
            raise InputError(f"{resume.folder} was trained with a global batch of {state['global_batch']} samples; "
                             f"this run has {global_batch} (micro_batch x accum x world_size). Keep it equal "
                             "so the data position means the same")
        step = state["step"]
        if info.is_main:
            logger.info("resumed from %s at step %d", resume.folder, step)
    log_file = out / LOG_FILE
    if info.is_main:
        trim_log(log_file, step)
    sampler = sample_pipeline(module, opts, info, tokenizer_dir) if opts.sample_every else None


    def trainer_state() -> dict[str, Any]:
        return {"step": step, "total_steps": total_steps, "data_position": step * global_batch,
                "epoch": order.epoch_of(step * global_batch), "global_batch": global_batch,
                "world_size": info.world_size, "seed": opts.seed, "model_config": dataclasses.asdict(cfg),
                "tokenizer_dir": tokenizer_dir, "data": str(Path(opts.data).resolve()),
                "options": dataclasses.asdict(opts)}

    autocast = torch.autocast(device_type=info.device.type, dtype=opts.dtype, enabled=opts.dtype != torch.float32)
    stopper = _StopRequest()
    stopper.install()
    losses: list[float] = []
    interrupted = False
    saved: Path | None = None
    end_step = total_steps if opts.stop_after is None else min(total_steps, step + opts.stop_after)
    try:
        while step < end_step:
            t0 = time.perf_counter()
            micro = rank_micro_batches(global_batch_positions(step, global_batch), info.world_size, info.rank,
                                       opts.micro_batch)
            loss_sum = torch.zeros(3, device=info.device)  # stays on the device: no host sync per micro-batch
            seen_tokens = 0
            for positions in micro:
                samples = [make_sample(*dataset[idx], uncond)
                           for idx, uncond in (order.sample_at(p) for p in positions)]
                input_ids, labels = collate(samples, opts.max_seq_len)
                with autocast:
                    loss, parts = module(input_ids.to(info.device), labels.to(info.device))
                (loss / len(micro)).backward()
                loss_sum += torch.stack((loss.detach().float(), parts["ce"].float(), parts["z"].float()))
                seen_tokens += int(sum(min(len(s[0]), opts.max_seq_len) for s in samples))
            if opts.lora_rank is not None:
                average_adapter_gradients(module, info)  # data parallel LoRA (no FSDP)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), opts.clip_grad)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            means = all_reduce_mean(loss_sum / len(micro), info).cpu()
            tokens = all_reduce_mean(torch.tensor([float(seen_tokens)], device=info.device), info).item() * info.world_size
            elapsed = time.perf_counter() - t0
            losses.append(float(means[0]))
            if info.is_main and (step % opts.log_every == 0 or step == end_step):
                record = {"step": step, "loss": float(means[0]), "ce": float(means[1]), "z": float(means[2]),
                          "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / max(elapsed, 1e-9),
                          "epoch": order.epoch_of(step * global_batch)}
                with writing(log_file), open(log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                logger.info("step %d/%d loss %.4f (ce %.4f, z %.2f) lr %.3g grad %.3g %.0f tok/s", step,
                            total_steps, record["loss"], record["ce"], record["z"], lr, record["grad_norm"],
                            record["tokens_per_s"])
            if sampler is not None and step % opts.sample_every == 0:
                write_samples(sampler, module, opts, info, step)
            stop = any_rank(stopper.requested, info)
            if stop or step % opts.save_every == 0 or step == end_step:
                saved = save_checkpoint(out, module, optimizer, scheduler, trainer_state(), info, opts.keep,
                                        prunable=resume.prunable)
            if stop:
                interrupted = True
                break
    finally:
        stopper.restore()
    return FitResult(step=step, total_steps=total_steps, losses=losses, interrupted=interrupted,
                     checkpoint=str(saved) if saved else None)


def _check_same_tokenizer(data_tokenizer: Path | None, model_folder: Path) -> None:
    """The data must have been tokenised with the checkpoint's own tokenizer (same ids)."""
    model_file = model_folder / "tokenizer.json"
    if data_tokenizer is None or not model_file.is_file():
        return
    if (data_tokenizer / "tokenizer.json").read_bytes() != model_file.read_bytes():
        raise InputError(f"the data in {data_tokenizer.parent} was prepared with another tokenizer than the one in "
                         f"{model_folder}; run `prepare --tokenizer {model_folder}` again")


def trim_log(log_file: Path, step: int) -> None:
    """Drop log records past `step` (steps a killed run logged after its last checkpoint, now redone)."""
    if not log_file.is_file():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
        if record_step <= step:
            kept.append(line)
    if len(kept) != len(lines):
        with writing(log_file):
            atomic_write_text(log_file, "".join(line + "\n" for line in kept))


def sample_pipeline(module: TrainingModule, opts: FitOptions, info: RankInfo, tokenizer_dir: str | None):
    """A LuminaPipeline around the live transformer for image samples: MoVQGAN and tokenizer loaded once."""
    from ..movqgan import load_movqgan
    from ..pipeline import LuminaPipeline, find_movqgan
    from ..tokens import TokenLayout, load_text_tokenizer

    if tokenizer_dir is None:
        raise InputError("image samples (--sample-every) need the tokenizer; the data folder has no tokenizer/ copy")
    movq_path = Path(opts.movqgan) if opts.movqgan else find_movqgan(Path(opts.init_from or opts.data))
    tokenizer = load_text_tokenizer(tokenizer_dir)
    # The starting config's vocabulary_map locates the image codes as inference does (pipeline.from_pretrained).
    config_file = Path(opts.init_from or opts.config or "") / "config.json"
    if opts.config and Path(opts.config).is_file():
        config_file = Path(opts.config)
    vocabulary_map = json.loads(config_file.read_text(encoding="utf-8")).get("vocabulary_map") \
        if config_file.is_file() else None
    return LuminaPipeline(module.transformer, load_movqgan(movq_path, device=info.device), tokenizer,
                          TokenLayout.from_tokenizer(tokenizer, vocabulary_map))


def write_samples(pipe, module: TrainingModule, opts: FitOptions, info: RankInfo, step: int) -> Path | None:
    """Sample one image with the current weights into `<out>/samples/step_NNNNNNN.png` (collective under FSDP).

    Goes through `LuminaPipeline.generate` (the inference sampler) with the live transformer; under
    FSDP every rank runs the same seeded decode, the root parameters gathered for its duration.
    """
    from ..images import tensor_to_pil
    from ..request import Request
    from ..sampling import SamplingConfig

    request = Request(task="t2i", prompt=opts.sample_prompt, width=opts.sample_size, height=opts.sample_size)
    sharded = hasattr(module, "unshard")
    module.eval()
    try:
        if sharded:
            module.unshard()
        with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []), \
                torch.autocast(device_type=info.device.type, dtype=opts.dtype, enabled=opts.dtype != torch.float32):
            codes = pipe.generate(request, SamplingConfig(seed=opts.seed))
        image = pipe.decode(codes)[0]
    finally:
        if sharded:
            module.reshard()
        module.train()
    if not info.is_main:
        return None
    path = Path(opts.out) / "samples" / f"step_{step:07d}.png"
    with writing(path), atomic_path(path) as tmp:
        tensor_to_pil(image.float().cpu()).save(tmp, format="PNG")
    logger.info("sample written to %s", path)
    return path
