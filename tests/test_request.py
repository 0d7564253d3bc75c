"""Task catalogue, Request validation and the reference preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from lumina_core.images import center_crop
from lumina_core.request import (
    PROMPT_RESERVE_TOKENS, Request, RequestError, body_length, cfg_rows, image_token_count, largest_size,
    sequence_positions, size_choices, size_problem, web_constants,
)
from lumina_core.tasks import TASKS, get_task


def _image(w, h, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4}[mode]
    array = np.random.RandomState(seed).randint(0, 256, size=(h, w, channels)).astype(np.uint8)
    return Image.fromarray(array, mode)


# Official strings from generate.py (reference section d), written out in full here.
OFFICIAL = {
    "t2i": "Generate an image of 768x768 according to the following prompt:\nA cat.",
    "pair_depth": "Generate a dual-panel image of 512x1024 where the <lower half> displays a <depth map>, while the "
                  "<upper half> retains the original image for direct visual comparison:\nA cat.",
    "pair_openpose": "Generate a dual-panel image of 512x1024 where the <lower half> displays a <pose estimation map>, "
                     "while the <upper half> retains the original image for direct visual comparison:\nA cat.",
    "control_canny": "Generate a dual-panel image of 512x1024 where the <upper half> displays a <canny edge map>, "
                     "while the <lower half> retains the original image for direct visual comparison:\nA cat.",
    "subject": "Generate a dual-panel image of 512x1024 where the <upper half> displays a <Bubbly and effervescent "
               "with a sparkling allure.>, while the <lower half> retains the original image for direct visual "
               "comparison:\nA cat.",
}


@pytest.mark.parametrize("task", sorted(OFFICIAL))
def test_official_templates_are_verbatim(task):
    spec = get_task(task)
    size = (768, 768) if task == "t2i" else (512, 1024)
    reference = _image(512, 512) if spec.reference_upper else None
    request = Request(task=task, prompt="A cat.", width=size[0], height=size[1], reference=reference)
    assert request.prompt_text() == OFFICIAL[task]


def test_paper_subject_template_is_verbatim():
    request = Request(task="subject", prompt="on a beach", width=512, height=1024, reference=_image(512, 512),
                      template="paper", subject_description="a red teapot")
    assert request.prompt_text() == (
        "Generate a dual-panel image of 512×1024 where the <upper half> displays: a red teapot, while the "
        "<lower half> shows the image according to the object and following prompt: on a beach.")
    with pytest.raises(RequestError, match="needs subject_description"):
        Request(task="subject", width=512, height=1024, reference=_image(512, 512), template="paper")


def test_catalogue_covers_every_task_with_both_forms():
    expected = {"t2i", "pair_depth", "pair_canny", "pair_hed", "pair_openpose", "subject", "edit",
                "control_canny", "control_depth", "control_pose", "control_hed",
                "dense_depth", "dense_canny", "dense_hed", "dense_pose"}
    assert set(TASKS) == expected
    for spec in TASKS.values():
        assert "×" in spec.paper_template and "{prompt}" in spec.paper_template
        assert spec.dual_panel == (spec.key != "t2i")
        assert spec.reference_upper == (spec.key.split("_")[0] in ("subject", "edit", "control", "dense"))
        official = spec.template("official")
        reference = _image(spec.default_width, spec.default_height // 2) if spec.reference_upper else None
        Request(task=spec.key, width=spec.default_width, height=spec.default_height, reference=reference,
                subject_description="x").validate(prompt_tokens=300)  # defaults fit the official cap
        assert official.startswith("Generate ") and "{w}" in official and "{h}" in official
    # Edit has no official string: "official" resolves to its only (paper-style) form.
    assert TASKS["edit"].official_template is None
    assert TASKS["edit"].template("official") == TASKS["edit"].paper_template


def test_unknown_task_and_template_list_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown task 'inpaint'; allowed: \[.*'t2i'.*\]"):
        Request(task="inpaint")
    with pytest.raises(ValueError, match=r"unknown template 'fancy' .*allowed: \['official', 'paper'\]"):
        Request(template="fancy")


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=500), r"width 500 is not a multiple of 32 px; nearest valid widths: 480 or 512"),
    (dict(height=770), r"height 770 is not a multiple of 32 px; nearest valid heights: 768 or 800"),
    (dict(width=0), r"width must be a positive integer"),
    (dict(task="pair_depth", width=512, height=992), r"multiple of 64; nearest valid heights: 960 or 1024"),
])
def test_sizes_off_the_grid(kwargs, message):
    with pytest.raises(RequestError, match=message):
        Request(**kwargs)


def test_reference_required_or_forbidden():
    with pytest.raises(RequestError, match="needs a reference image"):
        Request(task="control_depth", width=512, height=1024)
    with pytest.raises(RequestError, match="takes no reference image"):
        Request(task="t2i", reference=_image(64, 64))


def test_token_budget():
    Request(width=768, height=768).validate()                      # 9,316 tokens
    Request(width=800, height=800).validate(prompt_tokens=100)     # 10,104 + 100 <= 10,240
    with pytest.raises(RequestError, match=r"1024x1024 needs 16516 image tokens \+ 40 prompt tokens = 16556, more "
                                           r"than the 10240 positions this model has; the largest t2i size this "
                                           r"model allows is 800x800") as info:
        Request(width=1024, height=1024).validate(prompt_tokens=40)
    assert "max_positions" not in str(info.value)  # no node or option has that name
    with pytest.raises(RequestError, match=r"largest t2i size this model allows is 768x768"):
        Request(width=800, height=800).validate(prompt_tokens=200)
    Request(width=1024, height=1024).validate(max_positions=16600, prompt_tokens=40)  # explicit higher cap
    # Dual panel: the largest size with square panels (each on the 32 px grid).
    with pytest.raises(RequestError, match=r"largest pair_depth size this model allows is 544x1088"):
        Request(task="pair_depth", width=1024, height=1024).validate(prompt_tokens=50)
    assert largest_size("t2i", 10240) == (800, 800) and largest_size("dense_canny", 10240) == (544, 1088)
    # The demo's 256 positions: 96x96 alone, 64x64 with a long prompt, none with a huge one.
    assert largest_size("t2i", 256) == (96, 96) and largest_size("t2i", 256, prompt_tokens=100) == (64, 64)
    assert largest_size("control_canny", 256, prompt_tokens=40) == (64, 128)
    assert largest_size("t2i", 256, prompt_tokens=250) is None


def test_one_derivation_of_positions_and_cfg_rows():
    # start, H, W + rows of (cols + new line) + end
    assert image_token_count(64, 64) == 3 + 8 * 9 + 1 == body_length(8, 8) + 3
    assert sequence_positions(64, 128, prompt_tokens=30) == 30 + 3 + 16 * 9 + 1
    assert cfg_rows(4, 1.0) == 4 and cfg_rows(4, 1.5) == 8  # cfg 1 has no unconditional rows
    assert size_problem("t2i", 64, 64, max_positions=256, prompt_tokens=20) is None
    assert "multiple of 64" in size_problem("dense_canny", 64, 96)
    assert "unknown task" in size_problem("nonsense", 64, 64)


def test_picker_choices_fit_the_budget_and_the_grid():
    demo = size_choices(dual_panel=False, max_positions=256)
    assert {(c["width"], c["height"]) for c in demo} >= {(64, 64), (96, 96)}
    assert all(sequence_positions(c["width"], c["height"], PROMPT_RESERVE_TOKENS) <= 256 for c in demo)
    dual = size_choices(dual_panel=True, max_positions=10240)
    assert (512, 1024) in {(c["width"], c["height"]) for c in dual}
    assert all(c["height"] % 64 == 0 and c["width"] % 32 == 0 and c["height"] == 2 * c["panel"][1] for c in dual)
    assert [c["tokens"] for c in dual] == sorted(c["tokens"] for c in dual)
    constants = web_constants()
    assert constants["dual_panel"]["t2i"] is False and constants["dual_panel"]["edit"] is True
    assert constants["grid"] == 32 and constants["pixels_per_code"] == 8


def test_reference_pixels_follow_the_official_preprocessing():
    exact = _image(64, 32, seed=1)
    request = Request(task="dense_depth", width=64, height=64, reference=exact)
    pixels = request.reference_pixels()
    assert pixels.shape == (1, 3, 32, 64) and pixels.dtype == torch.float32
    expected = (np.asarray(exact, dtype=np.float64) / 255.0 * 2 - 1).astype(np.float32).transpose(2, 0, 1)
    assert torch.equal(pixels[0], torch.from_numpy(expected))

    big = _image(300, 200, seed=2)
    cropped = Request(task="edit", width=64, height=64, reference=big).reference_pixels()
    assert torch.equal(cropped[0], Request(task="edit", width=64, height=64,
                                           reference=center_crop(big, (64, 32))).reference_pixels()[0])


def test_transparent_reference_is_whitened():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 0      # left half fully transparent -> white
    rgba[:, 16:, 3] = 255    # right half opaque red-ish
    request = Request(task="control_canny", width=32, height=64, reference=Image.fromarray(rgba, "RGBA"))
    pixels = request.reference_pixels()[0]
    assert torch.all(pixels[:, :, :16] == 1.0)
    assert torch.allclose(pixels[:, 0, 20], torch.tensor([200 / 255 * 2 - 1, -1.0, -1.0]))
