"""One chat completion from an OpenAI-compatible endpoint, under one deadline and a size cap.

The SDK's timeout bounds each read, not the request: a server that sends one byte a second holds
it for as long as it likes, and a huge answer is read whole. So the SDK is asked for the raw
response, the body is read here chunk by chunk (stopping at the deadline or at MAX_ANSWER_BYTES),
retries are counted here (so they share the deadline), and the caller waits for the whole exchange
at most `timeout` seconds: a worker that overruns is left to its own per-read timeout, which never
exceeds the time that was left, and its result is dropped.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from .instructions import chat_messages
from .keys import Credentials
from .settings import MAX_ANSWER_BYTES, ThinkConfig

logger = logging.getLogger(__name__)

RETRY_STATUSES = (408, 409, 429)  # and every 5xx: what the SDK itself retries
MAX_BACKOFF_S = 8.0


class AnswerTooLarge(ValueError):
    """The server sent more than MAX_ANSWER_BYTES."""


def make_client(base_url: str, credentials: Credentials, http_client: Any = None):
    """An OpenAI SDK client for `base_url` that sends only this host's key (no retries: counted here)."""
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
    kwargs: dict[str, Any] = dict(api_key=credentials.api_key, base_url=base_url, max_retries=0,
                                  default_headers=headers or None)
    if http_client is not None:
        kwargs["http_client"] = http_client
    client = OpenAI(**kwargs)
    if not credentials.trusted_env:
        client.organization = None
        client.project = None
    return client


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, cancelled: threading.Event) -> float:
        """Seconds left; raises once none are (or the caller has given up)."""
        left = self.left()
        if left <= 0 or cancelled.is_set():
            raise TimeoutError(f"no complete answer within {self.seconds:g} s")
        return left


def _read_body(response: Any, deadline: _Deadline, cancelled: threading.Event) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise AnswerTooLarge(f"the answer is {int(declared)} bytes, more than the {MAX_ANSWER_BYTES} accepted")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(f"the answer is more than the {MAX_ANSWER_BYTES} bytes accepted")
        deadline.check(cancelled)
    return bytes(body)


def _retryable(error: Exception) -> bool:
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes the SDK's per-read timeout
        return True
    status = getattr(error, "status_code", None)
    return isinstance(error, openai.APIStatusError) and (status in RETRY_STATUSES or (status or 0) >= 500)


def _post(client: Any, request: dict[str, Any], deadline: _Deadline, cancelled: threading.Event) -> bytes:
    """One attempt: the raw body of the completion, read under the deadline and the size cap."""
    left = deadline.check(cancelled)
    with client.chat.completions.with_streaming_response.create(**request, timeout=left) as response:
        return _read_body(response, deadline, cancelled)


def _exchange(client: Any, config: ThinkConfig, request: dict[str, Any], deadline: _Deadline,
              cancelled: threading.Event) -> bytes:
    """The body of the first successful attempt (retries and the optional-field retry share the deadline)."""
    import openai

    attempt = 0
    while True:
        try:
            return _post(client, request, deadline, cancelled)
        except openai.BadRequestError as error:
            # Reasoning models reject temperature/seed with 400: retry once without the optional fields.
            message = str(error).lower()
            dropped = [name for name in ("temperature", "seed") if name in request and name in message]
            if not dropped:
                raise
            for name in dropped:
                request.pop(name)
            logger.info("ThinkPrompt: endpoint rejected %s; retrying without", ", ".join(dropped))
        except Exception as error:
            if attempt >= config.max_retries or not _retryable(error):
                raise
            attempt += 1
            pause = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_S)
            if pause >= deadline.left():
                raise
            logger.info("ThinkPrompt: %s; retry %d of %d", type(error).__name__, attempt, config.max_retries)
            time.sleep(pause)


def answer_text(body: bytes) -> str:
    """The answer's text from a chat-completion body; reasoning fields come first as a <think> block."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"the answer is not JSON ({type(error).__name__})") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the answer has no choices")
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the answer has no text content")
    thinking = message.get("reasoning_content") or message.get("reasoning") or ""
    if isinstance(thinking, str) and thinking.strip():
        content = f"<think>{thinking}</think>\n{content}"
    return content


def ask_endpoint(base_url: str, credentials: Credentials, config: ThinkConfig, prompt: str,
                 http_client: Any = None) -> str:
    """One chat completion within `config.timeout` seconds in all; returns the answer text."""
    request: dict[str, Any] = {"model": config.model, "messages": chat_messages(config.instructions, prompt)}
    if config.seed is not None:
        request["seed"] = config.seed
    if config.temperature is not None:
        request["temperature"] = config.temperature
    client = make_client(base_url, credentials, http_client)  # importing the SDK is not the server's time
    deadline = _Deadline(config.timeout)
    cancelled = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["body"] = _exchange(client, config, request, deadline, cancelled)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error
        finally:
            client.close()

    worker = threading.Thread(target=work, name="lumina-think", daemon=True)
    worker.start()
    worker.join(max(deadline.left(), 0.0))
    if worker.is_alive():
        cancelled.set()  # the worker stops at its next chunk or when its read timeout fires
        raise TimeoutError(f"no complete answer within {config.timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return answer_text(outcome["body"])
