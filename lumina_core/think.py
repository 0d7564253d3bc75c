"""Thinking before generation: an LLM analyses the user's prompt and rewrites it for the image model.

Works with any OpenAI-compatible chat-completions endpoint (OpenAI, Ollama, vLLM, LM Studio) and,
optionally, with a local transformers causal LM as a fallback. Never fails a workflow: when the
endpoint is unreachable or the answer cannot be parsed, the user's prompt is returned with a warning.

Key handling (workflows are shared, so the base URL in a workflow is untrusted):
- ``OPENAI_API_KEY`` is sent only to the official OpenAI endpoint, or to the origin of
  ``OPENAI_BASE_URL`` when the user set that variable;
- any other host gets the key the user stored for that host in the key file
  (``LUMINA_MGPT2_KEY_FILE`` or ``~/.config/lumina-mgpt2/api_keys.json``: a JSON object ``{host: key}``);
- otherwise no key is sent (a placeholder instead, which local servers ignore) and, for a remote host,
  a warning says so. Keys never appear in results, cache files or log messages.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .fileio import atomic_write_text

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://api.openai.com/v1"
# Sent when no key belongs to the target host: the SDK refuses an empty key and local servers ignore it.
PLACEHOLDER_KEY = "sk-no-key"
KEY_FILE_ENV = "LUMINA_MGPT2_KEY_FILE"
CACHE_DIR_ENV = "LUMINA_MGPT2_CACHE"

# Our own instructions, with the intent of the paper's "thinking before generation" prompt (figure 5).
REFINE_INSTRUCTIONS = """\
You improve prompts for a text-to-image model. Think step by step before you write.

Analyse the user's prompt on three points:
1. Clarity: can it be understood? If it is nonsense (random characters, a contradiction), turn it into a \
reasonable visual concept that keeps whatever recognisable idea it contains.
2. Specificity: is anything ambiguous (which object, how many, what style, what the words mean here)? \
Choose the most plausible reading and state it explicitly.
3. Expressiveness: is it too simple to give a good picture? Then enrich it: details of the subject \
(appearance, colour, material, pose, expression), the setting and background, the lighting, and the \
composition or viewpoint. If it is already detailed, keep it and change as little as possible.

Never contradict the user: keep every object, count, colour, spatial relation, style and quoted text \
they asked for, and add nothing that conflicts with them.

Write your analysis first. Then write the final prompt as one paragraph in English of at most about \
120 words, between <results> and </results>, with nothing else between the markers."""


@dataclass(frozen=True)
class ThinkConfig:
    """Where and how to refine a prompt; holds no secret (keys come from the environment or the key file)."""

    base_url: str = ""  # empty: OPENAI_BASE_URL if set, else the official OpenAI endpoint
    model: str = "gpt-4o"
    timeout: float = 120.0  # seconds; local servers may take long for the first token
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
            raise ValueError("ThinkConfig.model must name a model, e.g. 'gpt-4o' or 'qwen2.5:7b'")
        if self.timeout <= 0:
            raise ValueError(f"ThinkConfig.timeout must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"ThinkConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.base_url:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
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


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<think(?:ing)?>(.*?)</think(?:ing)?>", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_RESULTS_OPEN = re.compile(r"<\s*results?\s*>", re.IGNORECASE)
_RESULTS_CLOSE = re.compile(r"<\s*/\s*results?\s*>", re.IGNORECASE)
_FINAL_LABEL = re.compile(r"(?:final|refined|improved|rewritten)\s+prompt\s*[:：]", re.IGNORECASE)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _clean_prompt(text: str) -> str:
    text = _FENCE.sub("", text.strip()).strip()
    text = text.strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”`":
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == "“" and text[-1] == "”":
        text = text[1:-1].strip()
    return " ".join(text.split())


def parse_refinement(answer: str) -> tuple[str | None, str]:
    """Split an LLM answer into (refined prompt or None when none was found, reasoning text)."""
    answer = answer or ""
    thoughts = [m.strip() for m in _THINK_BLOCK.findall(answer)]
    body = _THINK_BLOCK.sub("", answer)
    # Some servers strip the opening <think> tag: everything before a lone closing tag is thinking.
    close = None
    for close in _THINK_CLOSE.finditer(body):
        pass
    if close is not None:
        thoughts.append(body[: close.start()].strip())
        body = body[close.end():]

    opens = list(_RESULTS_OPEN.finditer(body))
    refined: str | None = None
    analysis = body
    if opens:
        last = opens[-1]
        end = _RESULTS_CLOSE.search(body, last.end())
        inside = body[last.end(): end.start() if end else len(body)]
        refined = _clean_prompt(inside) or None
        analysis = body[: last.start()]
    else:
        labels = list(_FINAL_LABEL.finditer(body))
        if labels:
            tail = body[labels[-1].end():].strip()
            paragraph = re.split(r"\n\s*\n", tail, maxsplit=1)[0]
            refined = _clean_prompt(paragraph) or None
            analysis = body[: labels[-1].start()]
    reasoning = "\n\n".join([t for t in thoughts if t] + ([analysis.strip()] if analysis.strip() else []))
    return refined, reasoning


# ---------------------------------------------------------------------------------------------
# Endpoint and key resolution
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> "_Origin":
        parts = urlsplit(url)
        scheme = (parts.scheme or "https").lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme, (parts.hostname or "").lower(), port)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost" or self.host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


def resolve_base_url(config: ThinkConfig) -> str:
    """The chat-completions base URL to use: the configured one, else OPENAI_BASE_URL, else OpenAI's."""
    return (config.base_url or os.environ.get("OPENAI_BASE_URL") or OFFICIAL_BASE_URL).rstrip("/")


def default_key_file() -> Path:
    """Where per-host API keys are read from unless ThinkConfig.key_file says otherwise."""
    env = os.environ.get(KEY_FILE_ENV)
    if env:
        return Path(env).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "lumina-mgpt2" / "api_keys.json"


def _read_key_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        # The error text of json never contains file content beyond a position: safe to log.
        logger.warning("ThinkPrompt: cannot read key file %s (%s); no per-host keys available", path, type(error).__name__)
        return {}
    if not isinstance(data, dict):
        logger.warning("ThinkPrompt: key file %s must hold a JSON object {host: key}", path)
        return {}
    return {str(k).strip().lower().rstrip("/"): str(v) for k, v in data.items() if isinstance(v, str) and v}


def _key_from_file(origin: _Origin, keys: dict[str, str]) -> str | None:
    # Entries with a scheme bind the key to that scheme; bare host entries are sent only over https
    # (or to this machine), so a workflow cannot downgrade a stored key to plain http.
    scheme_entries = [f"{origin.scheme}://{origin.host}:{origin.port}", f"{origin.scheme}://{origin.host}"]
    for entry in scheme_entries:
        if entry in keys:
            return keys[entry]
    if origin.scheme == "https" or origin.is_loopback:
        for entry in (f"{origin.host}:{origin.port}", origin.host):
            if entry in keys:
                return keys[entry]
    return None


@dataclass(frozen=True)
class _Credentials:
    api_key: str
    trusted_env: bool  # the target is the user's own OpenAI/OPENAI_BASE_URL endpoint
    warning: str = ""


def resolve_credentials(base_url: str, key_file: str | None = None) -> _Credentials:
    """Choose the key that belongs to base_url's host (never a key of another host)."""
    origin = _Origin.of(base_url)
    env_origins = {_Origin.of(OFFICIAL_BASE_URL)}
    if os.environ.get("OPENAI_BASE_URL"):
        env_origins.add(_Origin.of(os.environ["OPENAI_BASE_URL"]))
    trusted_env = origin in env_origins
    env_key = os.environ.get("OPENAI_API_KEY")
    if trusted_env and env_key:
        return _Credentials(env_key, True)
    file_key = _key_from_file(origin, _read_key_file(Path(key_file).expanduser() if key_file else default_key_file()))
    if file_key:
        return _Credentials(file_key, trusted_env)
    if origin.is_loopback:
        return _Credentials(PLACEHOLDER_KEY, trusted_env)
    if trusted_env:
        warning = f"no API key for {origin.label}: set OPENAI_API_KEY; sending the request without a key"
    else:
        warning = (
            f"no API key configured for {origin.label} (keys go only to their own host: add it to "
            f"{key_file or default_key_file()} as {{\"{origin.host}\": \"...\"}}); sending the request without a key"
        )
    return _Credentials(PLACEHOLDER_KEY, trusted_env, warning)


def _redact(text: str, secret: str) -> str:
    if secret and secret != PLACEHOLDER_KEY:
        text = text.replace(secret, "***")
        if len(secret) > 12:  # providers echo keys partially ("sk-abc...xyz")
            text = text.replace(secret[:8], "***").replace(secret[-4:], "***")
    return text


def _make_client(base_url: str, credentials: _Credentials, config: ThinkConfig, http_client: Any = None):
    from openai import Omit, OpenAI

    headers: dict[str, Any] = {}
    if not credentials.trusted_env:
        # The SDK also reads OPENAI_ORG_ID, OPENAI_PROJECT_ID and OPENAI_CUSTOM_HEADERS from the
        # environment; none of them may reach a host the user did not configure. An explicit
        # Authorization header also stops the SDK from taking one out of OPENAI_CUSTOM_HEADERS.
        for line in os.environ.get("OPENAI_CUSTOM_HEADERS", "").split("\n"):
            name = line.split(":", 1)[0].strip()
            if ":" in line and name:
                headers[name] = Omit()
        headers.update({"OpenAI-Organization": Omit(), "OpenAI-Project": Omit(),
                        "Authorization": f"Bearer {credentials.api_key}"})
    kwargs: dict[str, Any] = dict(
        api_key=credentials.api_key,
        base_url=base_url,
        timeout=config.timeout,
        max_retries=config.max_retries,
        default_headers=headers or None,
    )
    if http_client is not None:
        kwargs["http_client"] = http_client
    client = OpenAI(**kwargs)
    if not credentials.trusted_env:
        client.organization = None
        client.project = None
    return client


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """Folder for cached refinements unless ThinkConfig.cache_dir says otherwise."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser() / "think"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "lumina-mgpt2" / "think"


def cache_key(endpoint: str, model: str, instructions: str, prompt: str, seed: int | None = None,
              temperature: float | None = None) -> str:
    """Stable hash of everything that determines a refinement (never includes a key)."""
    blob = json.dumps(
        {"endpoint": endpoint, "model": model, "instructions": instructions, "prompt": prompt,
         "seed": seed, "temperature": temperature},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _cache_path(config: ThinkConfig, key: str) -> Path:
    folder = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return folder / f"{key}.json"


def _cache_read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("prompt"), str) and data["prompt"]:
        return data
    return None


def _cache_write(path: Path, record: dict) -> None:
    try:
        atomic_write_text(path, json.dumps(record, ensure_ascii=False, indent=1))
    except OSError as error:
        logger.warning("ThinkPrompt: could not write cache file %s (%s)", path, error)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

def _messages(config: ThinkConfig, prompt: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": config.instructions},
        {"role": "user", "content": f"User prompt: {prompt}"},
    ]


def _ask_endpoint(base_url: str, credentials: _Credentials, config: ThinkConfig, prompt: str,
                  http_client: Any = None) -> str:
    """One chat completion; returns the answer text (reasoning fields included as <think> blocks)."""
    import openai

    client = _make_client(base_url, credentials, config, http_client)
    request: dict[str, Any] = {"model": config.model, "messages": _messages(config, prompt)}
    if config.seed is not None:
        request["seed"] = config.seed
    if config.temperature is not None:
        request["temperature"] = config.temperature
    try:
        try:
            completion = client.chat.completions.create(**request)
        except openai.BadRequestError as error:
            # Reasoning models reject temperature/seed with 400: retry once without the optional fields.
            message = str(error).lower()
            dropped = [name for name in ("temperature", "seed") if name in request and name in message]
            if not dropped:
                raise
            for name in dropped:
                request.pop(name)
            logger.info("ThinkPrompt: endpoint rejected %s; retrying without", ", ".join(dropped))
            completion = client.chat.completions.create(**request)
    finally:
        client.close()
    choices = getattr(completion, "choices", None)
    if not choices:
        raise ValueError("the answer has no choices")
    message = choices[0].message
    content = message.content if message is not None else None
    extra = getattr(message, "model_extra", None) or {}
    thinking = extra.get("reasoning_content") or extra.get("reasoning") or ""
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the answer has no text content")
    if isinstance(thinking, str) and thinking.strip():
        content = f"<think>{thinking}</think>\n{content}"
    return content


_LOCAL_MODELS: dict[str, tuple[Any, Any]] = {}


def _ask_local(config: ThinkConfig, prompt: str) -> str:
    """Greedy answer of a transformers causal LM stored in a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(Path(config.local_model).expanduser().resolve())
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"local ThinkPrompt model folder not found: {folder}")
    if folder not in _LOCAL_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        _LOCAL_MODELS[folder] = (tokenizer, model)
    tokenizer, model = _LOCAL_MODELS[folder]
    ids = tokenizer.apply_chat_template(_messages(config, prompt), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    input_ids = ids["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=config.local_max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def unload_local_models() -> None:
    """Free the cached local fallback LMs."""
    _LOCAL_MODELS.clear()


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

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
    path = _cache_path(config, endpoint_key)
    if config.use_cache:
        cached = _cache_read(path)
        if cached is not None:
            return ThinkResult(prompt=cached["prompt"], reasoning=cached.get("reasoning", ""), original=prompt,
                               source="cache")

    credentials = resolve_credentials(base_url, config.key_file)
    warnings: list[str] = []
    if credentials.warning:
        warnings.append(credentials.warning)
        logger.warning("ThinkPrompt: %s", credentials.warning)

    failure = ""
    try:
        answer = _ask_endpoint(base_url, credentials, config, prompt, http_client)
        refined, reasoning = parse_refinement(answer)
        if refined:
            if config.use_cache:
                _cache_write(path, {"endpoint": base_url, "model": config.model, "prompt": refined,
                                    "reasoning": reasoning, "original": prompt})
            return ThinkResult(prompt=refined, reasoning=reasoning, original=prompt, source="endpoint",
                               warning="; ".join(warnings))
        failure = "the answer had no <results> block with a prompt"
    except Exception as error:  # any failure of the optional step must not fail the workflow
        failure = _redact(f"{type(error).__name__}: {error}", credentials.api_key)[:500]
        reasoning = ""
    where = _Origin.of(base_url).label
    warnings.append(f"ThinkPrompt endpoint {where} (model {config.model}) failed: {failure}")

    if config.local_model:
        local_key = cache_key(f"local:{config.local_model}", "local", config.instructions, prompt)
        local_path = _cache_path(config, local_key)
        cached = _cache_read(local_path) if config.use_cache else None
        if cached is not None:
            return ThinkResult(prompt=cached["prompt"], reasoning=cached.get("reasoning", ""), original=prompt,
                               source="cache", warning="; ".join(warnings))
        try:
            refined, reasoning = parse_refinement(_ask_local(config, prompt))
            if refined:
                if config.use_cache:
                    _cache_write(local_path, {"endpoint": "local", "model": config.local_model, "prompt": refined,
                                              "reasoning": reasoning, "original": prompt})
                warnings.append("used the local fallback model")
                message = "; ".join(warnings)
                logger.warning("ThinkPrompt: %s", message)
                return ThinkResult(prompt=refined, reasoning=reasoning, original=prompt, source="local",
                                   warning=message)
            warnings.append("local fallback model gave no <results> block")
        except Exception as error:
            warnings.append(f"local fallback model failed: {type(error).__name__}: {error}"[:500])

    warnings.append("using the original prompt")
    message = "; ".join(warnings)
    logger.warning("ThinkPrompt: %s", message)
    return ThinkResult(prompt=prompt, reasoning=reasoning, original=prompt, source="fallback", warning=message)
