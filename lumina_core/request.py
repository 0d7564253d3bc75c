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
from .tasks import TaskSpec, get_task
from .tokens import GRID_PIXELS, image_token_count
from .errors import InputError

# The official generate path caps new tokens at 10,240 (max_gen_len); squares above 800x800 then
# never reach the image end and silently produce nothing (reference section j.13).
DEFAULT_MAX_POSITIONS = 10240


class RequestError(InputError):
    """A request that cannot be generated as given (the message says what is allowed)."""


def _nearest_grid_sizes(value: int, step: int) -> str:
    lower = max(step, value // step * step)
    upper = -(-value // step) * step
    return f"{lower}" if lower == upper else f"{lower} or {upper}"


def largest_square_size(max_positions: int, prompt_tokens: int = 0, step: int = GRID_PIXELS) -> int:
    """Largest square side (multiple of ``step``) whose prompt + image tokens fit in ``max_positions``; 0 if none."""
    side = 0
    while prompt_tokens + image_token_count(side + step, side + step) <= max_positions:
        side += step
    return side


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
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        if self.width % GRID_PIXELS:
            raise RequestError(f"width {self.width} is not a multiple of {GRID_PIXELS} px; "
                               f"nearest valid widths: {_nearest_grid_sizes(self.width, GRID_PIXELS)}")
        step_h = 2 * GRID_PIXELS if spec.dual_panel else GRID_PIXELS
        if self.height % step_h:
            if spec.dual_panel:
                raise RequestError(
                    f"height {self.height} of the dual-panel task {self.task!r} must split into two panels whose "
                    f"height is a multiple of {GRID_PIXELS} px, i.e. a multiple of {step_h}; nearest valid "
                    f"heights: {_nearest_grid_sizes(self.height, step_h)}"
                )
            raise RequestError(f"height {self.height} is not a multiple of {GRID_PIXELS} px; "
                               f"nearest valid heights: {_nearest_grid_sizes(self.height, step_h)}")
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
        total = prompt_tokens + self.image_tokens
        if total > max_positions:
            step = 2 * GRID_PIXELS if self.is_dual_panel else GRID_PIXELS
            side = largest_square_size(max_positions, prompt_tokens, step)
            raise RequestError(
                f"{self.width}x{self.height} needs {self.image_tokens} image tokens + {prompt_tokens} prompt tokens "
                f"= {total}, more than the allowed {max_positions} positions; the largest allowed square is "
                f"{side}x{side}. To go larger, raise the cap explicitly (max_positions) if the model and memory allow"
            )
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
