"""Text tokenizer, special-token layout and the image-token grammar of Lumina-mGPT 2.0.

Every special id is looked up by its token STRING in the checkpoint's tokenizer, or in config.json's
`vocabulary_map` (reference section b); no id such as 151665 is written as a literal anywhere in the
package. `load_tokens` loads a folder's tokenizer and refuses one that does not belong to the model.

Image grammar (reference section c): ``<racm3:break> <H> <W> row_0 <nl> row_1 <nl> ... <eoss>``
where H and W are size tokens ``<reserved{8800+n:05d}>`` counting 32-px grids (height first),
every row holds ``4 * W_grids`` image tokens (code + offset) and every row, the last included,
ends with the new-line token ``<reserved08799>``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import CONFIG_FILE, ModelConfig, read_config_json, vocabulary_map_of
from .errors import InputError, MissingFileError


# Token strings of the official release (reference section b).
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
NEW_LINE = "<reserved08799>"
SEPARATOR = "<reserved08706>"
# Declared by the official item processor between <eoss> and the new line; unused at inference,
# but kept in the tiny tokenizer so the relative order of ids matches the release.
UNUSED_SEPARATORS = ("<reserved08796>", "<reserved08797>", "<reserved08798>")
IMAGE_TOKEN_PREFIX = "<MOVQGAN"
SIZE_TOKEN_BASE = 8800
# The size-token string keeps 4 digits before '>', so n = 1..1199 are the representable grids.
MAX_SIZE_GRIDS = 1199
GRID_PIXELS = 32          # one size-token unit
PIXELS_PER_CODE = 8       # MoVQGAN downsamples by 8
LATENT_PER_GRID = GRID_PIXELS // PIXELS_PER_CODE  # latent rows/cols per size-token grid (4)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The embedding may have a few rows no token uses (the release: 171385 rows, one spare for the
# run-time `<|image|>` placeholder; others pad to a multiple of 64 or 128). A tokenizer that
# leaves more rows unused than this is another model's tokenizer.
MAX_UNUSED_EMBEDDING_ROWS = 256

_SIZE_TOKEN_RE = re.compile(r"^<reserved(\d{5})>$")


def size_token_string(n_grids: int) -> str:
    """Return the size-token string for ``n_grids`` 32-px grid units."""
    if not 1 <= n_grids <= MAX_SIZE_GRIDS:
        raise ValueError(f"grid count {n_grids} is outside the representable range 1..{MAX_SIZE_GRIDS}")
    return f"<reserved{SIZE_TOKEN_BASE + n_grids:05d}>"


def image_code_token_string(code: int) -> str:
    """Return the token string our tiny tokenizers use for MoVQGAN code ``code``."""
    return f"{IMAGE_TOKEN_PREFIX}_{code:05d}>"


def load_text_tokenizer(folder: str | os.PathLike) -> Any:
    """Load the checkpoint's text tokenizer with transformers (AutoTokenizer, fast); bad files are an InputError naming them."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MissingFileError(
            f"no tokenizer in {folder}: expected tokenizer.json and tokenizer_config.json "
            "(they ship with Alpha-VLLM/Lumina-mGPT-2.0)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises anything from KeyError to TypeError on bad files
        raise InputError(_tokenizer_problem(folder, error)) from error


def _tokenizer_problem(folder: Path, error: Exception) -> str:
    """One line saying which tokenizer file is broken and how (read only after the load failed)."""
    expected = "expected the tokenizer.json and tokenizer_config.json shipped with the checkpoint"
    for name in TOKENIZER_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            return f"{path} is not UTF-8 text (byte {e.start} cannot be decoded); {expected}"
        except json.JSONDecodeError as e:
            return f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {expected}"
        except OSError as e:
            return f"cannot read {path}: {e.strerror or e}"
        if not isinstance(data, dict):
            return f"{path} must hold a JSON object, found a JSON {type(data).__name__}; {expected}"
        if name == "tokenizer.json" and not isinstance(data.get("model"), dict):
            return f"{path} is JSON but not a tokenizers file (no 'model' object); {expected}"
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"cannot load the tokenizer in {folder} ({type(error).__name__}: {first_line}); {expected}"


def _token_id(vocab: Mapping[str, int], token: str, what: str) -> int:
    if token not in vocab:
        raise InputError(f"the tokenizer has no {what} token {token!r}; is this a Lumina-mGPT 2.0 tokenizer?")
    return int(vocab[token])


def _image_code_ids(source: Mapping[str, int]) -> list[int]:
    return sorted(int(i) for s, i in source.items() if s.startswith(IMAGE_TOKEN_PREFIX))


def _image_code_range(vocab: Mapping[str, int], vocabulary_map: Mapping[str, int] | None) -> tuple[int, int]:
    """Find (offset, count) of the image-code tokens: tokenizer first, then config.json's map.

    The release's config.json always embeds `vocabulary_map` with these names (the official SJD
    sampler draws its drafts from them), so there is no fallback to documented ids.
    """
    for source_name, source in (("tokenizer", vocab), ("config.json vocabulary_map", vocabulary_map or {})):
        ids = _image_code_ids(source)
        if not ids:
            continue
        offset, count = ids[0], len(ids)
        if ids[-1] - offset + 1 != count:
            raise InputError(
                f"image-code tokens in the {source_name} are not contiguous: {count} tokens "
                f"named {IMAGE_TOKEN_PREFIX}... span ids {offset}..{ids[-1]}"
            )
        return offset, count
    raise InputError(
        f"cannot locate the image-code tokens: no token named {IMAGE_TOKEN_PREFIX}... in the tokenizer "
        "or in config.json's vocabulary_map (the release's config.json carries it)"
    )


@dataclass(frozen=True)
class TokenLayout:
    """Every special id the sampler and the grammar need, resolved from token strings."""

    bos: int
    separator: int
    image_start: int
    image_end: int
    new_line: int
    image_code_offset: int
    num_image_codes: int
    size_token_ids: Mapping[int, int] = field(repr=False, hash=False)  # n_grids -> id

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocabulary_map: Mapping[str, int] | None = None) -> "TokenLayout":
        """Resolve the layout from a transformers tokenizer (and optionally config.json's vocabulary_map)."""
        vocab = tokenizer.get_vocab()
        # BOS rule of the official tokenizer wrapper: bos_token_id, else eos_token_id (Qwen2.5 has no BOS).
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise InputError("the tokenizer defines neither a BOS nor an EOS token; cannot build the prompt prefix")
        image_start = _token_id(vocab, IMAGE_START, "image-start")
        offset, count = _image_code_range(vocab, vocabulary_map)
        size_ids = {}
        for n in range(1, MAX_SIZE_GRIDS + 1):
            token_id = vocab.get(size_token_string(n))
            if token_id is not None:
                size_ids[n] = int(token_id)
        if not size_ids:
            raise InputError(f"the tokenizer has no size tokens ({size_token_string(1)} ...)")
        return cls(
            bos=int(bos),
            separator=_token_id(vocab, SEPARATOR, "separator"),
            image_start=image_start,
            image_end=_token_id(vocab, IMAGE_END, "image-end"),
            new_line=_token_id(vocab, NEW_LINE, "new-line"),
            image_code_offset=offset,
            num_image_codes=count,
            size_token_ids=dict(size_ids),
        )

    @property
    def max_grids(self) -> int:
        """Largest grid count that has a size token."""
        return max(self.size_token_ids)

    def size_token(self, n_grids: int) -> int:
        """Id of the size token for ``n_grids`` 32-px grid units."""
        try:
            return self.size_token_ids[n_grids]
        except KeyError:
            raise ValueError(
                f"no size token for {n_grids} grids ({n_grids * GRID_PIXELS} px); this tokenizer has "
                f"size tokens for {min(self.size_token_ids)}..{self.max_grids} grids"
            ) from None

    def grid_count(self, size_token_id: int) -> int:
        """Grid count encoded by a size-token id (raises for any other id)."""
        for n, token_id in self.size_token_ids.items():
            if token_id == size_token_id:
                return n
        raise ValueError(f"id {size_token_id} is not a size token")

    def is_image_code(self, token_id: int) -> bool:
        """True when ``token_id`` encodes a MoVQGAN code."""
        return self.image_code_offset <= token_id < self.image_code_offset + self.num_image_codes


def check_model_match(layout: TokenLayout, tokenizer_size: int, vocab_size: int,
                      vocabulary_map: Mapping[str, int] | None = None, movqgan_codes: int | None = None, *,
                      tokenizer_source: str = "the tokenizer", config_source: str = CONFIG_FILE,
                      movqgan_source: str = "the MoVQGAN") -> None:
    """Refuse a tokenizer, config.json and MoVQGAN that do not belong to one model, naming what disagrees."""
    problems = []
    if tokenizer_size > vocab_size:
        problems.append(f"{tokenizer_source} has {tokenizer_size} tokens but {config_source} says vocab_size "
                        f"{vocab_size}: ids past {vocab_size - 1} have no embedding row")
    elif vocab_size - tokenizer_size > MAX_UNUSED_EMBEDDING_ROWS:
        problems.append(f"{tokenizer_source} has {tokenizer_size} tokens but {config_source} says vocab_size "
                        f"{vocab_size}: {vocab_size - tokenizer_size} embedding rows would never be used "
                        f"(at most {MAX_UNUSED_EMBEDDING_ROWS} spare rows are expected)")
    code_end = layout.image_code_offset + layout.num_image_codes
    if code_end > vocab_size:
        problems.append(f"the image codes take ids {layout.image_code_offset}..{code_end - 1}, past the "
                        f"{vocab_size} rows of the embedding ({config_source} vocab_size)")
    if vocabulary_map:
        top = max(vocabulary_map.values())
        if top >= vocab_size:
            problems.append(f"{config_source}'s vocabulary_map has id {top}, past vocab_size {vocab_size}")
        named = {IMAGE_START: layout.image_start, IMAGE_END: layout.image_end, NEW_LINE: layout.new_line,
                 SEPARATOR: layout.separator,
                 **{size_token_string(n): i for n, i in layout.size_token_ids.items()}}
        for token, token_id in named.items():
            if token in vocabulary_map and vocabulary_map[token] != token_id:
                problems.append(f"{token} is id {token_id} in {tokenizer_source} but {vocabulary_map[token]} in "
                                f"{config_source}'s vocabulary_map")
                break  # one disagreeing special token says it all; the rest would repeat it
        map_codes = _image_code_ids(vocabulary_map)
        if map_codes and (map_codes[0], len(map_codes)) != (layout.image_code_offset, layout.num_image_codes):
            problems.append(f"{tokenizer_source} has {layout.num_image_codes} image codes from id "
                            f"{layout.image_code_offset}, {config_source}'s vocabulary_map {len(map_codes)} "
                            f"from id {map_codes[0]}")
    if movqgan_codes is not None and movqgan_codes != layout.num_image_codes:
        problems.append(f"{movqgan_source} has {movqgan_codes} codes but {tokenizer_source} has "
                        f"{layout.num_image_codes} image tokens ({IMAGE_TOKEN_PREFIX}...)")
    if problems:
        raise InputError("the tokenizer, config.json and MoVQGAN do not belong to one model: " + "; ".join(problems))


def load_tokens(folder: str | os.PathLike, movqgan_codes: int | None = None,
                movqgan_source: str = "the MoVQGAN") -> tuple[Any, TokenLayout]:
    """A checkpoint folder's tokenizer and TokenLayout, checked against its config.json (and the MoVQGAN's code count)."""
    folder = Path(folder)
    data = read_config_json(folder)
    config = ModelConfig.from_dict(data, folder / CONFIG_FILE)
    vocabulary_map = vocabulary_map_of(data, folder / CONFIG_FILE)
    tokenizer = load_text_tokenizer(folder)
    try:
        layout = TokenLayout.from_tokenizer(tokenizer, vocabulary_map)
    except InputError as error:
        raise InputError(f"{folder}: {error}") from None
    check_model_match(layout, len(tokenizer), config.vocab_size, vocabulary_map, movqgan_codes,
                      tokenizer_source=f"the tokenizer in {folder}", config_source=str(folder / CONFIG_FILE),
                      movqgan_source=movqgan_source)
    return tokenizer, layout


def prompt_ids(tokenizer: Any, layout: TokenLayout, text: str) -> list[int]:
    """Official prompt encoding: BOS + text (no special tokens, no chat template) + separator."""
    return [layout.bos, *tokenizer.encode(text, add_special_tokens=False), layout.separator]


def _grid_of(latent: int, what: str) -> int:
    if latent <= 0 or latent % LATENT_PER_GRID:
        raise ValueError(f"{what} of {latent} latent codes is not a positive multiple of {LATENT_PER_GRID} "
                         f"(one {GRID_PIXELS}-px grid)")
    return latent // LATENT_PER_GRID


def _row_ids(layout: TokenLayout, codes: torch.Tensor) -> list[int]:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= layout.num_image_codes):
        raise ValueError(f"codes must lie in 0..{layout.num_image_codes - 1}, "
                         f"got {int(codes.min())}..{int(codes.max())}")
    ids: list[int] = []
    for row in (codes.to(torch.long) + layout.image_code_offset).tolist():
        ids.extend(row)
        ids.append(layout.new_line)
    return ids


def image_ids(layout: TokenLayout, codes: torch.Tensor, close: bool = True) -> list[int]:
    """Id sequence of a code grid [h, w]: start, H, W, rows each + new line, end (if ``close``)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D grid [rows, cols], got shape {tuple(codes.shape)}")
    h_grids = _grid_of(codes.shape[0], "height")
    w_grids = _grid_of(codes.shape[1], "width")
    ids = [layout.image_start, layout.size_token(h_grids), layout.size_token(w_grids), *_row_ids(layout, codes)]
    if close:
        ids.append(layout.image_end)
    return ids


def dual_panel_prefix_ids(layout: TokenLayout, upper_codes: torch.Tensor) -> list[int]:
    """I2I prefix: start, size tokens of the FULL dual image (2x height), the reference rows, no end."""
    if upper_codes.dim() != 2:
        raise ValueError(f"upper_codes must be a 2-D grid [rows, cols], got shape {tuple(upper_codes.shape)}")
    h_grids = _grid_of(upper_codes.shape[0], "reference height")
    w_grids = _grid_of(upper_codes.shape[1], "width")
    return [layout.image_start, layout.size_token(2 * h_grids), layout.size_token(w_grids),
            *_row_ids(layout, upper_codes)]
