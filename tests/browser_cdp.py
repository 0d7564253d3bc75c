"""Stdlib-only clients for the ComfyUI server tests: a minimal WebSocket (ComfyUI's event stream) and a
minimal Chrome DevTools Protocol client on top of it (the headless-browser test of the web extension)."""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebSocket:
    """Just enough of RFC 6455 for a test client: handshake, masked text frames out, messages in."""

    def __init__(self, host: str, port: int, path: str, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        header = b""
        while b"\r\n\r\n" not in header:
            header += self.sock.recv(1)
        assert b" 101 " in header.split(b"\r\n")[0], header

    def send_text(self, text: str) -> None:
        """Send one text frame (client frames are masked)."""
        payload = text.encode()
        mask = os.urandom(4)
        head = bytes([0x81])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def _exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return bytes(data)

    def receive(self) -> tuple[int, bytes]:
        """The next message: (opcode of its first frame: 1 text, 2 binary; payload of all its fragments)."""
        opcode, message = None, b""
        while True:
            first, second = self._exact(2)
            opcode = first & 0x0F if opcode is None else opcode
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._exact(8))[0]
            message += self._exact(length)
            if first & 0x80:
                return opcode, message

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class CDP:
    """One page target: send commands, collect events (console errors, exceptions)."""

    def __init__(self, ws_url: str):
        parts = urlsplit(ws_url)
        self.ws = WebSocket(parts.hostname, parts.port, parts.path, timeout=120)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send_text(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive()[1])
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout: float = 60):
        """Evaluate (awaiting promises) and return the value; JS exceptions raise."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions seen so far."""
        out = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params["exceptionDetails"])[:800])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                        for a in params.get("args", []))[:800])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}"[:800])
        return out


def launch(chromium: str, width: int = 1800, height: int = 1000) -> tuple[subprocess.Popen, CDP]:
    """Start headless Chromium on about:blank and attach to its page."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    process = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            if pages:
                break
        except OSError:
            pass
        if time.time() > deadline:
            process.kill()
            raise RuntimeError("chromium did not start")
        time.sleep(0.5)
    cdp = CDP(pages[0]["webSocketDebuggerUrl"])
    for domain in ("Runtime", "Log", "Page"):
        cdp.call(f"{domain}.enable")
    return process, cdp
