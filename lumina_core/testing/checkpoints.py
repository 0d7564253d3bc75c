"""Tiny checkpoints in the official formats (config.json + safetensors + tokenizer + MoVQGAN .ckpt).

Tests, benchmarks and the ComfyUI smoke runs need a model that loads through exactly the code path
of the released weights, without 17 GB of downloads: this writes one with random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import build_transformer
from ..weights import save_transformer

TINY_MOVQGAN_FILE = "movqgan.ckpt"


def write_tiny_checkpoint(folder: str | Path, *, words: str | list[str] = (), num_image_codes: int = 64,
                          hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                          intermediate_size: int = 64, max_grids: int = 16, movq_ch: int = 32,
                          seed: int = 0, dtype: torch.dtype = torch.float32, init_std: float = 0.5) -> Path:
    """Write a random tiny Lumina-mGPT-format model folder (transformer, tokenizer, MoVQGAN) and return it.

    `init_std` is larger than training's 0.02 so that random logits are far from uniform and
    sampling tests see a peaked, position-dependent distribution.
    """
    from ..movqgan import MoVQConfig, MoVQGAN, save_movqgan
    from .tokenizer import build_tokenizer

    folder = Path(folder)
    tokenizer = build_tokenizer(folder, words=words, num_image_codes=num_image_codes, max_grids=max_grids)
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         initializer_range=init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_transformer(config)
        for name, p in model.named_parameters():
            if name.endswith("norm.bias"):  # qk-norm biases: small, so every head is not the same
                torch.nn.init.normal_(p, std=0.1)
        movq = MoVQGAN(MoVQConfig(ch=movq_ch, ch_mult=(1, 2, 2, 4), num_res_blocks=1, n_embed=num_image_codes))
    save_transformer(model, folder, dtype=dtype)
    save_movqgan(movq, folder / TINY_MOVQGAN_FILE)
    return folder
