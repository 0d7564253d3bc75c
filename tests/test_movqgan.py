"""MoVQGAN against the official numerics (tiny random model in the real 431-key layout)."""

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from lumina_core.movqgan import MoVQConfig, MoVQGAN, config_from_state_dict, load_movqgan, save_movqgan

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CKPT = FIXTURES / "oracle_movq_tiny" / "movqgan_tiny.ckpt"
CASES = torch.load(FIXTURES / "oracle_movq_tiny" / "cases.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny() -> MoVQGAN:
    return load_movqgan(TINY_CKPT)


def to_uint8_hwc(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def test_inferred_config_matches_oracle(tiny):
    dd = CASES["ddconfig"]
    cfg = tiny.config
    assert (cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels) == (
        dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"])
    assert list(cfg.attn_resolutions) == dd["attn_resolutions"]
    assert (cfg.n_embed, cfg.embed_dim) == (CASES["n_embed"], CASES["embed_dim"])
    assert sum(p.numel() for p in tiny.parameters()) == 1_272_239
    assert not tiny.training and tiny.codebook.dtype == torch.float32


@pytest.mark.parametrize("case", ["decode_4x4", "decode_4x6", "decode_6x4"])
def test_decode_matches_official(tiny, case):
    c = CASES[case]
    out = tiny.decode(c["codes"].view(1, c["h"], c["w"]))
    assert out.shape == c["decoded"].shape and out.dtype == torch.float32
    assert (out - c["decoded"]).abs().max().item() < 1e-4
    assert torch.equal(to_uint8_hwc(out), c["image_uint8_hwc"])


def test_encode_matches_official(tiny):
    c = CASES["encode_32x48"]
    latent = tiny.encode_latent(c["input_float"])
    assert (latent - c["latent_after_quant_conv"]).abs().max().item() < 1e-4
    codes = tiny.encode(c["input_float"])
    assert codes.dtype == torch.long and codes.shape == (1, *c["codes_grid_hw"])
    assert torch.equal(codes.flatten(), c["codes"])
    assert (tiny.decode(codes) - c["redecoded"]).abs().max().item() < 1e-4
    # chunking of the distance computation must not change the argmin
    assert torch.equal(tiny.quantize_latent(latent, chunk_rows=5)[1], codes)


def test_batched_decode_equals_per_image(tiny):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, tiny.config.n_embed, (3, 4, 5), generator=g)
    batched = tiny.decode(codes)
    singles = torch.cat([tiny.decode(codes[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, 3, 32, 40)
    assert (batched - singles).abs().max().item() < 1e-4  # conv kernels may sum in another order


def test_load_save_load_round_trip(tiny, tmp_path):
    path = tmp_path / "sub" / "copy.ckpt"
    save_movqgan(tiny, path)
    assert [p.name for p in path.parent.iterdir()] == ["copy.ckpt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    original = torch.load(TINY_CKPT, weights_only=True)
    assert type(raw) is OrderedDict and list(raw) == list(original)
    assert all(torch.equal(raw[k], original[k]) and raw[k].dtype == original[k].dtype for k in raw)
    again = load_movqgan(path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tiny.state_dict().values()))


def test_accepts_state_dict_wrapper(tmp_path):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": torch.load(TINY_CKPT, weights_only=True)}, path)
    assert load_movqgan(path).config.ch == 32


def test_270m_config_on_meta_has_official_names_and_shapes():
    expected = []
    for line in (FIXTURES / "movq_270m_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            expected.append((name, tuple(int(s) for s in shape.strip("[]").split(", "))))
    with torch.device("meta"):
        model = MoVQGAN(MoVQConfig.preset("270m"))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same names, shapes and order as the official state dict
    assert len(got) == 431
    assert sum(p.numel() for p in model.parameters()) == 270_669_103
    state = {k: torch.empty(s, device="meta") for k, s in expected}
    assert config_from_state_dict(state) == MoVQConfig()


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "movqgan_270M.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_movqgan(path)


class NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"encoder.conv_in.weight": NotATensor()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a plain tensor state dict") as err:
        load_movqgan(path)
    assert "never unpickle" in str(err.value)
    torch.save({"weights": NotATensor()}, path)  # same through torch's own zip format
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_movqgan(path)


def test_wrong_layout_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "transformer.ckpt"
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(ValueError) as err:
        load_movqgan(path)
    msg = str(err.value)
    assert "missing keys" in msg and "encoder.conv_in.weight" in msg
    assert "unexpected keys" in msg and "lm_head.weight" in msg
    assert "431" in msg and "quantize.embedding.weight" in msg

    state = torch.load(TINY_CKPT, weights_only=True)
    del state["decoder.norm_out.conv_b.bias"]
    state["discriminator.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_movqgan(path)
    msg = str(err.value)
    assert "missing keys: decoder.norm_out.conv_b.bias" in msg and "unexpected keys: discriminator.weight" in msg


def test_codes_out_of_range_or_malformed(tiny):
    with pytest.raises(ValueError, match=r"\[0, 16383\].*\[0, 16384\]"):
        tiny.decode(torch.tensor([[[0, 16384]]]))
    with pytest.raises(ValueError, match=r"\[-1, 5\]"):
        tiny.decode(torch.tensor([[[-1, 5]]]))
    with pytest.raises(ValueError, match="unsqueeze"):
        tiny.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode(torch.zeros(1, 2, 2))


def test_image_size_must_be_multiple_of_8(tiny):
    with pytest.raises(ValueError, match="multiples of 8.*30x48"):
        tiny.encode(torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode(torch.zeros(3, 32, 32))


def test_training_step_losses_finite_and_decreasing():
    torch.manual_seed(0)
    cfg = MoVQConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(128,), n_embed=64)
    model = MoVQGAN(cfg).train()  # two levels, attention at the lower one: every block type is exercised
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        recon, codebook_loss, commitment_loss, codes = model(images)
        assert recon.shape == images.shape and codes.shape == (2, 4, 4)
        loss = (recon - images).abs().mean() + codebook_loss + commitment_loss
        assert all(torch.isfinite(t) for t in (loss, codebook_loss, commitment_loss))
        opt.zero_grad()
        loss.backward()
        assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
        assert model.codebook.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------ bad files (issue 15 item 9) ------------

from lumina_core.errors import InputError  # noqa: E402


@pytest.mark.parametrize("make, says", [
    (lambda raw: raw[: len(raw) // 2], "is truncated or corrupted"),  # RuntimeError of miniz before
    (lambda raw: raw[:-100], "is truncated or corrupted"),
    (lambda raw: b"e" * 4096, "is not a PyTorch checkpoint"),  # KeyError 101 / IndexError before
    (lambda raw: b"<html><body>404 Not Found</body></html>", "is not a PyTorch checkpoint"),
    (lambda raw: b"", "is empty (0 bytes"),  # a bare EOFError before
], ids=["truncated_half", "truncated_tail", "garbage", "html_page", "empty"])
def test_item9_broken_movqgan_ckpt_is_one_line_naming_it(tmp_path, make, says):
    path = tmp_path / "movqgan_270M.ckpt"
    path.write_bytes(make(TINY_CKPT.read_bytes()))
    with pytest.raises(InputError) as err:
        load_movqgan(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and says in message
    assert "expected a MoVQGAN 270M checkpoint" in message


def test_item9_refused_pickle_message_is_one_line(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"weights": NotATensor()}, path)
    with pytest.raises(InputError) as err:
        load_movqgan(path)
    message = str(err.value)
    assert "\n" not in message and "NotATensor" in message and "never unpickle" in message


def test_item9_movqgan_folder_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="MoVQGAN checkpoint not found") as err:
        load_movqgan(tmp_path)
    assert isinstance(err.value, FileNotFoundError)
