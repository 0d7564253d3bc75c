"""What a refinement is asked with (ThinkConfig), what it gives back (ThinkResult), and the size limits."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import InputError
from .instructions import REFINE_INSTRUCTIONS

# Limits on what a server may send back. A refined prompt is a paragraph (the instructions ask for
# about 120 words); a longer one is refused, never cached. The whole answer (reasoning included) is
# read at most up to MAX_ANSWER_BYTES, so a runaway or hostile server cannot fill memory or the cache.
MAX_PROMPT_CHARS = 4000
MAX_REASONING_CHARS = 64_000
MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True)
class ThinkConfig:
    """Where and how to refine a prompt; holds no secret (keys come from the environment or the key file)."""

    base_url: str = ""  # empty: OPENAI_BASE_URL if set, else the official OpenAI endpoint
    model: str = "gpt-4o"
    # One deadline for the whole call (connection, retries, the full answer), in seconds; local
    # servers may take long for the first token.
    timeout: float = 120.0
    max_retries: int = 2
    temperature: float | None = None  # None: not sent (reasoning models reject it)
    seed: int | None = None  # sent when set; part of the cache key
    instructions: str = REFINE_INSTRUCTIONS
    use_cache: bool = True
    cache_dir: str | None = None  # None: $LUMINA_MGPT2_CACHE/think or ~/.cache/lumina-mgpt2/think
    key_file: str | None = None  # None: $LUMINA_MGPT2_KEY_FILE or ~/.config/lumina-mgpt2/api_keys.json
    local_model: str | None = None  # folder of a transformers causal LM used when the endpoint fails
    local_max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise InputError("ThinkConfig.model must name a model, e.g. 'gpt-4o' or 'qwen2.5:7b'")
        if self.timeout <= 0:
            raise InputError(f"ThinkConfig.timeout must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise InputError(f"ThinkConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.base_url:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InputError(
                    f"ThinkConfig.base_url must be an http(s) URL such as http://localhost:11434/v1, got {self.base_url!r}"
                )


@dataclass(frozen=True)
class ThinkResult:
    """A refined prompt, the model's reasoning, where it came from and any warning."""

    prompt: str
    reasoning: str
    original: str
    source: str  # "endpoint", "cache", "local" or "fallback" (the user's prompt, unchanged)
    warning: str = ""

    @property
    def refined(self) -> bool:
        """True when the prompt was rewritten by a model (now or from the cache)."""
        return self.source != "fallback"
