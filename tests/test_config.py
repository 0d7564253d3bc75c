"""config.json is read and validated in one place (lumina_core/config.py): every bad value is one
line naming the file, the field, what it holds and what is allowed (issue 15 item 9)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_core.config import ModelConfig, read_config_json
from lumina_core.errors import InputError, MissingFileError
from lumina_core.pipeline import LuminaPipeline
from lumina_core.testing.checkpoints import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def copy_with_config(tiny_folder: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("field, value, allowed", [
    ("vocab_size", "188", "whole number in 1.."),   # a string: TypeError in a comparison before
    ("vocab_size", None, "whole number in 1.."),    # null: TypeError
    ("vocab_size", 1e12, "whole number in 1.."),    # a float far out of range: TypeError in torch.empty
    ("num_attention_heads", 0, "whole number in 1.."),  # ZeroDivisionError before
    ("hidden_size", True, "whole number in 1.."),  # bool is an int in Python, never a size
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a whole number in 1.."),  # was taken as "absent"
    ("rms_norm_eps", -1e-5, "rms_norm_eps must be a number in (0, 1]"),
    ("rope_theta", float("nan"), "rope_theta must be a number"),
    ("attention_bias", "no", "attention_bias must be true or false"),
])
def test_item9_bad_config_value_is_one_line_naming_file_and_field(tiny_folder, tmp_path, field, value, allowed):
    folder = copy_with_config(tiny_folder, tmp_path, **{field: value})
    with pytest.raises(InputError) as error:
        ModelConfig.from_pretrained(folder)
    assert_one_line(error, str(folder / "config.json"), field, allowed)


def test_item9_bad_config_is_refused_by_the_pipeline_loader(tiny_folder, tmp_path):
    folder = copy_with_config(tiny_folder, tmp_path, vocab_size="188")
    with pytest.raises(InputError, match=r"config\.json: vocab_size must be a whole number"):
        LuminaPipeline.from_pretrained(folder, device="cpu")


def test_item9_values_are_validated_in_one_place():
    # The same rules for a ModelConfig built in code as for one read from a file.
    with pytest.raises(InputError, match="vocab_size must be a whole number in 1..16777216, got '5'"):
        ModelConfig(vocab_size="5")
    with pytest.raises(InputError, match="hidden_size 10 is not divisible by num_attention_heads 3"):
        ModelConfig(hidden_size=10, num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(InputError, match="num_attention_heads must be a whole number"):
        ModelConfig.from_dict({"num_attention_heads": 0}, "my/config.json")
    assert ModelConfig.from_dict(ModelConfig.preset("2b").to_hf_dict()) == ModelConfig.preset("2b")


def test_item9_config_not_utf8_is_named(tiny_folder, tmp_path):
    folder = copy_with_config(tiny_folder, tmp_path)
    raw = (folder / "config.json").read_bytes().replace(b'"model_type"', b'"mod\xe9l_type"')
    (folder / "config.json").write_bytes(raw)
    with pytest.raises(InputError) as error:
        ModelConfig.from_pretrained(folder)
    assert_one_line(error, str(folder / "config.json"), "not UTF-8", "expected the JSON config.json")


@pytest.mark.parametrize("content, says", [
    (b'{"vocab_size": 188,', "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
])
def test_item9_config_not_a_json_object_is_named(tiny_folder, tmp_path, content, says):
    folder = copy_with_config(tiny_folder, tmp_path)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(InputError) as error:
        read_config_json(folder)
    assert_one_line(error, str(folder / "config.json"), says)


def test_item9_missing_config_is_an_input_error_and_file_not_found(tmp_path):
    with pytest.raises(MissingFileError, match="no config.json") as error:
        ModelConfig.from_pretrained(tmp_path)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, InputError)


def test_item9_vocabulary_map_of_the_wrong_shape_is_named(tiny_folder, tmp_path):
    folder = copy_with_config(tiny_folder, tmp_path, vocabulary_map=["<racm3:break>"])
    with pytest.raises(InputError) as error:
        LuminaPipeline.from_pretrained(folder, device="cpu")
    assert_one_line(error, str(folder / "config.json"), "vocabulary_map must be an object")


def test_item9_cli_bad_config_exits_2_with_one_line(tiny_folder, tmp_path):
    folder = copy_with_config(tiny_folder, tmp_path, num_attention_heads=0)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "lumina_core", "generate", "--model", str(folder), "--prompt", "a cube",
                          "--device", "cpu", "--output", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {folder / 'config.json'}: num_attention_heads must be a whole number in 1..4096, got 0"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
