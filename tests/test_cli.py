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
