"""`python -m lumina_core generate` on a tiny official-format checkpoint."""
import json

import pytest
from PIL import Image

from lumina_core.__main__ import main
from lumina_core.testing.checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cli"), words="a red cat", num_image_codes=64, movq_ch=32)


def test_generate_writes_pngs_with_settings(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    main(["generate", "--model", str(tiny_folder), "--prompt", "a red cat", "--width", "32", "--height", "32",
          "--num-images", "2", "--seed", "7", "--sjd", "--sjd-window", "4", "--top-k", "20", "--device", "cpu",
          "--output", str(out)])
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["lumina_t2i_000007.png", "lumina_t2i_000008.png"]
    image = Image.open(files[1])
    assert image.size == (32, 32)
    meta = json.loads(image.text["lumina_mgpt2"])
    assert meta["seed"] == 8 and meta["prompt"] == "a red cat" and meta["sjd"] is True and meta["top_k"] == 20
    assert meta["sampler_stats"]["forward_passes"] > 0
    assert "forward passes" in capsys.readouterr().out


def test_reference_task_from_the_shell(tiny_folder, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(ref)
    main(["generate", "--model", str(tiny_folder), "--prompt", "blue", "--task", "edit", "--width", "32",
          "--height", "64", "--reference", str(ref), "--device", "cpu", "--output", str(tmp_path / "o")])
    (png,) = (tmp_path / "o").glob("*.png")
    assert Image.open(png).size == (32, 64)
    assert json.loads(Image.open(png).text["lumina_mgpt2"])["reference"] == "ref.png"


@pytest.mark.parametrize("args,message", [(["--cfg", "0.5"], "cfg"), (["--top-k", "0"], "top_k"),
                                          (["--temperature", "0"], "temperature"), (["--width", "33"], "multiple of 32"),
                                          (["--coupled"], "sjd_coupled")])
def test_bad_settings_exit_with_a_clear_message(tiny_folder, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(tiny_folder), "--prompt", "x", "--height", "32", "--width", "32",
              "--device", "cpu", "--output", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_auto_model_falls_back_to_the_demo_without_official_weights(tmp_path, monkeypatch, capsys):
    from lumina_core.__main__ import OFFICIAL_MODEL, choose_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    assert choose_model("auto", download=False) == "demo"
    assert "embedded demo model" in capsys.readouterr().err
    assert choose_model("auto", download=True) == OFFICIAL_MODEL
    assert choose_model("some/folder", download=False) == "some/folder"


def test_typed_options_win_over_model_defaults_even_abbreviated():
    import json

    from lumina_core.__main__ import OFFICIAL_SAMPLING, apply_model_defaults, build_parser
    from lumina_core.hub import resolve_model

    shipped = json.loads((resolve_model("demo") / "sampling_defaults.json").read_text())
    args = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--top", "20"])
    apply_model_defaults(args)  # argparse accepts --top for --top-k: the typed 20 must survive
    assert args.top_k == 20 != shipped["top_k"]
    assert (args.guidance, args.cfg, [args.width, args.height]) == (
        shipped["guidance"], shipped["cfg"], shipped["sizes"]["t2i"])
    plain = build_parser().parse_args(["generate", "--model", "/no/such/folder", "--prompt", "x"])
    apply_model_defaults(plain)
    assert {k: getattr(plain, k) for k in OFFICIAL_SAMPLING} == OFFICIAL_SAMPLING


# --- issue 15: no traceback for a user's mistake, nothing overwritten by surprise -----------------------------

def _exit_2(argv, capsys) -> str:
    """Run the CLI expecting exit 2; return the first line of stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[0]


def _never_load(monkeypatch):
    from lumina_core.pipeline import LuminaPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load for a mistake that can be seen before")

    monkeypatch.setattr(LuminaPipeline, "from_pretrained", refuse)


def _bad_reference(kind: str, tmp_path):
    path = tmp_path / "ref.png"
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    elif kind == "folder":
        path.mkdir()
    elif kind == "truncated":
        Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "unreadable":
        Image.new("RGB", (8, 8)).save(path)
        path.chmod(0)
    return path


@pytest.mark.parametrize("kind,message", [("corrupt", "not a readable image"), ("folder", "is a folder"),
                                          ("truncated", "not a readable image"), ("unreadable", "not a readable image")])
def test_issue15_item1_bad_reference_is_a_clear_error_before_loading(tmp_path, capsys, monkeypatch, kind, message):
    import os

    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    _never_load(monkeypatch)
    ref = _bad_reference(kind, tmp_path)
    line = _exit_2(["generate", "--model", "demo", "--prompt", "x", "--task", "control_canny", "--reference",
                    str(ref), "--device", "cpu", "--output", str(tmp_path / "o")], capsys)
    assert message in line and "ref.png" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a CPU-only torch")
def test_issue15_item1_cuda_on_a_cpu_only_torch(tmp_path, capsys, monkeypatch):
    _never_load(monkeypatch)
    line = _exit_2(["generate", "--model", "demo", "--prompt", "x", "--device", "cuda", "--output",
                    str(tmp_path / "o")], capsys)
    assert "no CUDA" in line and "--device cpu" in line


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_issue15_item1_output_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, where):
    _never_load(monkeypatch)
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    output = blocker if where == "is_a_file" else blocker / "sub"
    for mode in (["--prompt", "x"], ["--prompts", str(_prompt_file(tmp_path))]):
        line = _exit_2(["generate", "--model", "demo", *mode, "--device", "cpu", "--output", str(output)], capsys)
        assert str(output) in line and ("is a file" in line or "cannot write" in line)


def _prompt_file(tmp_path, lines=("a red circle in the top left",)):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_issue15_item1_no_traceback_from_a_real_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "lumina_core", "generate", "--model", "demo", "--prompt", "x",
                             "--reference", str(tmp_path), "--task", "control_canny", "--device", "cpu"],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: reference ")


DEMO = ["--model", "demo", "--device", "cpu", "--no-progress"]


def test_issue15_item2_think_with_one_prompt_thinks(tmp_path, monkeypatch):
    import lumina_core.think as think

    asked = []

    def refine(prompt, config=None, **kwargs):
        asked.append((prompt, config.model))
        return think.ThinkResult(prompt="a blue square in the bottom right", reasoning="", original=prompt,
                                 source="endpoint")

    monkeypatch.setattr(think, "refine_prompt", refine)
    main(["generate", *DEMO, "--prompt", "a square", "--think", "--think-model", "m1", "--output", str(tmp_path)])
    assert asked == [("a square", "m1")]
    (png,) = tmp_path.glob("*.png")
    meta = json.loads(Image.open(png).text["lumina_mgpt2"])
    assert meta["prompt"] == "a square" and meta["refined_prompt"] == "a blue square in the bottom right"


def test_issue15_item2_best_of_with_one_prompt_ranks_the_candidates(tmp_path):
    main(["generate", *DEMO, "--prompt", "a red circle in the top left", "--best-of", "3", "--verifier",
          "demo_check", "--seed", "5", "--output", str(tmp_path)])
    (png,) = tmp_path.glob("*.png")
    meta = json.loads(Image.open(png).text["lumina_mgpt2"])
    assert meta["best_of"] == 3 and meta["verifiers"] == ["demo_check"] and 5 <= meta["seed"] < 8
    assert png.name == f"lumina_t2i_{meta['seed']:06d}.png"


def test_issue15_item2_best_of_needs_a_verifier_and_an_empty_prompt_is_refused(tmp_path, capsys, monkeypatch):
    _never_load(monkeypatch)
    line = _exit_2(["generate", *DEMO, "--prompt", "x", "--best-of", "2", "--output", str(tmp_path)], capsys)
    assert "--verifier" in line
    line = _exit_2(["generate", *DEMO, "--prompt", "   ", "--output", str(tmp_path)], capsys)
    assert "empty 'prompt'" in line


def test_issue15_item3_a_second_prompt_never_replaces_the_first(tmp_path, capsys):
    out = str(tmp_path / "o")
    main(["generate", *DEMO, "--prompt", "a red circle in the top left", "--output", out])
    (first,) = (tmp_path / "o").glob("*.png")
    before = first.read_bytes()
    line = _exit_2(["generate", *DEMO, "--prompt", "a blue square in the center", "--output", out], capsys)
    assert "already exists" in line and "--overwrite" in line
    assert first.read_bytes() == before
    main(["generate", *DEMO, "--prompt", "a blue square in the center", "--output", out, "--overwrite"])
    assert json.loads(Image.open(first).text["lumina_mgpt2"])["prompt"] == "a blue square in the center"


def test_issue15_item3_a_batch_folder_is_locked(tmp_path, capsys, monkeypatch):
    import os
    import socket

    from lumina_core.batchgen.manifest import LOCK

    _never_load(monkeypatch)
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "started": "2026-01-01T00:00:00+00:00", "command": "another run"}))
    line = _exit_2(["generate", *DEMO, "--prompts", str(_prompt_file(tmp_path)), "--output", str(out)], capsys)
    assert f"in use by another batch run (pid {os.getpid()}" in line and str(out / LOCK) in line
    assert not list(out.glob("manifest*"))


def test_issue15_item3_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    import socket
    import subprocess

    from lumina_core.batchgen.manifest import LOCK

    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    main(["generate", *DEMO, "--prompts", str(_prompt_file(tmp_path)), "--output", str(out)])
    assert (out / "00000_0.png").is_file() and not (out / LOCK).exists()


def test_issue15_item4_batch_pngs_carry_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-secret-123")
    out = tmp_path / "o"
    main(["generate", *DEMO, "--prompts", str(_prompt_file(tmp_path)), "--output", str(out), "--top-k", "40",
          "--seed", "3", "--layout", "plain"])
    text = Image.open(out / "00000_0.png").text["lumina_mgpt2"]
    meta = json.loads(text)
    assert meta["prompt"] == "a red circle in the top left" and meta["seed"] == 3 and meta["top_k"] == 40
    assert meta["model"] == "demo" and meta["task"] == "t2i" and meta["cfg"] == 1.5
    assert "sk-planted" not in text and "key" not in " ".join(meta)


# --- issue 14 item 2: the model's own settings on the command line ---------------------------------------------

def test_issue14_item2_width_alone_keeps_the_models_height():
    from lumina_core.__main__ import apply_model_defaults, build_parser

    args = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--width", "128"])
    apply_model_defaults(args)
    assert (args.width, args.height) == (128, 64)
    args = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--height", "128"])
    apply_model_defaults(args)
    assert (args.width, args.height) == (64, 128)


def test_issue14_item2_help_says_the_defaults_come_from_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "defaults come from the model" in text
    for flag in ("--cfg", "--top-k", "--guidance"):
        assert flag in text
    assert text.count("the model's (its folder's sampling_defaults.json)") == 3
    assert "the model's size for the task" in text


def test_issue14_item2_a_task_the_model_does_not_list_is_warned(capsys):
    from lumina_core.__main__ import apply_model_defaults, build_parser

    args = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--task", "edit"])
    apply_model_defaults(args)
    err = capsys.readouterr().err
    assert "warning:" in err and "'edit'" in err and "t2i, control_canny, dense_canny" in err
    args = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--task", "t2i"])
    apply_model_defaults(args)
    assert capsys.readouterr().err == ""
