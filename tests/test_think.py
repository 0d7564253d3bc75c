"""ThinkPrompt against a real chat-completions HTTP server on 127.0.0.1 (started here), plus the local fallback."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai  # noqa: F401  (imported here, so the timings below measure the call, not a 2 s import)
import pytest
import torch

from lumina_core import think
from lumina_core.think import ThinkConfig, parse_refinement, refine_prompt

SECRET = "sk-test-SECRET-0123456789abcdef"
DRIP_BYTES, DRIP_S = 40, 0.25  # a 10 s answer whose every read is fast
OTHER_SECRET = "sk-filekey-ABCDEF9876543210"


class ChatServer:
    """A chat-completions server: records every request; `behaviour` decides each answer."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.behaviour = "ok"
        self.content = "The prompt is short.\n<results>A red cube on a wooden table, soft light</results>"
        self.message_extra: dict = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                outer.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                if outer.behaviour == "slow":
                    time.sleep(1.5)
                if outer.behaviour == "drip":  # headers at once, then one byte every DRIP_S seconds
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(DRIP_BYTES))
                    self.end_headers()
                    try:
                        for _ in range(DRIP_BYTES):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(DRIP_S)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client gave up, as it should
                    return
                if outer.behaviour == "500":
                    self._send(500, {"error": {"message": "internal failure", "type": "server_error"}})
                    return
                if outer.behaviour == "malformed":
                    raw = b"{this is not json"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                if outer.behaviour == "401_echo":  # providers echo (part of) a wrong key
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {key}. ({key[:8]}...{key[-4:]})",
                                               "type": "invalid_request_error"}})
                    return
                if outer.behaviour == "reject_temperature" and "temperature" in body:
                    self._send(400, {"error": {"message": "Unsupported parameter: 'temperature'",
                                               "type": "invalid_request_error", "param": "temperature"}})
                    return
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": outer.content,
                                             **outer.message_extra}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

            def _send(self, status, payload):
                raw = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ChatServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
                 "OPENAI_CUSTOM_HEADERS", "OPENAI_ADMIN_KEY", "LUMINA_MGPT2_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no real key file is ever read
    monkeypatch.setenv("LUMINA_MGPT2_CACHE", str(tmp_path / "cache"))


def cfg(server, tmp_path, **kw) -> ThinkConfig:
    base = dict(base_url=server.base_url, model="test-model", max_retries=0, timeout=5.0,
                cache_dir=str(tmp_path / "think-cache"))
    base.update(kw)
    return ThinkConfig(**base)


def test_success_sends_instructions_and_parses_results(server, tmp_path):
    result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "endpoint" and result.refined
    assert result.prompt == "A red cube on a wooden table, soft light"
    assert result.reasoning == "The prompt is short."
    assert result.warning == ""  # loopback without key: placeholder, no warning
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["body"]
    assert body["model"] == "test-model"
    assert body["messages"][0] == {"role": "system", "content": think.REFINE_INSTRUCTIONS}
    assert "a red cube" in body["messages"][1]["content"]
    assert "temperature" not in body and "max_tokens" not in body  # reasoning models reject them
    assert req["headers"]["authorization"] == f"Bearer {think.PLACEHOLDER_KEY}"


def test_cache_hit_makes_no_request(server, tmp_path):
    config = cfg(server, tmp_path, seed=3)
    first = refine_prompt("a red cube", config)
    assert len(server.requests) == 1 and server.requests[0]["body"]["seed"] == 3
    server.behaviour = "500"  # a second request would fail: the cache must answer
    second = refine_prompt("a red cube", config)
    assert len(server.requests) == 1
    assert second.source == "cache" and second.prompt == first.prompt and second.reasoning == first.reasoning
    # a different seed, model or prompt is a different cache entry
    refine_prompt("a red cube", cfg(server, tmp_path, seed=4))
    assert len(server.requests) == 2
    files = list((tmp_path / "think-cache").glob("*.json"))
    assert len(files) == 1 and not list((tmp_path / "think-cache").glob(".*.tmp"))


def test_timeout_falls_back_to_user_prompt(server, tmp_path):
    server.behaviour = "slow"
    start = time.monotonic()
    result = refine_prompt("a red cube", cfg(server, tmp_path, timeout=0.3))
    assert time.monotonic() - start < 1.4
    assert result.source == "fallback" and result.prompt == "a red cube" and not result.refined
    assert "Timeout" in result.warning and "original prompt" in result.warning


def test_http_500_falls_back_and_retries_as_configured(server, tmp_path):
    server.behaviour = "500"
    result = refine_prompt("a red cube", cfg(server, tmp_path, max_retries=1))
    assert result.source == "fallback" and result.prompt == "a red cube"
    assert "InternalServerError" in result.warning
    assert len(server.requests) == 2  # first try + one retry
    assert not list((tmp_path / "think-cache").glob("*.json"))  # failures are not cached


def test_malformed_answer_falls_back(server, tmp_path):
    server.behaviour = "malformed"
    result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "fallback" and result.prompt == "a red cube" and result.warning


def test_missing_results_markers_falls_back(server, tmp_path, caplog):
    server.content = "I think the prompt is fine and would add a table."
    with caplog.at_level(logging.WARNING, logger="lumina_core.think"):
        result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "fallback" and result.prompt == "a red cube"
    assert "<results>" in result.warning
    assert result.reasoning == "I think the prompt is fine and would add a table."
    assert "original prompt" in caplog.text


def test_reasoning_field_is_kept_as_reasoning(server, tmp_path):
    server.message_extra = {"reasoning_content": "The user wants a cube; add light."}
    server.content = "<results>A red cube, soft light</results>"
    result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.prompt == "A red cube, soft light"
    assert result.reasoning == "The user wants a cube; add light."


def test_unreachable_endpoint_falls_back(tmp_path):
    config = ThinkConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=2.0,
                         cache_dir=str(tmp_path))
    result = refine_prompt("a red cube", config)
    assert result.source == "fallback" and "APIConnectionError" in result.warning


def test_temperature_rejected_is_retried_without(server, tmp_path):
    server.behaviour = "reject_temperature"
    result = refine_prompt("a red cube", cfg(server, tmp_path, temperature=0.7))
    assert result.source == "endpoint"
    assert [("temperature" in r["body"]) for r in server.requests] == [True, False]


@pytest.mark.parametrize("answer, expected, reasoning_has", [
    ("analysis\n<results>\n  \"A cat.\"\n</results>", "A cat.", "analysis"),
    ("<RESULTS>draft</RESULTS> better:\n<results>final one", "final one", "draft"),
    ("<think>hidden plan <results>no</results></think>Sure.\n<results>```\nA dog\n```</results>", "A dog", "hidden plan"),
    ("plan without opening tag</think>\n<results>A fox</results>", "A fox", "plan without"),
    ("Steps...\nFinal prompt: A blue vase on a shelf.\n\nHope this helps.", "A blue vase on a shelf.", "Steps"),
    ("no markers at all", None, "no markers"),
    ("<results>   </results>", None, ""),
])
def test_parse_refinement(answer, expected, reasoning_has):
    refined, reasoning = parse_refinement(answer)
    assert refined == expected
    assert reasoning_has in reasoning
    if expected:
        assert "<results>" not in reasoning.split("\n")[-1] or expected not in reasoning


# ------------------------------------------------------------------ keys ---------------------------

def _all_text_under(path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in path.rglob("*") if p.is_file())


def test_env_key_never_reaches_an_unconfigured_host(server, tmp_path, monkeypatch, caplog):
    # The user's key and other OpenAI settings are in the environment; a (shared) workflow names
    # some other endpoint. Nothing of them may be sent, logged or saved.
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-SECRETORG")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-SECRETPROJ")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-SECRETADMIN")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Proxy-Token: SECRETHEADER\nAuthorization: Bearer SECRETAUTH")
    with caplog.at_level(logging.DEBUG):
        result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "endpoint"
    sent = json.dumps(server.requests)
    for secret in (SECRET, "SECRETORG", "SECRETPROJ", "SECRETADMIN", "SECRETHEADER", "SECRETAUTH"):
        assert secret not in sent, secret
        assert secret not in caplog.text
        assert secret not in repr(result)
        assert secret not in _all_text_under(tmp_path)
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {think.PLACEHOLDER_KEY}"


def test_env_key_goes_to_the_base_url_the_user_set(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    with caplog.at_level(logging.DEBUG):
        result = refine_prompt("a red cube", cfg(server, tmp_path, base_url=""))  # workflow leaves it empty
    assert result.source == "endpoint"
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in caplog.text and SECRET not in repr(result)
    assert SECRET not in _all_text_under(tmp_path)


def test_key_echoed_in_an_error_is_redacted(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    server.behaviour = "401_echo"
    with caplog.at_level(logging.DEBUG):
        result = refine_prompt("a red cube", cfg(server, tmp_path, base_url=""))
    assert result.source == "fallback" and "AuthenticationError" in result.warning
    for part in (SECRET, SECRET[:8], SECRET[-4:]):
        assert part not in result.warning and part not in caplog.text


def test_key_file_key_goes_only_to_its_host(server, tmp_path, monkeypatch):
    port = server.httpd.server_address[1]
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({f"127.0.0.1:{port}": OTHER_SECRET, "api.example.com": "sk-example"}))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    result = refine_prompt("a red cube", cfg(server, tmp_path, key_file=str(key_file)))
    assert result.source == "endpoint"
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {OTHER_SECRET}"
    assert SECRET not in json.dumps(server.requests)
    assert OTHER_SECRET not in _all_text_under(tmp_path / "think-cache")


def test_credentials_for_remote_hosts(tmp_path, monkeypatch):
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"api.example.com": "sk-example", "http://lan-box:8000": "sk-lan"}))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    official = think.resolve_credentials("https://api.openai.com/v1", str(key_file))
    assert official.api_key == SECRET and not official.warning
    example = think.resolve_credentials("https://api.example.com/v1", str(key_file))
    assert example.api_key == "sk-example"
    # a bare-host entry is never sent over plain http (a workflow cannot downgrade it)
    downgraded = think.resolve_credentials("http://api.example.com/v1", str(key_file))
    assert downgraded.api_key == think.PLACEHOLDER_KEY and "no API key" in downgraded.warning
    assert think.resolve_credentials("http://lan-box:8000/v1", str(key_file)).api_key == "sk-lan"
    evil = think.resolve_credentials("https://api.openai.com.evil.example/v1", str(key_file))
    assert evil.api_key == think.PLACEHOLDER_KEY and evil.warning and SECRET not in evil.warning


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="base_url"):
        ThinkConfig(base_url="ftp://x")
    with pytest.raises(ValueError, match="timeout"):
        ThinkConfig(timeout=0)
    with pytest.raises(ValueError, match="model"):
        ThinkConfig(model=" ")


# ------------------------------------------------------------------ local fallback -----------------

def _make_chain_lm(folder):
    """A real LlamaForCausalLM whose weights make greedy decoding follow a fixed token chain."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<|end|>", "<|user|>", "<|system|>", "<|assistant|>", "<results>", "</results>",
             "A", "red", "cube", "glowing", "User", "prompt:", "a", "[UNK]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    template = ("{% for m in messages %}{% if m.role == 'user' %}<|user|> {{ m.content }} {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|end|>", pad_token="<|end|>",
                                   chat_template=template)
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    fast.save_pretrained(folder)

    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=0, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    chain = ["<|assistant|>", "<results>", "A", "glowing", "red", "cube", "</results>", "<|end|>"]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :] = torch.eye(len(words), 16)  # one-hot embeddings
        for layer in model.model.layers:  # blocks add nothing: the residual stream stays one-hot
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        for src, dst in zip(chain, chain[1:]):
            model.lm_head.weight[vocab[dst], vocab[src]] = 10.0
    model.save_pretrained(folder)


def test_local_fallback_model(tmp_path):
    folder = tmp_path / "tiny-lm"
    _make_chain_lm(folder)
    think.unload_local_models()
    config = ThinkConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=2.0,
                         cache_dir=str(tmp_path / "c"), local_model=str(folder), local_max_new_tokens=12)
    result = refine_prompt("a red cube", config)
    assert result.source == "local"
    assert result.prompt == "A glowing red cube"
    assert "APIConnectionError" in result.warning and "local fallback" in result.warning
    think.unload_local_models()
    again = refine_prompt("a red cube", config)  # served from the cache, no model needed
    assert again.source == "cache" and again.prompt == "A glowing red cube"


# ------------------------------------------------------------------ limits (issue 15 items 13-15) ------

def test_item13_one_deadline_for_the_whole_call(server, tmp_path):
    # Every read gets a byte within 0.25 s, so a per-read timeout never fires; the answer takes 10 s.
    server.behaviour = "drip"
    start = time.monotonic()
    result = refine_prompt("a red cube", cfg(server, tmp_path, timeout=1.0))
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 0.8, elapsed
    assert result.source == "fallback" and result.prompt == "a red cube"
    assert "Timeout" in result.warning and "within 1 s" in result.warning


def test_item13_retries_share_the_deadline(server, tmp_path):
    server.behaviour = "500"
    start = time.monotonic()
    result = refine_prompt("a red cube", cfg(server, tmp_path, timeout=1.0, max_retries=6))
    assert time.monotonic() - start < 1.0 + 0.8  # the SDK's own back-off alone would wait 0.5+1+2+4+8+8 s
    assert result.source == "fallback" and "InternalServerError" in result.warning
    assert 1 < len(server.requests) < 7


def test_item14_huge_answer_is_refused_and_not_cached(server, tmp_path):
    server.content = "<results>" + "a red cube " * 200_000 + "</results>"  # 2.2 MB
    result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "fallback" and result.prompt == "a red cube"
    assert "AnswerTooLarge" in result.warning and str(think.MAX_ANSWER_BYTES) in result.warning
    assert not list((tmp_path / "think-cache").glob("*.json"))


def test_item14_overlong_refined_prompt_is_refused_and_not_cached(server, tmp_path):
    server.content = "<results>" + "a red cube " * 1000 + "</results>"  # 11 KB: fits the answer cap
    result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "fallback" and result.prompt == "a red cube"
    assert f"more than the {think.MAX_PROMPT_CHARS} accepted" in result.warning
    assert not list((tmp_path / "think-cache").glob("*.json"))
    server.content = "<results>A red cube, soft light</results>"  # the next answer is fine: asked again
    assert refine_prompt("a red cube", cfg(server, tmp_path)).source == "endpoint"
    assert len(server.requests) == 2


def test_item14_oversized_cache_record_is_a_miss(server, tmp_path):
    config = cfg(server, tmp_path)
    assert refine_prompt("a red cube", config).source == "endpoint"
    (path,) = (tmp_path / "think-cache").glob("*.json")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "prompt": "x" * (think.MAX_PROMPT_CHARS + 1)}))  # an older version's entry
    again = refine_prompt("a red cube", config)
    assert again.source == "endpoint" and again.prompt == record["prompt"] and len(server.requests) == 2
    assert json.loads(path.read_text())["prompt"] == record["prompt"]  # replaced by the good answer


def test_item15_cache_files_are_private(server, tmp_path):
    result = refine_prompt("a red cube", cfg(server, tmp_path))
    assert result.source == "endpoint"
    (path,) = (tmp_path / "think-cache").glob("*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_item15_key_file_readable_by_others_gets_a_warning(server, tmp_path, caplog):
    port = server.httpd.server_address[1]
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({f"127.0.0.1:{port}": OTHER_SECRET}))
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="lumina_core.think"):
        result = refine_prompt("a red cube", cfg(server, tmp_path, key_file=str(key_file), use_cache=False))
    assert result.source == "endpoint"
    assert f"key file {key_file} is accessible by other users (permissions 0644)" in result.warning
    assert f"chmod 600 {key_file}" in caplog.text and OTHER_SECRET not in caplog.text + result.warning
    key_file.chmod(0o600)
    quiet = refine_prompt("a red cube", cfg(server, tmp_path, key_file=str(key_file), use_cache=False))
    assert quiet.source == "endpoint" and quiet.warning == ""
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {OTHER_SECRET}"


def test_issue16_item5_think_is_a_package_split_by_idea():
    import lumina_core.think as package

    assert hasattr(package, "__path__")  # a package, not think.py
    import importlib

    for name in ("settings", "instructions", "keys", "client", "parse", "cache", "local", "refine"):
        module = importlib.import_module(f"lumina_core.think.{name}")
        assert len(open(module.__file__, encoding="utf-8").read().splitlines()) < 250, name
    assert package.refine_prompt is importlib.import_module("lumina_core.think.refine").refine_prompt
