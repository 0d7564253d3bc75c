"""Which API key goes to which host: a key is only ever sent to the host it belongs to.

- ``OPENAI_API_KEY`` is sent only to the official OpenAI endpoint, or to the origin of
  ``OPENAI_BASE_URL`` when the user set that variable;
- any other host gets the key the user stored for that host in the key file
  (``LUMINA_MGPT2_KEY_FILE`` or ``~/.config/lumina-mgpt2/api_keys.json``: a JSON object ``{host: key}``),
  which should be readable by its owner only (a warning says so otherwise, as ssh does);
- otherwise no key is sent (a placeholder instead, which local servers ignore) and, for a remote host,
  a warning says so. Keys never appear in results, cache files or log messages (`redact`).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .settings import ThinkConfig

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://api.openai.com/v1"
# Sent when no key belongs to the target host: the SDK refuses an empty key and local servers ignore it.
PLACEHOLDER_KEY = "sk-no-key"
KEY_FILE_ENV = "LUMINA_MGPT2_KEY_FILE"


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port of a URL: the unit a key is bound to."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> "Origin":
        """The origin of `url` (default ports filled in, host lower-cased)."""
        parts = urlsplit(url)
        scheme = (parts.scheme or "https").lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme, (parts.hostname or "").lower(), port)

    @property
    def is_loopback(self) -> bool:
        """True for this machine (localhost, 127.0.0.0/8, ::1)."""
        if self.host == "localhost" or self.host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def label(self) -> str:
        """host:port, for messages."""
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


def key_file_warning(path: Path) -> str:
    """A warning when the key file can be read by other users (as ssh warns of a private key), else ''."""
    if os.name == "nt":  # no POSIX permission bits; NTFS ACLs are the user's business
        return ""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"key file {path} is accessible by other users (permissions {stat.S_IMODE(mode):04o}); "
                f"it holds API keys: run chmod 600 {path}")
    return ""


def _read_key_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        # Only the error's type: a JSON error message may quote the file, and the file holds keys.
        logger.warning("ThinkPrompt: cannot read key file %s (%s); no per-host keys available", path, type(error).__name__)
        return {}
    if not isinstance(data, dict):
        logger.warning("ThinkPrompt: key file %s must hold a JSON object {host: key}", path)
        return {}
    return {str(k).strip().lower().rstrip("/"): str(v) for k, v in data.items() if isinstance(v, str) and v}


def _key_from_file(origin: Origin, keys: dict[str, str]) -> str | None:
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
class Credentials:
    """The key for one request and whether the target is the user's own environment-configured endpoint."""

    api_key: str
    trusted_env: bool  # the target is the user's own OpenAI/OPENAI_BASE_URL endpoint
    warning: str = ""


def resolve_credentials(base_url: str, key_file: str | None = None) -> Credentials:
    """Choose the key that belongs to base_url's host (never a key of another host)."""
    origin = Origin.of(base_url)
    env_origins = {Origin.of(OFFICIAL_BASE_URL)}
    if os.environ.get("OPENAI_BASE_URL"):
        env_origins.add(Origin.of(os.environ["OPENAI_BASE_URL"]))
    trusted_env = origin in env_origins
    env_key = os.environ.get("OPENAI_API_KEY")
    if trusted_env and env_key:
        return Credentials(env_key, True)
    path = Path(key_file).expanduser() if key_file else default_key_file()
    exposed = key_file_warning(path)  # said whenever the file is read, whether or not it has this host
    file_key = _key_from_file(origin, _read_key_file(path))
    if file_key:
        return Credentials(file_key, trusted_env, exposed)
    if origin.is_loopback:
        return Credentials(PLACEHOLDER_KEY, trusted_env, exposed)
    if trusted_env:
        warning = f"no API key for {origin.label}: set OPENAI_API_KEY; sending the request without a key"
    else:
        warning = (
            f"no API key configured for {origin.label} (keys go only to their own host: add it to "
            f"{path} as {{\"{origin.host}\": \"...\"}}); sending the request without a key"
        )
    return Credentials(PLACEHOLDER_KEY, trusted_env, "; ".join(w for w in (exposed, warning) if w))


def redact(text: str, secret: str) -> str:
    """`text` with `secret` (and the parts providers echo of it) replaced by ***."""
    if secret and secret != PLACEHOLDER_KEY:
        text = text.replace(secret, "***")
        if len(secret) > 12:  # providers echo keys partially ("sk-abc...xyz")
            text = text.replace(secret[:8], "***").replace(secret[-4:], "***")
    return text
