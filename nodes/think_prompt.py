"""ThinkPrompt: prompt -> refined prompt (+ the model's reasoning) through an OpenAI-compatible endpoint."""
from __future__ import annotations

import logging

from .common import CATEGORY, NodeInputError

logger = logging.getLogger(__name__)


class LuminaMGPT2ThinkPrompt:
    """Rewrites a short prompt into a detailed one with an LLM; falls back to the prompt as given on failure.

    The API key never comes from a widget: OPENAI_API_KEY for OpenAI / OPENAI_BASE_URL, or the per-host
    key file ($LUMINA_MGPT2_KEY_FILE, default ~/.config/lumina-mgpt2/api_keys.json).
    """

    CATEGORY = CATEGORY
    FUNCTION = "think"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "reasoning")
    OUTPUT_TOOLTIPS = ("The refined prompt (or the input prompt when off or when the endpoint failed).",
                       "The model's reasoning, when it gave one.")
    DESCRIPTION = ("Prompt refinement with any OpenAI-compatible chat endpoint (OpenAI, Ollama, vLLM, LM Studio). "
                   "Keys come from the environment or the key file, never from the workflow.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """prompt, enabled, endpoint, model."""
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The short prompt to refine (connect the refined prompt output "
                                                 "to the composer's prompt)."}),
                "enabled": ("BOOLEAN", {"default": True, "label_on": "refine", "label_off": "pass through",
                                        "tooltip": "refine: ask the endpoint; pass through: hand the prompt on "
                                                   "unchanged (no network)."}),
                "endpoint": ("STRING", {"default": "", "placeholder": "empty: $OPENAI_BASE_URL or OpenAI; "
                                        "e.g. http://localhost:11434/v1",
                                        "tooltip": "Base URL of an OpenAI-compatible API."}),
                "model": ("STRING", {"default": "gpt-4o", "tooltip": "Model name at that endpoint."}),
            }
        }

    def think(self, prompt: str, enabled: bool, endpoint: str, model: str) -> dict:
        """Refine the prompt (cached per endpoint/model/prompt); show the result on the node."""
        from ..lumina_core.think import ThinkConfig, refine_prompt

        if not enabled:
            return {"ui": {"text": [prompt]}, "result": (prompt, "")}
        try:
            config = ThinkConfig(base_url=endpoint.strip(), model=model.strip() or "gpt-4o")
        except ValueError as exc:
            raise NodeInputError(str(exc)) from None
        result = refine_prompt(prompt, config)
        shown = [result.prompt]
        if result.warning:
            logger.warning("ThinkPrompt: %s", result.warning)
            shown.append(f"warning: {result.warning}")
        return {"ui": {"text": shown}, "result": (result.prompt, result.reasoning)}
