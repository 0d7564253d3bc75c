"""LuminaPipeline on tiny official-format checkpoints: every task shape, quantized models, bad input."""
import pytest
import torch
from PIL import Image

from lumina_core.pipeline import GeneratedCodes, LuminaPipeline
from lumina_core.request import Request, RequestError
from lumina_core.sampling import GenerationCancelled, SamplingConfig
from lumina_core.testing.checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), words="a red cat on a mat", hidden_size=128,
                                 intermediate_size=256, num_heads=4, num_image_codes=64, movq_ch=32)


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    return LuminaPipeline.from_pretrained(tiny_folder, device="cpu")


def test_t2i_generates_requested_size_and_decodes(pipe):
    calls = []
    req = Request(task="t2i", prompt="a red cat", width=64, height=32)
    out = pipe.generate(req, SamplingConfig(cfg=3.0, top_k=16, seed=5, num_images=2),
                        progress=lambda d, t, c: calls.append((d, t, tuple(c.shape))))
    assert isinstance(out, GeneratedCodes) and out.seeds == [5, 6]
    assert out.codes.shape == (2, 4, 8) and out.codes.dtype == torch.long
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < pipe.layout.num_image_codes
    assert [c[2][1] for c in calls][:4] == [1, 2, 3, 4] and calls[-1][0] == calls[-1][1]
    assert out.stats["forward_passes"] == 4 * 9 + 1  # prefill + one per body token except the end: 4 rows of 8+1, end
    images = pipe.decode(out)
    assert images.shape == (2, 3, 32, 64) and images.abs().max() <= 1


def test_same_seed_same_codes_and_sjd_runs(pipe):
    req = Request(task="t2i", prompt="a cat", width=32, height=32)
    a = pipe.generate(req, SamplingConfig(seed=3, num_images=2)).codes
    b = pipe.generate(req, SamplingConfig(seed=4)).codes
    assert torch.equal(a[1], b[0])
    s = pipe.generate(req, SamplingConfig(seed=3, sjd=True, sjd_window=6, num_images=2))
    assert s.codes.shape == (2, 4, 4) and s.stats["steps"] <= 4 * 5
    c = pipe.generate(req, SamplingConfig(seed=3, sjd=True, sjd_coupled=True, num_images=1))
    assert c.stats["decoder"] == "sjd_coupled"


@pytest.mark.parametrize("sjd", [False, True])
def test_image_to_image_keeps_the_reference_panel(pipe, sjd):
    ref = Image.new("RGB", (32, 32), (200, 30, 30))
    req = Request(task="edit", prompt="make it blue", width=32, height=64, reference=ref)
    out = pipe.generate(req, SamplingConfig(seed=1, sjd=sjd, sjd_window=4))
    expected = pipe.movqgan.encode(req.reference_pixels())[0]
    assert out.codes.shape == (1, 8, 4)
    assert torch.equal(out.codes[0, :4], expected)


def test_cancel_raises_and_releases(pipe):
    req = Request(task="t2i", prompt="a cat", width=32, height=32)
    with pytest.raises(GenerationCancelled):
        pipe.generate(req, SamplingConfig(), should_cancel=lambda: True)
    with pytest.raises(GenerationCancelled):
        pipe.generate(req, SamplingConfig(sjd=True), should_cancel=lambda: True)


def test_bad_input_has_clear_errors(pipe):
    with pytest.raises(RequestError, match="multiple of 32"):
        Request(task="t2i", width=70, height=32)
    with pytest.raises(RequestError, match="takes no reference"):
        Request(task="t2i", width=32, height=32, reference=Image.new("RGB", (32, 32)))
    with pytest.raises(RequestError, match="needs a reference"):
        Request(task="edit", width=32, height=64)
    with pytest.raises(RequestError, match="size tokens"):
        pipe.generate(Request(task="t2i", prompt="a cat", width=32 * 20, height=32 * 20), SamplingConfig())
    saved = pipe.max_positions
    pipe.max_positions = 200
    try:
        with pytest.raises(RequestError, match="more than the 200 positions this model has; the largest t2i size"):
            pipe.generate(Request(task="t2i", prompt="a cat", width=128, height=128), SamplingConfig())
    finally:
        pipe.max_positions = saved
    with pytest.raises(ValueError, match="cfg"):
        SamplingConfig(cfg=0.5)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_pipelines_generate_valid_images(tiny_folder, quant):
    qpipe = LuminaPipeline.from_pretrained(tiny_folder, device="cpu", quant=quant)
    assert type(qpipe.transformer.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"
    assert type(qpipe.transformer.lm_head.weight).__name__ == "Parameter"  # kept in high precision
    for sjd in (False, True):
        out = qpipe.generate(Request(task="t2i", prompt="a cat", width=32, height=32),
                             SamplingConfig(seed=2, sjd=sjd, sjd_window=4))
        assert out.codes.shape == (1, 4, 4) and int(out.codes.max()) < qpipe.layout.num_image_codes
        assert qpipe.decode(out).shape == (1, 3, 32, 32)


def test_unsupported_quant_is_named(tiny_folder):
    with pytest.raises(ValueError, match="supported: None"):
        LuminaPipeline.from_pretrained(tiny_folder, device="cpu", quant="fp3")
    with pytest.raises(ValueError, match="bfloat16"):
        LuminaPipeline.from_pretrained(tiny_folder, device="cuda", dtype=torch.float32, quant="int4")
