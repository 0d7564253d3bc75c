"""Every ComfyUI touch-point of the pack, in one place; each degrades to a no-op outside ComfyUI.

ComfyUI modules (``folder_paths``, ``comfy.model_management``, ``comfy.utils``,
``comfy.model_patcher``) are imported lazily and guarded, so the node modules import and run in
plain Python (tests, scripts) where ComfyUI is absent. Nothing else in the pack imports ComfyUI.
"""
from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

MODEL_FOLDER = "lumina_mgpt2"
# Extra model folders for runs outside ComfyUI (tests, scripts); os.pathsep-separated.
MODELS_ENV = "LUMINA_MGPT2_MODELS"
PREVIEW_FORMAT = "JPEG"
DEFAULT_PREVIEW_SIZE = 512


def _import(name: str) -> Any:
    """Import a ComfyUI module, or return None when ComfyUI is not running in this process."""
    import importlib
    import sys

    # Only use ComfyUI when it is really the host: a stray module of the same name is not enough.
    if name == "folder_paths" and "folder_paths" not in sys.modules and "comfy" not in sys.modules:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a half-installed ComfyUI that fails on import
        return None


def in_comfyui() -> bool:
    """True when this process is a ComfyUI server (its memory manager and folders are available)."""
    return _import("folder_paths") is not None and _import("comfy.model_management") is not None


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------

def register_model_folder() -> None:
    """Register ``models/lumina_mgpt2`` with ComfyUI (keeping paths from extra_model_paths.yaml)."""
    folder_paths = _import("folder_paths")
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    known = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    if known is None or default not in known[0]:
        # Not is_default: paths a user configured in extra_model_paths.yaml stay first.
        folder_paths.add_model_folder_path(MODEL_FOLDER, default)
    os.makedirs(default, exist_ok=True)


def model_dirs() -> list[Path]:
    """Folders searched for model checkpoints: ComfyUI's lumina_mgpt2 folders, then $LUMINA_MGPT2_MODELS."""
    dirs: list[Path] = []
    folder_paths = _import("folder_paths")
    if folder_paths is not None:
        register_model_folder()
        dirs += [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]
    env = os.environ.get(MODELS_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p.strip()]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def local_model_names() -> list[str]:
    """Names of checkpoint folders present in the model folders (each holds a config.json)."""
    names: list[str] = []
    for base in model_dirs():
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_dir() and (entry / "config.json").is_file():
                names.append(entry.name)
            elif entry.is_dir():  # models/lumina_mgpt2/<owner>/<name> layout of repo ids
                for sub in sorted(entry.iterdir()):
                    if sub.is_dir() and (sub / "config.json").is_file():
                        names.append(f"{entry.name}/{sub.name}")
    return list(dict.fromkeys(names))


LORA_SUBFOLDER = "loras"   # models/lumina_mgpt2/loras, beside ComfyUI's own models/loras


def lora_files() -> dict[str, Path]:
    """LoRA .safetensors files by their listed name: ComfyUI's ``loras`` folders, ``<model folder>/loras``,
    then the adapters shipped with the pack (lumina_core/assets/demo_loras)."""
    files: dict[str, Path] = {}
    folder_paths = _import("folder_paths")
    if folder_paths is not None:
        for name in folder_paths.get_filename_list("loras"):
            full = folder_paths.get_full_path("loras", name)
            if name.endswith(".safetensors") and full:
                files.setdefault(name, Path(full))
    from ..lumina_core.lora import BUILTIN_LORA_DIR

    for root in [base / LORA_SUBFOLDER for base in model_dirs()] + [BUILTIN_LORA_DIR]:  # the pack's own last
        if root.is_dir():
            for path in sorted(root.rglob("*.safetensors")):
                files.setdefault(path.relative_to(root).as_posix(), path)
    return files


def lora_names() -> list[str]:
    """The LoRA node's dropdown."""
    return sorted(lora_files())


def lora_path(name: str) -> Optional[Path]:
    """The file of a listed LoRA name, or None (names from a workflow are never used as paths)."""
    return lora_files().get(name)


def patch_loras(pipeline: Any, patched: Any) -> Any:
    """Give `patched` (`pipeline.with_lora(...)`) its own ModelPatcher: a clone of the base's with the
    adapted linears as object patches, which ComfyUI installs on load and restores when another clone
    (or the base) loads. Returns the clone; no-op (None) outside ComfyUI, where the pipelines
    install their own stacks before generating."""
    from ..lumina_core.lora import lora_modules

    patcher = patcher_of(pipeline)
    if patcher is None:
        return None
    clone = patcher.clone()
    prefix = "transformer."  # PipelineModules holds the transformer under this name
    modules = lora_modules(lambda name: clone.get_model_object(prefix + name), patched.loras)
    for name, module in modules.items():
        clone.add_object_patch(prefix + name, module)
    _PATCHERS[patched] = clone
    return clone


def output_dir() -> Optional[Path]:
    """ComfyUI's output folder, or None outside ComfyUI."""
    folder_paths = _import("folder_paths")
    return Path(folder_paths.get_output_directory()) if folder_paths is not None else None


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------

def torch_device() -> torch.device:
    """The device ComfyUI computes on (respects --cpu, MPS, XPU, DirectML); CPU outside ComfyUI."""
    mm = _import("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cpu")


def offload_device() -> torch.device:
    """Where ComfyUI parks models that are not in use; CPU outside ComfyUI."""
    mm = _import("comfy.model_management")
    if mm is not None:
        return mm.unet_offload_device()
    return torch.device("cpu")


def auto_dtype(device: torch.device, num_params: int = 0) -> torch.dtype:
    """bf16 where ComfyUI says it is fast, else fp16 where supported, else fp32 (always fp32 on CPU outside ComfyUI)."""
    mm = _import("comfy.model_management")
    if mm is None:
        return torch.float32
    if mm.should_use_bf16(device, model_params=num_params):
        return torch.bfloat16
    if mm.should_use_fp16(device, model_params=num_params):
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Memory management: the pipeline's modules live in a ModelPatcher
# ---------------------------------------------------------------------------------------------

class PipelineModules(torch.nn.Module):
    """The pipeline's weights (transformer + MoVQGAN) as one module, so ComfyUI can move and count them."""

    def __init__(self, transformer: torch.nn.Module, movqgan: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.movqgan = movqgan
        self.device = None  # set by ModelPatcher; it tracks where the weights are


# pipeline -> ModelPatcher. Weak keys: when ComfyUI's output cache drops the pipeline, the patcher
# goes too and ComfyUI's loaded-model list forgets it (it holds patchers weakly).
_PATCHERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def manage(pipeline: Any, keep_on_device: bool = False) -> Any:
    """Wrap the pipeline's modules in a ComfyUI ModelPatcher (no-op outside ComfyUI); returns the patcher or None.

    ``keep_on_device``: the weights never leave the compute device (quantized layouts are device-bound);
    ComfyUI still counts them when it makes room for other models.
    """
    model_patcher = _import("comfy.model_patcher")
    if model_patcher is None:
        return None
    modules = PipelineModules(pipeline.transformer, pipeline.movqgan)
    load = torch_device()
    patcher = model_patcher.ModelPatcher(modules, load_device=load,
                                         offload_device=load if keep_on_device else offload_device())
    _PATCHERS[pipeline] = patcher
    return patcher


def patcher_of(pipeline: Any) -> Any:
    """The ModelPatcher that manages this pipeline, or None."""
    try:
        return _PATCHERS.get(pipeline)
    except TypeError:
        return None


def load_on_device(pipeline: Any, memory_required: int = 0) -> None:
    """Make room through ComfyUI (unloading other models if needed) and move the pipeline to the compute device."""
    patcher = patcher_of(pipeline)
    mm = _import("comfy.model_management")
    if patcher is None or mm is None:
        return
    # Full load: the modules are plain torch layers without ComfyUI's low-VRAM casting, so they
    # must sit on one device as a whole.
    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    device = patcher.load_device
    if torch.device(pipeline.device) != torch.device(device):
        pipeline.to(device)


def plannable_memory(device: torch.device) -> Optional[int]:
    """Bytes a generation may plan for on `device`: ComfyUI's total less its inference reserve (other models
    are evicted for us), else the CUDA card's total; None on the CPU (the host is not planned)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    mm = _import("comfy.model_management")
    if mm is not None:
        return int(mm.get_total_memory(device)) - int(mm.minimum_inference_memory())
    return int(torch.cuda.mem_get_info(device)[1])


def streams_layers() -> bool:
    """True when ComfyUI runs in low-VRAM / no-VRAM mode, i.e. would stream weights from the CPU layer by layer."""
    mm = _import("comfy.model_management")
    state = getattr(mm, "vram_state", None) if mm is not None else None
    states = getattr(mm, "VRAMState", None)
    return states is not None and state in (states.LOW_VRAM, states.NO_VRAM)


def free_cache() -> None:
    """Return cached allocator memory to the device (after a run or a cancel)."""
    mm = _import("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of any backend."""
    mm = _import("comfy.model_management")
    if mm is not None and isinstance(exc, mm.OOM_EXCEPTION):
        return True
    return isinstance(exc, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else False


# ---------------------------------------------------------------------------------------------
# Progress, previews, cancel
# ---------------------------------------------------------------------------------------------

def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI (does not reset the flag)."""
    mm = _import("comfy.model_management")
    return bool(mm is not None and mm.processing_interrupted())


def raise_interrupted() -> None:
    """Inside ComfyUI raise its own interrupt exception (resets the flag; the run shows as interrupted); else no-op."""
    mm = _import("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()


def preview_size() -> int:
    """Largest preview side ComfyUI wants (--preview-size)."""
    try:
        from comfy.cli_args import args  # type: ignore

        return int(getattr(args, "preview_size", DEFAULT_PREVIEW_SIZE))
    except Exception:
        return DEFAULT_PREVIEW_SIZE


class Progress:
    """A ComfyUI progress bar for one node; records what it sent so that plain-Python runs can inspect it."""

    def __init__(self, total: int, node_id: Optional[str] = None):
        self.total = total
        self.value = 0
        self.updates = 0
        self.previews = 0
        utils = _import("comfy.utils")
        self._bar = utils.ProgressBar(total, node_id=node_id) if utils is not None else None

    def update(self, value: int, preview: Any = None) -> None:
        """Set the bar to ``value`` of ``total``; ``preview`` is a PIL image shown on the node."""
        self.value = min(value, self.total)
        self.updates += 1
        if preview is not None:
            self.previews += 1
        if self._bar is None:
            return
        if interrupted():
            # Skip: ComfyUI's hook would raise here, inside the sampler's callback; the sampler's own
            # cancel check right after stops it cleanly and frees its cache.
            return
        payload = (PREVIEW_FORMAT, preview, preview_size()) if preview is not None else None
        self._bar.update_absolute(self.value, self.total, payload)


def node_progress_hook() -> Optional[Callable]:
    """ComfyUI's global progress hook (None outside ComfyUI); exposed for tests."""
    utils = _import("comfy.utils")
    return getattr(utils, "PROGRESS_BAR_HOOK", None) if utils is not None else None
