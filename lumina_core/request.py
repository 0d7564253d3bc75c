"""``Request``: what to generate (task, prompt, size, optional reference image) and its validation.

Pure data: the pipeline tokenises the prompt and encodes the reference. Sizes are those of the
FULL output image; for dual-panel tasks that is both panels stacked (upper panel W x H/2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

from .images import center_crop, pil_to_tensor
from .tasks import TASKS, TaskSpec, get_task
from .tokens import GRID_PIXELS, PIXELS_PER_CODE
from .errors import InputError

# The official generate path caps new tokens at 10,240 (max_gen_len); squares above 800x800 then
# never reach the image end and silently produce nothing (reference section j.13).
DEFAULT_MAX_POSITIONS = 10240
# Image start, height size token, width size token: the header before the image body.
IMAGE_HEADER_TOKENS = 3
# Room left for the prompt where its real length is not known yet (the frontend's resolution
# picker): the official templates with a sentence of prompt stay under it.
PROMPT_RESERVE_TOKENS = 64
# Aspect ratios (width:height of one panel) and panel sides that the resolution picker offers.
PICKER_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2))
PICKER_SIDES = (64, 96, 128, 192, 256, 384, 512, 640, 768, 896, 1024)


class RequestError(InputError):
    """A request that cannot be generated as given (the message says what is allowed)."""


# --- the size and token-budget rules: the ONE place (nodes, web extension, memory planner call these) ---

def body_length(rows: int, cols: int) -> int:
    """Body tokens of a code grid: every row with its new line, then the image end."""
    return rows * (cols + 1) + 1


def image_token_count(width: int, height: int) -> int:
    """Tokens of one whole image in the grammar: start, H, W, rows with new lines, end."""
    return IMAGE_HEADER_TOKENS + body_length(height // PIXELS_PER_CODE, width // PIXELS_PER_CODE)


def sequence_positions(width: int, height: int, prompt_tokens: int = 0) -> int:
    """Positions a request fills: the prompt tokens, then the whole image."""
    return prompt_tokens + image_token_count(width, height)


def cfg_rows(num_images: int, cfg: float) -> int:
    """Rows of the sampling batch: a conditional and an unconditional row per image; cfg 1 has no unconditional row."""
    return num_images if cfg == 1.0 else 2 * num_images


def height_step(task: str) -> int:
    """Grid step of the FULL height: 32 px, or 64 px for dual-panel tasks (two panels on the 32 px grid)."""
    return 2 * GRID_PIXELS if get_task(task).dual_panel else GRID_PIXELS


def _nearest_grid_sizes(value: int, step: int) -> str:
    lower = max(step, value // step * step)
    upper = -(-value // step) * step
    return f"{lower}" if lower == upper else f"{lower} or {upper}"


def largest_size(task: str, max_positions: int, prompt_tokens: int = 0) -> Optional[tuple[int, int]]:
    """Largest (width, height) with square panels whose prompt + image tokens fit; None when nothing fits."""
    panels = 2 if get_task(task).dual_panel else 1
    side = 0
    while sequence_positions(side + GRID_PIXELS, panels * (side + GRID_PIXELS), prompt_tokens) <= max_positions:
        side += GRID_PIXELS
    return (side, panels * side) if side else None


def grid_problem(task: str, width: int, height: int) -> Optional[str]:
    """Why (width, height) is off the size grid of the task, or None."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"{name} must be a positive integer, got {value!r}"
    if width % GRID_PIXELS:
        return (f"width {width} is not a multiple of {GRID_PIXELS} px; "
                f"nearest valid widths: {_nearest_grid_sizes(width, GRID_PIXELS)}")
    step_h = height_step(task)
    if height % step_h:
        if step_h != GRID_PIXELS:
            return (f"height {height} of the dual-panel task {task!r} must split into two panels whose height is "
                    f"a multiple of {GRID_PIXELS} px, i.e. a multiple of {step_h}; nearest valid heights: "
                    f"{_nearest_grid_sizes(height, step_h)}")
        return (f"height {height} is not a multiple of {GRID_PIXELS} px; "
                f"nearest valid heights: {_nearest_grid_sizes(height, step_h)}")
    return None


def budget_problem(task: str, width: int, height: int, max_positions: int, prompt_tokens: int = 0) -> Optional[str]:
    """Why the prompt + image tokens of (width, height) do not fit the model's positions, or None."""
    tokens = image_token_count(width, height)
    total = prompt_tokens + tokens
    if total <= max_positions:
        return None
    largest = largest_size(task, max_positions, prompt_tokens)
    allowed = (f"the largest {task} size this model allows is {largest[0]}x{largest[1]} (the resolution picker "
               "lists other shapes that fit)" if largest else f"no {task} image fits with this prompt; shorten it")
    return (f"{width}x{height} needs {tokens} image tokens + {prompt_tokens} prompt tokens = {total}, more than the "
            f"{max_positions} positions this model has; {allowed}")


def size_problem(task: str, width: int, height: int, max_positions: int = DEFAULT_MAX_POSITIONS,
                 prompt_tokens: int = 0) -> Optional[str]:
    """Why (task, width, height) cannot be generated, or None: the task, the grid, the panel split, the token budget."""
    try:
        get_task(task)
    except ValueError as exc:
        return str(exc)
    return grid_problem(task, width, height) or budget_problem(task, width, height, max_positions, prompt_tokens)


def size_choices(dual_panel: bool, max_positions: int,
                 prompt_tokens: int = PROMPT_RESERVE_TOKENS) -> list[dict]:
    """Grid sizes of the picker that fit the budget, fewest tokens first: {width, height, panel, ratio, tokens}."""
    seen, out = set(), []
    for side in PICKER_SIDES:
        for rw, rh in PICKER_RATIOS:
            area = side * side
            pw = max(GRID_PIXELS, round((area * rw / rh) ** 0.5 / GRID_PIXELS) * GRID_PIXELS)
            ph = max(GRID_PIXELS, round((area * rh / rw) ** 0.5 / GRID_PIXELS) * GRID_PIXELS)
            width, height = pw, (2 * ph if dual_panel else ph)
            if (width, height) in seen or sequence_positions(width, height, prompt_tokens) > max_positions:
                continue
            seen.add((width, height))
            exact = pw * rh == ph * rw  # the grid cannot always hit the nominal ratio
            out.append({"width": width, "height": height, "panel": [pw, ph],
                        "ratio": f"{'' if exact else '≈'}{rw}:{rh}", "tokens": image_token_count(width, height)})
    return sorted(out, key=lambda c: (c["tokens"], c["width"]))


def web_constants() -> dict:
    """The size rules' constants for the web extension (it never retypes them): grid, codes, header, tasks."""
    return {"grid": GRID_PIXELS, "pixels_per_code": PIXELS_PER_CODE, "header_tokens": IMAGE_HEADER_TOKENS,
            "prompt_reserve": PROMPT_RESERVE_TOKENS, "default_max_positions": DEFAULT_MAX_POSITIONS,
            "dual_panel": {key: spec.dual_panel for key, spec in TASKS.items()}}


@dataclass(frozen=True)
class Request:
    """A generation request: task, prompt, full output size and (for I2I tasks) the reference image."""

    task: str = "t2i"
    prompt: str = ""
    width: int = 768
    height: int = 768
    reference: Optional[Image.Image] = None
    template: str = "official"
    subject_description: str = ""   # object description used by the paper's subject template

    def __post_init__(self) -> None:
        self._check_fields()

    # --- derived facts ------------------------------------------------------------------------
    @property
    def spec(self) -> TaskSpec:
        """The task's catalogue entry."""
        return get_task(self.task)

    @property
    def is_dual_panel(self) -> bool:
        """True when the output is two stacked panels of W x H/2."""
        return self.spec.dual_panel

    @property
    def needs_reference(self) -> bool:
        """True when the upper panel is given by the reference image."""
        return self.spec.reference_upper

    @property
    def panel_size(self) -> tuple[int, int]:
        """(width, height) of one panel: the whole image for single-panel tasks."""
        return (self.width, self.height // 2) if self.is_dual_panel else (self.width, self.height)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(rows, cols) of the full code grid."""
        return self.height // 8, self.width // 8

    @property
    def image_tokens(self) -> int:
        """Tokens of the full image in the grammar (start, sizes, rows with new lines, end)."""
        return image_token_count(self.width, self.height)

    # --- validation ---------------------------------------------------------------------------
    def _check_fields(self) -> None:
        spec = get_task(self.task)  # raises for unknown tasks with the allowed list
        spec.template(self.template)  # raises for unknown templates with the allowed list
        problem = grid_problem(self.task, self.width, self.height)
        if problem:
            raise RequestError(problem)
        if spec.reference_upper and self.reference is None:
            raise RequestError(f"task {self.task!r} needs a reference image (it fills the upper panel)")
        if not spec.reference_upper and self.reference is not None:
            raise RequestError(f"task {self.task!r} generates the whole image and takes no reference image; "
                               "use a task whose upper panel is given (subject, edit, control_*, dense_*)")
        if self.reference is not None and not isinstance(self.reference, Image.Image):
            raise RequestError(f"reference must be a PIL image, got {type(self.reference).__name__}")
        if self.template == "paper" and spec.needs_subject and not self.subject_description.strip():
            raise RequestError(f"the paper template of task {self.task!r} needs subject_description "
                               "(a description of the object in the reference image)")

    def validate(self, max_positions: int = DEFAULT_MAX_POSITIONS, prompt_tokens: int = 0) -> "Request":
        """Check everything, including that prompt + image tokens fit in ``max_positions``; return self."""
        self._check_fields()
        problem = budget_problem(self.task, self.width, self.height, max_positions, prompt_tokens)
        if problem:
            raise RequestError(problem)
        return self

    # --- what the pipeline consumes -----------------------------------------------------------
    def prompt_text(self) -> str:
        """The task's template filled with the FULL image size and the prompt."""
        template = self.spec.template(self.template)
        return template.format(w=self.width, h=self.height, prompt=self.prompt, subject=self.subject_description)

    def reference_image(self) -> Image.Image:
        """The reference cut to the upper panel size with the official center crop (RGB kept as given)."""
        if self.reference is None:
            raise RequestError(f"task {self.task!r} has no reference image")
        panel = self.panel_size
        if self.reference.size == panel:
            return self.reference
        return center_crop(self.reference, panel)

    def reference_pixels(self) -> torch.Tensor:
        """Reference as float32 [1, 3, H/2, W] in [-1, 1], preprocessed as the official release does."""
        return pil_to_tensor(self.reference_image()).unsqueeze(0)
