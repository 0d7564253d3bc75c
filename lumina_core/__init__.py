"""Lumina-mGPT 2.0 core library: model, MoVQGAN, token grammar, sampler, pipeline. Never imports ComfyUI."""
from __future__ import annotations

import importlib

# Public names, imported lazily so that `import lumina_core` (and ComfyUI start-up) stays cheap.
_PUBLIC = {
    "ModelConfig": "config",
    "build_transformer": "model",
    "load_transformer": "weights",
    "KVCache": "kv_cache",
    "load_movqgan": "movqgan",
    "save_movqgan": "movqgan",
    "MoVQGAN": "movqgan",
    "MoVQConfig": "movqgan",
    "TokenLayout": "tokens",
    "Request": "request",
    "TASKS": "tasks",
    "resolve_model": "hub",
    "resolve_movqgan": "hub",
    "refine_prompt": "think",
    "ThinkConfig": "think",
    "ThinkResult": "think",
    "get_verifier": "verify",
    "rank": "verify",
    "best_of_n": "verify",
    "BestOfN": "verify",
    "SamplingConfig": "sampling",
    "GenerationCancelled": "sampling",
    "GeneratedCodes": "pipeline",
    "LuminaPipeline": "pipeline",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
