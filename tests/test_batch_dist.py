"""`python -m lumina_core generate --prompts` as real processes: torchrun with 2 ranks vs 1 process, kill + rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lumina_core.batchgen import read_jsonl_records
from lumina_core.testing.checkpoints import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), words="a red cube blue ball room fox", max_grids=8)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # Same thread count in every run: float reductions (and so sampled codes) then match bit for bit.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _generate_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "lumina_core", "generate", "--model", str(model), "--prompts", str(prompts), "--output", str(out),
            "--width", "32", "--height", "32", "--cfg", "2.0", "--top-k", "16", "--seed", "11", "--no-progress",
            *extra]


def _prompt_file(path: Path, count: int) -> Path:
    colours = ["red", "blue"]
    things = ["circle", "square", "triangle", "circle above a green square"]
    lines = [json.dumps({"prompt": f"a {colours[n % 2]} {things[n % 4]}", **({"images": 2} if n % 5 == 0 else {})})
             for n in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run in its own session and kill the whole group on timeout (torchrun's workers included)."""
    process = subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(args[:6])} ... timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def _pixels(folder: Path) -> dict[str, bytes]:
    return {p.name: Image.open(p).tobytes() for p in sorted(folder.glob("*.png"))}


def _demo_args(prompts: Path, out: Path) -> list[str]:
    """The embedded demo model at its trained size, with its own sampling settings."""
    args = _generate_args(Path("demo"), prompts, out, "--guidance", "constant")
    for flag, value in (("--width", "64"), ("--height", "64"), ("--cfg", "1.5"), ("--top-k", "50")):
        args[args.index(flag) + 1] = value
    return args


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    prompts = _prompt_file(tmp_path / "p.jsonl", 20)
    single, double = tmp_path / "single", tmp_path / "double"
    one = _run([sys.executable, *_demo_args(prompts, single)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *_demo_args(prompts, double)])
    assert two.returncode == 0, two.stderr[-3000:]

    images = _pixels(single)
    assert len(images) == 24                       # 20 items, 4 of them with 2 images
    assert _pixels(double) == images              # same seeds -> same images, whichever rank drew the item
    records = read_jsonl_records(double / "manifest.jsonl")
    keys = [r["key"] for r in records]
    assert len(keys) == 20 and len(set(keys)) == 20      # merged, each item exactly once
    assert {r["rank"] for r in records} == {0, 1}        # both ranks worked
    assert not list(double.glob("manifest.rank*.jsonl"))  # rank files merged away
    seeds = {r["key"]: r["seeds"] for r in records}
    assert seeds == {r["key"]: r["seeds"] for r in read_jsonl_records(single / "manifest.jsonl")}
    summary = json.loads((double / "summary.json").read_text())
    assert summary["generated"] == 20 and summary["images"] == 24 and summary["world_size"] == 2


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_items(tmp_path, tiny_model):
    count = 8
    prompts = _prompt_file(tmp_path / "p.jsonl", count)
    out = tmp_path / "out"
    # 128 px squares (16x16 codes) make each item slow enough to be killed mid-run.
    args = [sys.executable, *_generate_args(tiny_model, prompts, out)]
    args[args.index("--width") + 1] = args[args.index("--height") + 1] = "128"
    process = subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    rank_file = out / "manifest.rank0.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if rank_file.is_file() and len(read_jsonl_records(rank_file)) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed; make items slower"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished = read_jsonl_records(rank_file)            # valid JSONL even right after SIGKILL
    assert 2 <= len(finished) < count
    mtimes = {rel: (out / rel).stat().st_mtime_ns for r in finished for rel in r["files"]}

    rerun = _run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = read_jsonl_records(out / "manifest.jsonl")
    keys = [r["key"] for r in records]
    assert sorted(keys) == [f"{n:05d}" for n in range(count)] and len(set(keys)) == count
    assert {rel: (out / rel).stat().st_mtime_ns for rel in mtimes} == mtimes   # finished items untouched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_done"] == len(finished) and summary["generated"] == count - len(finished)
    assert not list(out.glob(".*.tmp"))                  # no temp file left visible as an output
