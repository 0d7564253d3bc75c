"""LoRA: pipe + a LoRA file + strength -> a new pipe over the same weights with the adapter stacked on.

The base pipe is unchanged: the new pipe carries its own adapter stack and (inside ComfyUI) its
own ModelPatcher, a clone of the base's whose object patches are the adapted linear modules.
ComfyUI installs them when a sampler loads this pipe and puts the base modules back when the base
(or another clone) loads, so removing the node or changing the strength needs no reload.
"""
from __future__ import annotations

import logging

from ..lumina_core.errors import InputError
from ..lumina_core.lora import STRENGTH_RANGE, load_adapter
from . import comfy_bridge as bridge
from .common import CATEGORY, PIPE, NodeInputError

logger = logging.getLogger(__name__)


class LuminaMGPT2LoRA:
    """Stacks a peft-format LoRA adapter (from models/loras or models/lumina_mgpt2/loras) onto a pipe."""

    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The same model with this adapter added (chain several LoRA nodes to stack them).",)
    DESCRIPTION = ("Applies a Lumina-mGPT 2.0 LoRA (peft format: adapter_model.safetensors, its adapter_config.json "
                   "beside it or in its metadata; made by `python -m lumina_core.train fit --lora` + `export`) at a "
                   "strength. The adapter runs beside the base linears (also quantized ones), never merged.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """pipe, lora_name (files in models/loras and models/lumina_mgpt2/loras), strength."""
        names = bridge.lora_names() or ["(no LoRA files found)"]
        low, high = STRENGTH_RANGE
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "From the Loader or another LoRA node."}),
                "lora_name": (names, {"default": names[0], "tooltip": "A .safetensors adapter in models/loras or "
                                      "models/lumina_mgpt2/loras (a peft adapter folder there lists as "
                                      "<folder>/adapter_model.safetensors)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": low, "max": high, "step": 0.05,
                                       "tooltip": "Scale of the adapter's update (0 = off, 1 = as trained)."}),
            }
        }

    def apply(self, pipe, lora_name: str, strength: float) -> tuple:
        """Load the adapter, check it against the pipe's model, return a new pipe with it stacked on."""
        path = bridge.lora_path(lora_name)
        if path is None:
            raise NodeInputError(f"LoRA {lora_name!r} is not in models/loras or models/lumina_mgpt2/loras")
        try:
            adapter = load_adapter(path)
            patched = pipe.with_lora(adapter, strength)
        except InputError as exc:
            raise NodeInputError(str(exc)) from None
        bridge.patch_loras(pipe, patched)
        logger.info("Lumina-mGPT 2.0: LoRA %s at %g (%d modules, rank %d)", lora_name, strength,
                    len(adapter.modules), adapter.rank)
        return (patched,)
