"""Thinking before generation: an LLM analyses the user's prompt and rewrites it for the image model.

Works with any OpenAI-compatible chat-completions endpoint (OpenAI, Ollama, vLLM, LM Studio) and,
optionally, with a local transformers causal LM as a fallback. Never fails a workflow: when the
endpoint is unreachable, too slow (one deadline for the whole call), sends too much, or the answer
cannot be parsed, the user's prompt is returned with a warning.

By idea: `settings` (ThinkConfig, ThinkResult, size limits), `instructions` (the text sent, as
data), `keys` (which key goes to which host; workflows are shared, so a base URL in a workflow is
untrusted), `client` (one chat completion under one deadline and a size cap), `parse` (the
`<results>` block), `cache` (private files), `local` (the fallback LM), `refine` (the order of it all).
"""
from __future__ import annotations

from .cache import CACHE_DIR_ENV, cache_key, default_cache_dir
from .instructions import REFINE_INSTRUCTIONS
from .keys import (KEY_FILE_ENV, OFFICIAL_BASE_URL, PLACEHOLDER_KEY, default_key_file, resolve_base_url,
                   resolve_credentials)
from .local import unload_local_models
from .parse import parse_refinement
from .refine import refine_prompt
from .settings import MAX_ANSWER_BYTES, MAX_PROMPT_CHARS, ThinkConfig, ThinkResult

__all__ = [
    "CACHE_DIR_ENV", "KEY_FILE_ENV", "MAX_ANSWER_BYTES", "MAX_PROMPT_CHARS", "OFFICIAL_BASE_URL",
    "PLACEHOLDER_KEY", "REFINE_INSTRUCTIONS", "ThinkConfig", "ThinkResult", "cache_key", "default_cache_dir",
    "default_key_file", "parse_refinement", "refine_prompt", "resolve_base_url", "resolve_credentials", "unload_local_models",
]
