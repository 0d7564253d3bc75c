"""Tiny random verifier checkpoints in the real formats, for tests and benchmarks (no downloads).

Each builder saves a folder that the production loaders read exactly as they read the real
checkpoints: a CLIPModel folder (PickScore / CLIPScore / aesthetic tower), a LAION-format aesthetic
head (.pth state dict with layers.N.* keys), and a Qwen2.5-VL or Qwen2-VL folder with tokenizer,
chat template and image processor.
"""
from __future__ import annotations

import json
import os
import string

import torch

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
# A Qwen-style chat template reduced to what VQAScore sends: text and image items.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab_list = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as handle:
        json.dump({token: i for i, token in enumerate(vocab_list)}, handle)
    with open(merges_path, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=vocab_path, merges_file=merges_path)
    return tokenizer, len(vocab_list)


def make_tiny_clip(folder: str, seed: int = 0, projection_dim: int = 16) -> str:
    """Save a random tiny CLIPModel with its tokenizer and PIL image processor into folder."""
    from transformers import CLIPConfig, CLIPModel

    try:  # transformers >= 5.10 names the PIL backend's class apart; before, the plain class is the PIL one
        from transformers.models.clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    os.makedirs(folder, exist_ok=True)
    tokenizer, vocab_size = _clip_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    bos, eos = tokenizer.convert_tokens_to_ids("<|startoftext|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def make_tiny_aesthetic_head(path: str, input_size: int = 16, seed: int = 0) -> str:
    """Save a random LAION-format aesthetic head (torch.save of a state dict with layers.N.* keys)."""
    from ..verify.clip import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(input_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


def _qwen_tokenizer(words: list[str]):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(QWEN_SPECIAL_TOKENS + words + ["[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\w+|[^\w\s]|\s+"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return tokenizer, vocab


def make_tiny_qwen_vl(folder: str, family: str = "qwen2.5-vl", seed: int = 0) -> str:
    """Save a random tiny Qwen2.5-VL (or Qwen2-VL) with tokenizer, chat template and image processor."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    try:  # as in make_tiny_clip: the PIL class under its >= 5.10 name, else the plain (PIL) class
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    words = ["Yes", "yes", "No", "no", "Does", "this", "figure", "show", "Please", "answer", "or", "a", "red",
             "blue", "cube", "system", "user", "assistant", "You", "are", "helpful", "\n", " ", "\"", "?", "."]
    tokenizer, vocab = _qwen_tokenizer(words)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
    # 28-px units: images become 2x2 to 4x4 merged vision tokens.
    ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(folder)
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                pad_token_id=vocab["<|endoftext|>"],
                rope_theta=1e4, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    # The text settings go in flat, with the legacy rope keys, as the published config.json files have
    # them: every transformers version reads that form (4.50 knows no text_config).
    torch.manual_seed(seed)
    if family == "qwen2.5-vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, **text, **ids))
    elif family == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, **text, **ids))
    else:
        raise ValueError(f"family must be 'qwen2.5-vl' or 'qwen2-vl', got {family!r}")
    model.save_pretrained(folder)
    return folder
