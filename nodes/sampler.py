"""ARSampler-SJD: pipe + request -> LUMINA_CODES, with a progress bar per row, live previews and cancel."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import torch

from ..lumina_core.kv_cache import KV_CACHE_MODES
from ..lumina_core.sampling import GUIDANCE_MODES
from . import comfy_bridge as bridge
from .common import CATEGORY, CODES, MODEL_DEFAULT, PIPE, REQUEST, NodeInputError

logger = logging.getLogger(__name__)

MAX_SEED = 0xFFFFFFFFFFFFFFFF
GUIDANCE_TOOLTIP = ("How cfg is applied over the image. model default: the model's own (official for the "
                    "released model, constant for the demo). official: the official schedule, which never lets "
                    "guidance fall below 4.0 inside the image: a cfg in (1, 4) becomes 4.0 at the first image "
                    "token, a cfg above 4 decays towards 4.0 as the rows fill (cfg 1 = off stays off). "
                    "constant: cfg at every token, so a cfg below 4 really applies (small models such as the "
                    "built-in demo want constant with cfg 1.5-2).")
# Share of the generation time that previews may use (the issue allows 10 %; stay well under).
PREVIEW_BUDGET = 0.05
PREVIEW_EVERY_ROWS = 4
# No preview before this much generation time: short runs need none, and the first decode (whose
# cost is not known yet) stays small against the time already spent. The environment variable
# overrides it (e.g. 0 to see previews of short runs, as the server test does).
PREVIEW_FIRST_AFTER_S = 1.0
PREVIEW_FIRST_AFTER_ENV = "LUMINA_MGPT2_PREVIEW_FIRST_AFTER_S"


def first_preview_delay() -> float:
    """Seconds of generation before the first preview: the environment override, else PREVIEW_FIRST_AFTER_S."""
    raw = os.environ.get(PREVIEW_FIRST_AFTER_ENV, "").strip()
    if not raw:
        return PREVIEW_FIRST_AFTER_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0:  # also refuses nan
        raise ValueError(f"{PREVIEW_FIRST_AFTER_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


class PreviewPolicy:
    """Decides when to decode a preview so that previews cost at most ``budget`` of the elapsed time.

    The cost of a preview grows with the rows decoded, so the next cost is predicted from the last
    one scaled by the row count; a preview is made only while the total stays within the budget.
    """

    def __init__(self, budget: float = PREVIEW_BUDGET, every_rows: int = PREVIEW_EVERY_ROWS,
                 clock: Callable[[], float] = time.perf_counter, first_after: Optional[float] = None):
        self.budget = budget
        self.first_after = first_preview_delay() if first_after is None else first_after
        self.every_rows = max(1, every_rows)
        self.clock = clock
        self.start = clock()
        self.spent = 0.0          # seconds spent decoding previews
        self.last_cost = 0.0
        self.last_rows = 0
        self.count = 0

    def due(self, rows_done: int) -> bool:
        """True when a preview of ``rows_done`` rows fits the budget and is far enough from the last one."""
        if rows_done <= 0 or rows_done - self.last_rows < self.every_rows:
            return False
        elapsed = self.clock() - self.start
        predicted = self.last_cost * rows_done / max(1, self.last_rows) if self.last_rows else 0.0
        if self.count == 0:
            # The first preview has no cost estimate yet: wait until enough generation time has passed.
            return elapsed >= self.first_after
        return self.spent + predicted <= self.budget * (elapsed - self.spent)

    def record(self, rows_done: int, seconds: float) -> None:
        """Account for a preview of ``rows_done`` rows that took ``seconds``."""
        self.spent += seconds
        self.last_cost = seconds
        self.last_rows = rows_done
        self.count += 1

    @property
    def share(self) -> float:
        """Fraction of the elapsed time spent on previews so far."""
        elapsed = self.clock() - self.start
        return self.spent / elapsed if elapsed > 0 else 0.0


class RowProgress:
    """The pipeline's progress callback: one progress-bar step per row, a decoded preview when the policy allows."""

    def __init__(self, pipe: Any, total_rows: int, node_id: Optional[str] = None,
                 policy: Optional[PreviewPolicy] = None, previews: bool = True):
        self.pipe = pipe
        self.total_rows = total_rows
        self.bar = bridge.Progress(total_rows, node_id=node_id)
        self.policy = policy or PreviewPolicy()
        self.previews = previews
        self.rows_seen = 0

    def __call__(self, done_tokens: int, total_tokens: int, partial_codes: torch.Tensor) -> None:
        rows_done = int(partial_codes.shape[1]) if partial_codes is not None and partial_codes.dim() == 3 else 0
        if rows_done == self.rows_seen and rows_done < self.total_rows:
            return  # called within a row (SJD windows): the bar moves per row
        self.rows_seen = rows_done
        preview = None
        if self.previews and 0 < rows_done < self.total_rows and self.policy.due(rows_done):
            started = time.perf_counter()
            preview = self._decode_preview(partial_codes)
            self.policy.record(rows_done, time.perf_counter() - started)
        self.bar.update(min(rows_done, self.total_rows), preview)

    def _decode_preview(self, partial_codes: torch.Tensor) -> Any:
        from ..lumina_core.images import tensor_to_pil

        with torch.inference_mode():
            pixels = self.pipe.decode(partial_codes[:1].to(self.pipe.device))
        return tensor_to_pil(pixels[0])


KV_CACHE_TOOLTIP = ("KV cache storage. auto: bf16, or fp8 (e4m3, half the bytes) when the memory plan needs it "
                    "to fit this card; fp8 always; bf16 never fp8.")
NO_STREAMING = ("ComfyUI runs in low-VRAM mode, which would stream the 7B's layers from the CPU for every token "
                "(about 0.5 s per step, 80 minutes per 768x768 image): start ComfyUI without --lowvram/--novram "
                "and load with quantization int4 (a 12 GiB card runs 768x768)")


def memory_plan(pipe: Any, request: Any, sampling: Any) -> Any:
    """The memory plan on the compute device (MemoryPlanError -> node error with the options), or an estimate."""
    from ..lumina_core.memory import MemoryPlanError, estimate_for_pipeline

    budget = bridge.plannable_memory(bridge.torch_device())
    if budget is None:
        return estimate_for_pipeline(pipe, request, sampling, kv_cache=sampling.kv_cache)
    try:
        return pipe.plan_memory(request, sampling, budget)
    except MemoryPlanError as exc:
        raise NodeInputError(str(exc)) from None


def resolved_sampling(pipe: Any, cfg: float, top_k: int, guidance: str) -> dict:
    """cfg, guidance and top_k to sample with: each widget's value, or the model's own where it says model default."""
    return pipe.defaults.sampling(cfg=cfg or None, guidance=None if guidance == MODEL_DEFAULT else guidance,
                                  top_k=top_k or None)


class LuminaMGPT2ARSamplerSJD:
    """Samples the image tokens row by row (classifier-free guidance, top-k, optional speculative Jacobi decoding)."""

    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = (CODES,)
    RETURN_NAMES = ("codes",)
    OUTPUT_TOOLTIPS = ("Generated image codes; connect to VQDecode.",)
    DESCRIPTION = ("Generates batch_size images for the request. The bar moves once per image row and shows a "
                   "preview of the rows so far; Cancel stops it within a row.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """pipe, request, seed, cfg, top_k, temperature, sjd, sjd_window, batch_size; optional guidance."""
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The Loader's pipe; 'model default' settings come from its model."}),
                "request": (REQUEST, {"tooltip": "What to generate, from DualPanelComposer."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Random seed of the first image; image i of the batch uses seed + i."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 16.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale; 0 = the model's default (4.0 for "
                                             "the released model, 1.5 for the demo); 1 = off."}),
                "top_k": ("INT", {"default": 0, "min": 0, "max": 16384,
                                  "tooltip": "Sample among the k most likely image codes; 0 = the model's default "
                                             "(4096 for the released model, 50 for the demo)."}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 2.0, "step": 0.01, "round": 0.01,
                                          "tooltip": "Softmax temperature of the image codes (1.0 official; lower "
                                                     "is safer and plainer)."}),
                "sjd": ("BOOLEAN", {"default": False, "tooltip": "Speculative Jacobi decoding: several tokens "
                                    "per step, same distribution, faster."}),
                "sjd_window": ("INT", {"default": 16, "min": 2, "max": 64,
                                       "tooltip": "Tokens guessed per SJD step."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Images per run (feed "
                                       "several to Verifier-BestOfN)."}),
            },
            # Optional and last, so that workflows saved before it existed keep their widget values in
            # line and queue without it (the frontend and sample() then use the model's default).
            "optional": {
                "guidance": ([MODEL_DEFAULT, *GUIDANCE_MODES], {"default": MODEL_DEFAULT,
                                                                "tooltip": GUIDANCE_TOOLTIP}),
                "kv_cache": (list(KV_CACHE_MODES), {"default": "auto", "tooltip": KV_CACHE_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, pipe: Any, request: Any, seed: int, cfg: float, top_k: int, temperature: float, sjd: bool,
               sjd_window: int, batch_size: int, guidance: str = MODEL_DEFAULT, kv_cache: str = "auto",
               unique_id: Optional[str] = None,
               previews: bool = True) -> dict:
        """Run the pipeline's generate under ComfyUI's memory manager, progress bar and cancel button."""
        from ..lumina_core.sampling import GenerationCancelled, SamplingConfig

        if not hasattr(pipe, "generate"):
            raise NodeInputError("the pipe input must come from the Lumina-mGPT 2.0 Loader")
        if guidance not in (MODEL_DEFAULT, *GUIDANCE_MODES):
            raise NodeInputError(f"guidance {guidance!r} is not one of {[MODEL_DEFAULT, *GUIDANCE_MODES]}")
        settings = resolved_sampling(pipe, float(cfg), int(top_k), guidance)
        try:
            sampling = SamplingConfig(**settings, temperature=float(temperature), sjd=bool(sjd),
                                      sjd_window=int(sjd_window), seed=int(seed), num_images=int(batch_size),
                                      kv_cache=kv_cache)
        except ValueError as exc:
            raise NodeInputError(f"{exc} (0 = the model's default)") from None
        shown = [f"{request.task} {request.width}x{request.height}, cfg {sampling.cfg:g} ({sampling.guidance} "
                 f"guidance), top_k {sampling.top_k}, seed {sampling.seed}"
                 + (f"..{sampling.seed + sampling.num_images - 1}" if sampling.num_images > 1 else "")]
        warning = pipe.defaults.task_warning(request.task)
        if warning:
            logger.warning("Lumina-mGPT 2.0: %s", warning)
            shown.append(warning)
        if bridge.streams_layers():
            raise NodeInputError(NO_STREAMING)
        plan = memory_plan(pipe, request, sampling)  # before anything moves: a refusal costs nothing
        # ComfyUI counts the pipeline's weights itself; reserve what the run adds (KV cache, activations, decode).
        bridge.load_on_device(pipe, memory_required=plan.peak_bytes - plan.weights_bytes)
        rows = request.height // 8
        progress = RowProgress(pipe, rows, node_id=unique_id, previews=previews)
        started = time.perf_counter()
        try:
            codes = pipe.generate(request, sampling, progress=progress, should_cancel=bridge.interrupted, plan=plan)
        except GenerationCancelled:
            bridge.free_cache()
            bridge.raise_interrupted()
            raise
        except Exception as exc:
            if bridge.is_oom(exc):
                bridge.free_cache()
            raise
        bridge.free_cache()
        seconds = time.perf_counter() - started
        codes.stats.setdefault("seconds", seconds)
        codes.stats["preview_seconds"] = progress.policy.spent
        codes.stats["previews"] = progress.policy.count
        logger.info("Lumina-mGPT 2.0: %d image(s) %dx%d in %.1f s (previews %.1f%% of the time)", batch_size,
                    request.width, request.height, seconds, 100 * progress.policy.spent / max(seconds, 1e-9))
        return {"ui": {"text": shown}, "result": (codes,)}
