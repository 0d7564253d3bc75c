"""Child processes for tests: a training run interrupted with SIGTERM once it has logged a step."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigterm_after_first_log(cmd: list[str], log: Path, env: dict[str, str], cwd: Path,
                            timeout: float = 120.0) -> tuple[int, str]:
    """Start `cmd`, wait until `log` holds a line (or the process ends), send SIGTERM; (exit status, output)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not (log.is_file() and log.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=timeout)[0]
    return proc.returncode, output
