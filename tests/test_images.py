"""Official crops and pixel conversions against the oracle (tests/fixtures/misc_cases.pt)."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lumina_core.images import (
    center_crop, generate_crop_size_list, pil_to_tensor, tensor_to_pil, tensor_to_uint8, var_center_crop,
)

MISC = torch.load(Path(__file__).parent / "fixtures" / "misc_cases.pt", weights_only=True)
# The oracle records how its inputs were made; rebuild them the same way (sha256 checked below).
_RECIPES = {
    "700x500_to_160x96": (11, (500, 700, 3)),
    "300x200_to_256x128": (12, (200, 300, 3)),
    "131x97_to_64x64": (13, (97, 131, 3)),
}


@pytest.mark.parametrize("target", sorted(MISC["crop_size_list"]))
def test_crop_size_list_matches_official(target):
    expected = [tuple(size) for size in MISC["crop_size_list"][target]]
    assert generate_crop_size_list((target // 32) ** 2, 32) == expected


@pytest.mark.parametrize("case", sorted(MISC["center_crop"]))
def test_center_crop_matches_official(case):
    entry = MISC["center_crop"][case]
    seed, shape = _RECIPES[case]
    array = np.random.RandomState(seed).randint(0, 256, size=shape).astype(np.uint8)
    assert hashlib.sha256(array.tobytes()).hexdigest() == entry["input_sha256"]
    out = center_crop(Image.fromarray(array), entry["crop_size_wh"])
    assert out.size == tuple(entry["crop_size_wh"])
    assert torch.equal(torch.from_numpy(np.array(out)), entry["output_uint8_hwc"])


def test_var_center_crop_picks_the_size_keeping_most():
    sizes = generate_crop_size_list(16, 32)  # up to 512x512 worth of 32-px patches
    wide = Image.new("RGB", (400, 100))
    assert var_center_crop(wide, sizes).size == (256, 64)   # aspect 4 kept exactly
    square = Image.new("RGB", (90, 90))
    assert var_center_crop(square, sizes).size == (128, 128)


def test_pixel_round_trip_and_rounding():
    array = np.random.RandomState(5).randint(0, 256, size=(8, 16, 3)).astype(np.uint8)
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 8, 16) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), array)
    # ((x+1)*127.5).round().clamp: -1 -> 0, 1 -> 255, out of range clamps, 0 -> 127.5 rounds half to even = 128.
    values = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 5, 1).expand(3, 5, 1)
    assert tensor_to_uint8(values)[:, 0, 0].tolist() == [0, 0, 128, 255, 255]
    assert tensor_to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
