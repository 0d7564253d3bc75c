"""DualPanelComposer: task, size, prompt and optional reference/control image -> LUMINA_REQUEST."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..lumina_core.defaults import ModelDefaults
from ..lumina_core.request import (DEFAULT_MAX_POSITIONS, Request, RequestError, budget_problem, grid_problem,
                                   size_choices, web_constants)
from ..lumina_core.tasks import TASKS, TEMPLATE_KINDS, get_task
from ..lumina_core.tokens import GRID_PIXELS
from .common import CATEGORY, MODEL_DEFAULT_SIZE, PIPE, REQUEST, NodeInputError, comfy_image_to_pil

MAX_SIDE = 2048  # 64 size-token grids: far past what any budget allows for the other side at 32 px


def size_metadata(max_positions: list[int]) -> dict:
    """What the web extension needs for the resolution picker: the constants and the sizes per budget."""
    return {**web_constants(),
            "choices": {str(n): {"single": size_choices(False, n), "dual": size_choices(True, n)}
                        for n in sorted(set(max_positions) | {DEFAULT_MAX_POSITIONS})}}


def resolved_size(task: str, width: int, height: int, defaults: ModelDefaults) -> tuple[int, int]:
    """The size to generate: each of width/height as typed, or the model's default for the task where 0."""
    return defaults.size(task, width or None, height or None)


class LuminaMGPT2DualPanelComposer:
    """Builds the generation request: the task's template filled with the size and prompt, plus the upper panel."""

    CATEGORY = CATEGORY
    FUNCTION = "compose"
    RETURN_TYPES = (REQUEST, "STRING")
    RETURN_NAMES = ("request", "final_prompt")
    OUTPUT_TOOLTIPS = ("What to generate; connect to ARSampler-SJD.",
                       "The exact prompt text the model will see (template filled in).")
    DESCRIPTION = ("Choose the task and output size, write the prompt, and for tasks whose upper panel is given "
                   "(subject, edit, control, dense) connect the reference or control-map IMAGE. Connect the "
                   "Loader's pipe so that 'model default' sizes and the size limit come from the model.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Widgets: task, width, height, prompt, template; optional reference image, subject text and pipe."""
        from .loader import model_facts  # the models in the Loader's dropdown, for the picker's size lists

        side = {"min": 0, "max": MAX_SIDE, "step": GRID_PIXELS, "default": MODEL_DEFAULT_SIZE}
        budgets = [facts["max_positions"] for facts in model_facts().values()]
        return {
            "required": {
                "task": (list(TASKS), {"default": "t2i", "lumina": size_metadata(budgets),
                                       "tooltip": "t2i; pair_* (image + condition map from text); subject; edit; "
                                                  "control_* (map in the upper panel -> image); dense_* (image in "
                                                  "the upper panel -> map)"}),
                "width": ("INT", {**side, "tooltip": "Full output width, a multiple of 32 px; 0 = the model's "
                                                    "default for the task (768 official, 64 for the demo)."}),
                "height": ("INT", {**side, "tooltip": "Full output height (both panels for dual-panel tasks), a "
                                                     "multiple of 32 px, of 64 px for dual-panel tasks; 0 = the "
                                                     "model's default for the task."}),
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
                "pipe": (PIPE, {"tooltip": "The Loader's pipe: 'model default' sizes, the size limit and the "
                                           "tasks the model knows come from it (without it: the official ones)."}),
            },
        }

    def compose(self, task: str, width: int, height: int, prompt: str, template: str,
                image: Optional[torch.Tensor] = None, subject: str = "", pipe: Any = None) -> dict:
        """Build the Request at the resolved size; show the final prompt, the size and any warning on the node."""
        try:
            spec = get_task(task)
        except ValueError as exc:
            raise NodeInputError(str(exc)) from None
        defaults = getattr(pipe, "defaults", None) or ModelDefaults.official()
        max_positions = getattr(pipe, "max_positions", None) or DEFAULT_MAX_POSITIONS
        width, height = resolved_size(task, int(width), int(height), defaults)
        problem = grid_problem(task, width, height)
        if problem:
            raise NodeInputError(problem)
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
        prompt_tokens = pipe.prompt_tokens(request) if hasattr(pipe, "prompt_tokens") else 0
        problem = budget_problem(task, width, height, max_positions, prompt_tokens)
        if problem:
            raise NodeInputError(problem)
        panels = f" (two {width}x{height // 2} panels)" if spec.dual_panel else ""
        notes = [f"size: {width}x{height}{panels}"]
        warning = defaults.task_warning(task) if pipe is not None else None
        if warning:
            notes.append(warning)
        if image is not None and not spec.reference_upper:
            notes.append(f"note: task {task!r} generates the whole image; the connected image is ignored")
        if image is not None and image.shape[0] > 1:
            notes.append(f"note: the image input holds {image.shape[0]} images; the first one is used")
        return {"ui": {"text": [final_prompt, *notes]}, "result": (request, final_prompt)}
