"""Peak anonymous memory of a child process, polled from outside (Linux /proc).

Why from outside: the kernel keeps a high-water mark only for the whole RSS, which also counts
pages of memory-mapped weight files (they are page cache, not memory the program holds). Anonymous
RSS is what a load or a generation allocates; a thread inside the process would miss short peaks
while the GIL is held, a second process polling /proc/<pid>/status does not stop with it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def anon_rss_bytes(pid: int | str = "self") -> int:
    """Current anonymous resident memory (RssAnon) of a process, in bytes; 0 once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class ChildPeak:
    """What `run_child` measured: the child's peak anonymous RSS and the JSON object it printed last."""

    peak_anon_bytes: int
    result: dict
    returncode: int
    stderr: str


def run_child(code: str, args: tuple = (), env: dict | None = None, poll_s: float = 0.0005,
              cwd: str | None = None) -> ChildPeak:
    """Run `python -c code args...` and poll its anonymous RSS until it exits; its last stdout line must be JSON."""
    child_env = dict(os.environ, **(env or {}))
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env, cwd=cwd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, anon_rss_bytes(proc.pid))
        time.sleep(poll_s)
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.strip()]
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
    return ChildPeak(peak_anon_bytes=peak, result=result, returncode=proc.returncode, stderr=err)
