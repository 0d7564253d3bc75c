"""DualPanelComposer: task, size, prompt and optional reference/control image -> LUMINA_REQUEST."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..lumina_core.request import DEFAULT_MAX_POSITIONS, Request, RequestError
from ..lumina_core.tasks import TASKS, TEMPLATE_KINDS, get_task
from ..lumina_core.tokens import GRID_PIXELS, image_token_count
from .common import CATEGORY, REQUEST, NodeInputError, comfy_image_to_pil

MIN_SIDE = GRID_PIXELS
MAX_SIDE = 2048


def size_problem(task: str, width: int, height: int, max_positions: int = DEFAULT_MAX_POSITIONS) -> Optional[str]:
    """Why (task, width, height) cannot be generated, or None when it can (grid, panel split, token budget)."""
    try:
        spec = get_task(task)
    except ValueError as exc:
        return str(exc)
    if width % GRID_PIXELS or height % GRID_PIXELS:
        return (f"width and height must be multiples of {GRID_PIXELS} px (the model's size grid); "
                f"got {width}x{height}")
    if spec.dual_panel and height % (2 * GRID_PIXELS):
        return (f"task {task!r} makes a dual-panel image (two stacked panels of {width}x{height // 2}); the height "
                f"must be a multiple of {2 * GRID_PIXELS} px so that each panel fits the {GRID_PIXELS} px grid")
    tokens = image_token_count(width, height)
    if tokens > max_positions:
        return (f"{width}x{height} costs {tokens} image tokens, more than the model's budget of {max_positions}; "
                "choose a smaller size (the resolution picker lists the sizes that fit)")
    return None


class LuminaMGPT2DualPanelComposer:
    """Builds the generation request: the task's template filled with the size and prompt, plus the upper panel."""

    CATEGORY = CATEGORY
    FUNCTION = "compose"
    RETURN_TYPES = (REQUEST, "STRING")
    RETURN_NAMES = ("request", "final_prompt")
    OUTPUT_TOOLTIPS = ("What to generate; connect to ARSampler-SJD.",
                       "The exact prompt text the model will see (template filled in).")
    DESCRIPTION = ("Choose the task and output size, write the prompt, and for tasks whose upper panel is given "
                   "(subject, edit, control, dense) connect the reference or control-map IMAGE.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Widgets: task, width, height, prompt, template; optional reference image and subject text."""
        return {
            "required": {
                "task": (list(TASKS), {"default": "t2i", "tooltip": "t2i; pair_* (image + condition map from "
                                       "text); subject; edit; control_* (map in the upper panel -> image); "
                                       "dense_* (image in the upper panel -> map)"}),
                "width": ("INT", {"default": 768, "min": MIN_SIDE, "max": MAX_SIDE, "step": GRID_PIXELS,
                                  "tooltip": "Full output width, a multiple of 32 px."}),
                "height": ("INT", {"default": 768, "min": MIN_SIDE, "max": MAX_SIDE, "step": GRID_PIXELS,
                                   "tooltip": "Full output height (both panels for dual-panel tasks), a "
                                              "multiple of 32 px, of 64 px for dual-panel tasks."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What the image shows (or, for edit, the instruction)."}),
                "template": (list(TEMPLATE_KINDS), {"default": "official",
                                                    "tooltip": "official: the strings of the released code; "
                                                               "paper: the paper's Table 3 forms."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "Upper panel: the reference photo (subject, edit, dense_*) or the "
                                               "control map (control_*), e.g. from a preprocessor node. It is "
                                               "center-cropped to the panel size as the official code does."}),
                "subject": ("STRING", {"default": "", "tooltip": "Object description for the paper's subject "
                                                                   "template."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, task: str = "t2i", width: int = 768, height: int = 768,
                        template: str = "official") -> Any:
        """Reject unknown tasks/templates and sizes off the grid or over the token budget, with a readable reason."""
        if task is None or width is None or height is None:  # linked from another node: checked when run
            return True
        if template is not None and template not in TEMPLATE_KINDS:
            return f"template {template!r} is not one of {list(TEMPLATE_KINDS)}"
        return size_problem(task, int(width), int(height)) or True

    def compose(self, task: str, width: int, height: int, prompt: str, template: str,
                image: Optional[torch.Tensor] = None, subject: str = "") -> dict:
        """Build the Request; show the final prompt on the node."""
        problem = size_problem(task, width, height)
        if problem:
            raise NodeInputError(problem)
        spec = get_task(task)
        reference = None
        if spec.reference_upper:
            if image is None:
                raise NodeInputError(
                    f"task {task!r} needs an IMAGE for its upper panel ({'control map' if task.startswith('control') else 'reference image'}); "
                    "connect a LoadImage or preprocessor node to the composer's image input")
            reference = comfy_image_to_pil(image, 0)
        try:
            request = Request(task=task, prompt=prompt, width=width, height=height, reference=reference,
                              template=template, subject_description=subject)
            final_prompt = request.prompt_text()
        except RequestError as exc:
            raise NodeInputError(str(exc)) from None
        notes = []
        if image is not None and not spec.reference_upper:
            notes.append(f"note: task {task!r} generates the whole image; the connected image is ignored")
        if image is not None and image.shape[0] > 1:
            notes.append(f"note: the image input holds {image.shape[0]} images; the first one is used")
        return {"ui": {"text": [final_prompt, *notes]}, "result": (request, final_prompt)}
