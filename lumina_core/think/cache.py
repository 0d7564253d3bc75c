"""Refinements cached on disk, one private JSON file per (endpoint, model, instructions, prompt, seed).

Files are written 0600 in a 0700 folder: a prompt can be private, and the cache is the user's own.
A record over the size limits (an older version cached whatever came back) is a miss, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from ..fileio import atomic_write_text
from .settings import MAX_ANSWER_BYTES, MAX_PROMPT_CHARS, ThinkConfig

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "LUMINA_MGPT2_CACHE"
CACHE_FILE_MODE = 0o600
CACHE_DIR_MODE = 0o700
# A record holds the prompt, the original and the reasoning, each within its limit, plus JSON escapes.
MAX_RECORD_BYTES = 2 * MAX_ANSWER_BYTES


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


def cache_path(config: ThinkConfig, key: str) -> Path:
    """The file of one cache entry."""
    folder = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return folder / f"{key}.json"


def read_cached(path: Path) -> dict | None:
    """The cached record at `path`, or None (absent, unreadable, over the limits, no prompt)."""
    try:
        info = path.stat()
        if info.st_size > MAX_RECORD_BYTES:
            logger.warning("ThinkPrompt: ignoring cache file %s (%d bytes, over the %d-byte limit)",
                           path, info.st_size, MAX_RECORD_BYTES)
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_PROMPT_CHARS:
        return None
    if os.name != "nt" and stat.S_IMODE(info.st_mode) & ~CACHE_FILE_MODE:
        try:  # written by an older version with the umask's permissions: make it private
            os.chmod(path, CACHE_FILE_MODE)
        except OSError:
            pass
    return data


def write_cached(path: Path, record: dict) -> None:
    """Store a record, 0600 in a 0700 folder; a failure is a warning (the cache is optional)."""
    try:
        path.parent.mkdir(mode=CACHE_DIR_MODE, parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, ensure_ascii=False, indent=1), mode=CACHE_FILE_MODE)
    except OSError as error:
        logger.warning("ThinkPrompt: could not write cache file %s (%s)", path, error)
