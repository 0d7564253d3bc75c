"""refine_prompt: cache, then the endpoint, then the optional local model; never fails a workflow."""
from __future__ import annotations

import logging
from typing import Any, Callable

from .cache import cache_key, cache_path, read_cached, write_cached
from .client import ask_endpoint
from .keys import Origin, redact, resolve_base_url, resolve_credentials
from .local import ask_local
from .parse import parse_refinement
from .settings import MAX_PROMPT_CHARS, MAX_REASONING_CHARS, ThinkConfig, ThinkResult

logger = logging.getLogger(__name__)


def _checked_refinement(answer: str) -> tuple[str | None, str, str]:
    """(refined prompt or None, reasoning, why it was refused): only a prompt within the limit is kept."""
    refined, reasoning = parse_refinement(answer)
    if len(reasoning) > MAX_REASONING_CHARS:
        reasoning = reasoning[:MAX_REASONING_CHARS] + " [...]"
    if not refined:
        return None, reasoning, "the answer had no <results> block with a prompt"
    if len(refined) > MAX_PROMPT_CHARS:
        return None, reasoning, (f"the refined prompt has {len(refined)} characters, more than the "
                                 f"{MAX_PROMPT_CHARS} accepted")
    return refined, reasoning, ""


def _from_cache(config: ThinkConfig, key: str, original: str, warning: str = "") -> ThinkResult | None:
    cached = read_cached(cache_path(config, key)) if config.use_cache else None
    if cached is None:
        return None
    return ThinkResult(prompt=cached["prompt"], reasoning=cached.get("reasoning", ""), original=original,
                       source="cache", warning=warning)


def _ask(ask: Callable[[], str], config: ThinkConfig, key: str, original: str,
         record: dict[str, Any]) -> tuple[str | None, str, str]:
    """Ask once; cache an accepted refinement. Returns (prompt or None, reasoning, failure)."""
    refined, reasoning, failure = _checked_refinement(ask())
    if refined and config.use_cache:  # a refused answer is never cached
        write_cached(cache_path(config, key), {**record, "prompt": refined, "reasoning": reasoning,
                                               "original": original})
    return refined, reasoning, failure


def refine_prompt(prompt: str, config: ThinkConfig | None = None, *, http_client: Any = None) -> ThinkResult:
    """Rewrite prompt with an LLM (cache, endpoint, then local fallback); on failure return it unchanged with a warning."""
    config = config or ThinkConfig()
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        return ThinkResult(prompt=prompt, reasoning="", original=prompt, source="fallback",
                           warning="empty prompt: nothing to refine")

    base_url = resolve_base_url(config)
    endpoint_key = cache_key(base_url, config.model, config.instructions, prompt, config.seed, config.temperature)
    cached = _from_cache(config, endpoint_key, prompt)
    if cached is not None:
        return cached

    credentials = resolve_credentials(base_url, config.key_file)
    warnings: list[str] = []
    if credentials.warning:
        warnings.append(credentials.warning)
        logger.warning("ThinkPrompt: %s", credentials.warning)

    reasoning = ""
    try:
        refined, reasoning, failure = _ask(lambda: ask_endpoint(base_url, credentials, config, prompt, http_client),
                                           config, endpoint_key, prompt, {"endpoint": base_url, "model": config.model})
        if refined:
            return ThinkResult(prompt=refined, reasoning=reasoning, original=prompt, source="endpoint",
                               warning="; ".join(warnings))
    except Exception as error:  # any failure of the optional step must not fail the workflow
        failure = redact(f"{type(error).__name__}: {error}", credentials.api_key)[:500]
    warnings.append(f"ThinkPrompt endpoint {Origin.of(base_url).label} (model {config.model}) failed: {failure}")

    if config.local_model:
        local_key = cache_key(f"local:{config.local_model}", "local", config.instructions, prompt)
        cached = _from_cache(config, local_key, prompt, "; ".join(warnings))
        if cached is not None:
            return cached
        try:
            refined, reasoning, failure = _ask(lambda: ask_local(config, prompt), config, local_key, prompt,
                                               {"endpoint": "local", "model": config.local_model})
            if refined:
                warnings.append("used the local fallback model")
                message = "; ".join(warnings)
                logger.warning("ThinkPrompt: %s", message)
                return ThinkResult(prompt=refined, reasoning=reasoning, original=prompt, source="local",
                                   warning=message)
            warnings.append(f"local fallback model: {failure}")
        except Exception as error:
            warnings.append(f"local fallback model failed: {type(error).__name__}: {error}"[:500])

    warnings.append("using the original prompt")
    message = "; ".join(warnings)
    logger.warning("ThinkPrompt: %s", message)
    return ThinkResult(prompt=prompt, reasoning=reasoning, original=prompt, source="fallback", warning=message)
