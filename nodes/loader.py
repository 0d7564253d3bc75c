"""Loader: a checkpoint from models/lumina_mgpt2 (or an official repo id) -> LUMINA_PIPE under ComfyUI's memory manager."""
from __future__ import annotations

import logging

import torch

from ..lumina_core.defaults import ModelDefaults
from ..lumina_core.errors import InputError
from ..lumina_core.hub import (BUILTIN_MODELS, MOVQGAN_FILE, OFFICIAL_MODEL_REPOS, ModelNotFoundError, is_repo_id,
                               resolve_model, safe_model_name)
from ..lumina_core.quant import QUANT_MODES
from ..lumina_core.request import DEFAULT_MAX_POSITIONS
from . import comfy_bridge as bridge
from .common import CATEGORY, PIPE, NodeInputError

logger = logging.getLogger(__name__)

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZATIONS = ("none",) + QUANT_MODES + ("auto",)


def model_choices() -> list[str]:
    """The dropdown: checkpoint folders present in models/lumina_mgpt2, the official repo ids, then the built-in demo."""
    return list(dict.fromkeys([*bridge.local_model_names(), *OFFICIAL_MODEL_REPOS, *BUILTIN_MODELS]))


def model_facts() -> dict[str, dict]:
    """For each model of the dropdown: its positions and its defaults (from its folder when present, else official).

    The web extension reads these (node metadata) to show the sizes that fit the connected model.
    """
    from ..lumina_core.config import ModelConfig

    facts = {}
    for name in model_choices():
        max_positions, defaults = DEFAULT_MAX_POSITIONS, ModelDefaults.official()
        try:
            folder = resolve_model(name, search_dirs=bridge.model_dirs(), auto_download=False, allow_paths=False)
            max_positions = ModelConfig.from_pretrained(folder).max_position_embeddings
            defaults = ModelDefaults.from_folder(folder)
        except (InputError, OSError):  # not downloaded yet, or a broken folder the Loader will report
            pass
        facts[name] = {"max_positions": max_positions, "defaults": defaults.to_dict()}
    return facts


def checked_model_name(model: str) -> str:
    """Refuse names that could leave the model folder and repo ids that are not official; return the clean name."""
    try:
        name = safe_model_name(model)
    except ValueError as exc:
        raise NodeInputError(str(exc)) from None
    if is_repo_id(name) and name not in OFFICIAL_MODEL_REPOS and name not in bridge.local_model_names():
        raise NodeInputError(f"repo id {name!r} is not an official Lumina-mGPT 2.0 repo; allowed: "
                             f"{list(OFFICIAL_MODEL_REPOS)} or a folder in models/lumina_mgpt2")
    return name


class LuminaMGPT2Loader:
    """Loads transformer, MoVQGAN and tokenizer; ComfyUI moves the weights on and off the device as needed."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("Lumina-mGPT 2.0 pipeline: transformer, MoVQGAN and text tokenizer.",)
    DESCRIPTION = ("Loads a Lumina-mGPT 2.0 checkpoint from ComfyUI/models/lumina_mgpt2/<name>/ (config.json, "
                   "model*.safetensors, tokenizer files, MoVQGAN checkpoint) or downloads an official repo "
                   "when auto_download is on.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """Model dropdown, auto_download, dtype, quantization, compile."""
        choices = model_choices()
        return {
            "required": {
                "model": (choices, {"default": choices[0], "lumina_models": model_facts(),
                                    "tooltip": "A folder in models/lumina_mgpt2, an official Hugging Face repo id "
                                    "(needs auto_download or a prior download), or demo: the tiny built-in model "
                                    "of coloured shapes (t2i, control_canny, dense_canny at 64 px panels; its own "
                                    "sampling settings come with it)."}),
                "auto_download": ("BOOLEAN", {"default": False, "tooltip": "Download a missing official model "
                                              "into models/lumina_mgpt2 (progress in the console)."}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: bf16 where the device is fast "
                                         "with it, else fp16/fp32 as ComfyUI decides."}),
                "quantization": (list(QUANTIZATIONS), {"default": "none", "tooltip": "torchao quantization of "
                                                       "the transformer (int8 / int4 / fp8), layer by layer while "
                                                       "loading; the fastest kernel for this GPU is picked at load "
                                                       "(console log). auto: the least quantization whose 768x768 "
                                                       "image fits this card's memory."}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the decode step (slow first "
                                        "run, faster afterwards)."}),
            }
        }

    def load(self, model: str, auto_download: bool, dtype: str, quantization: str, compile: bool) -> tuple:
        """Resolve the checkpoint folder safely, build the pipeline on the offload device, hand it to ComfyUI."""
        from ..lumina_core.pipeline import LuminaPipeline

        name = checked_model_name(model)
        if dtype not in DTYPES:
            raise NodeInputError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
        if quantization not in QUANTIZATIONS:
            raise NodeInputError(f"quantization {quantization!r} is not one of {list(QUANTIZATIONS)}")
        dirs = bridge.model_dirs()
        # allow_paths=False: workflow values are untrusted; only names inside the model folders resolve.
        try:
            folder = resolve_model(name, search_dirs=dirs, auto_download=bool(auto_download), allow_paths=False)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{exc}\nThe image tokenizer {MOVQGAN_FILE} (MoVQGAN) goes into the same "
                                     f"folder or into models/lumina_mgpt2/ itself (auto_download fetches it "
                                     "too).") from None
        compute = bridge.torch_device()
        torch_dtype = DTYPES[dtype] or bridge.auto_dtype(compute)
        quant = None if quantization == "none" else quantization
        if quant == "auto":
            from ..lumina_core.config import ModelConfig
            from ..lumina_core.memory import choose_quant

            quant = choose_quant(bridge.plannable_memory(compute), ModelConfig.from_pretrained(folder),
                                 dtype=torch_dtype, device=compute.type)
        # Quantized weights are laid out for the device that packs them, so they are built there;
        # plain weights start on the offload device and ComfyUI moves them when a sampler needs them.
        device = compute if quant else bridge.offload_device()
        logger.info("Lumina-mGPT 2.0: loading %s (%s, %s, quantization=%s) on %s", folder, dtype,
                    torch_dtype, quantization, device)
        pipe = LuminaPipeline.from_pretrained(str(folder), dtype=torch_dtype, device=device, quant=quant,
                                              compile=bool(compile), auto_download=bool(auto_download))
        bridge.manage(pipe, keep_on_device=bool(quant))
        return (pipe,)
