"""Tiny official-format checkpoints load back through the real loaders."""
import json

import torch

from lumina_core import load_movqgan, load_transformer
from lumina_core.testing.checkpoints import TINY_MOVQGAN_FILE, write_tiny_checkpoint
from lumina_core.tokens import TokenLayout, load_text_tokenizer


def test_tiny_checkpoint_round_trip(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "tiny", words="a red circle", num_image_codes=32, seed=3)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", TINY_MOVQGAN_FILE} <= {
        p.name for p in folder.iterdir()}
    model = load_transformer(folder, dtype=torch.float32)
    tokenizer = load_text_tokenizer(folder)
    layout = TokenLayout.from_tokenizer(tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert layout.num_image_codes == 32 and layout.image_code_offset + 32 <= model.config.vocab_size
    assert json.loads((folder / "config.json").read_text())["model_type"] == "chameleon"
    vq = load_movqgan(folder / TINY_MOVQGAN_FILE)
    codes = torch.randint(0, 32, (2, 4, 4))
    images = vq.decode(codes)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # same seed, same weights
    again = load_transformer(write_tiny_checkpoint(tmp_path / "again", words="a red circle", num_image_codes=32, seed=3),
                             dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
