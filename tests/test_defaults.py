"""ModelDefaults: a model folder's own settings (sampling_defaults.json), else the official ones."""
import json

import pytest

from lumina_core.defaults import DefaultsFileError, ModelDefaults
from lumina_core.demo import build
from lumina_core.hub import BUILTIN_MODELS
from lumina_core.request import largest_size


def test_official_defaults_without_a_file(tmp_path):
    official = ModelDefaults.from_folder(tmp_path)
    assert official == ModelDefaults.official()
    assert (official.cfg, official.guidance, official.top_k) == (4.0, "official", 4096)
    assert official.size("t2i") == (768, 768) and official.size("edit") == (512, 1024)
    assert official.knows("pair_depth") and official.task_warning("pair_depth") is None


def test_the_demo_folder_and_its_builder_agree():
    demo = ModelDefaults.from_folder(BUILTIN_MODELS["demo"])
    assert demo == ModelDefaults.from_dict(build.sampling_defaults(), source=demo.source)
    assert (demo.cfg, demo.guidance, demo.top_k) == (1.5, "constant", 50)
    assert demo.size("t2i") == (64, 64) and demo.size("control_canny") == (64, 128)
    assert demo.size("pair_depth") == (64, 128)  # unlisted tasks: the panel size, two panels stacked
    # Typed values win; one typed side keeps the model's other side.
    assert demo.size("t2i", width=96) == (96, 64) and demo.size("t2i", 128, 128) == (128, 128)
    assert demo.sampling() == {"cfg": 1.5, "guidance": "constant", "top_k": 50}
    assert demo.sampling(cfg=2.0, top_k=10) == {"cfg": 2.0, "guidance": "constant", "top_k": 10}
    warning = demo.task_warning("edit")
    assert "t2i, control_canny, dense_canny" in warning and "'edit'" in warning
    # Its default sizes fit its 256 positions with room for a prompt.
    for task in demo.tasks:
        width, height = largest_size(task, 256, prompt_tokens=40)
        assert demo.size(task)[0] <= width and demo.size(task)[1] <= height


def test_round_trip_through_the_file(tmp_path):
    demo = ModelDefaults.from_folder(BUILTIN_MODELS["demo"])
    demo.write(tmp_path)
    assert ModelDefaults.from_folder(tmp_path).to_dict() == demo.to_dict()


@pytest.mark.parametrize("content,message", [
    ({"tasks": ["t2i", "inpaint"]}, "unknown task 'inpaint'"),
    ({"sizes": {"t2i": [64]}}, r"sizes.t2i must be \[width, height\]"),
    ({"cfg": 0.5}, "cfg must be a number >= 1"),
    ({"guidance": "linear"}, "guidance must be one of"),
    ({"top_k": 0}, "top_k must be a positive integer"),
    ([], "expected a JSON object"),
])
def test_bad_files_name_the_file_and_the_field(tmp_path, content, message):
    (tmp_path / "sampling_defaults.json").write_text(json.dumps(content))
    with pytest.raises(DefaultsFileError, match=message) as info:
        ModelDefaults.from_folder(tmp_path)
    assert str(tmp_path / "sampling_defaults.json") in str(info.value)
    (tmp_path / "sampling_defaults.json").write_text("{not json")
    with pytest.raises(DefaultsFileError, match="not readable JSON"):
        ModelDefaults.from_folder(tmp_path)
