"""Tiny real tokenizers (tests, the tiny-checkpoint helper, the embedded demo model's build)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from ..fileio import atomic_write_text
from ..tokens import (IMAGE_END, IMAGE_START, NEW_LINE, SEPARATOR, UNUSED_SEPARATORS, image_code_token_string,
                      load_text_tokenizer, size_token_string)


_BASE_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,:;!?'\"()-<>_/×")
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]", re.IGNORECASE)


def _template_words() -> list[str]:
    from ..tasks import TASKS  # local import: tasks does not depend on tokens

    words: list[str] = []
    for spec in TASKS.values():
        for template in spec.templates.values():
            words.extend(_WORD_RE.findall(template))
    return words


def build_tokenizer(folder: str | os.PathLike, words: Iterable[str] | str = (), num_image_codes: int = 16384,
                    max_grids: int = 64) -> Any:
    """Write a tiny real tokenizer (tokenizer.json + tokenizer_config.json) and return it loaded.

    A word-level model over ``words`` (a list of words or a plain-text corpus), every word of the
    task templates, single letters, digits and punctuation; unknown words map to ``<unk>``.
    Specials follow the official relative order: text, ``<|endoftext|>``, image start, image end,
    three unused separators, new line, separator, size tokens 1..``max_grids``, then
    ``num_image_codes`` image tokens ``<MOVQGAN_xxxxx>``. BOS follows the Qwen2.5 rule (no BOS,
    EOS = ``<|endoftext|>``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if isinstance(words, str):
        words = _WORD_RE.findall(words)
    vocab: dict[str, int] = {"<unk>": 0}
    for word in [*_BASE_CHARACTERS, *_template_words(), *words]:
        for piece in _WORD_RE.findall(word.lower()):
            vocab.setdefault(piece, len(vocab))
    specials = ["<|endoftext|>", IMAGE_START, IMAGE_END, *UNUSED_SEPARATORS, NEW_LINE, SEPARATOR,
                *(size_token_string(n) for n in range(1, max_grids + 1))]
    image_tokens = [image_code_token_string(c) for c in range(num_image_codes)]
    for token in [*specials, *image_tokens]:
        vocab[token] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Words, single digits (so "768x768" tokenises) and single punctuation marks.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(pattern=_tokenizers_regex(), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", *specials]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in image_tokens])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    atomic_write_text(folder / "tokenizer.json", tok.to_str())
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    return load_text_tokenizer(folder)


def _tokenizers_regex() -> Any:
    from tokenizers import Regex

    return Regex(r"[a-z]+|[0-9]|[^\sa-z0-9]")
