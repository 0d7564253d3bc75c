"""Token layout and image-token grammar on tiny real tokenizers built in the test."""
import json

import pytest
import torch

from lumina_core.testing.grammar import TokenGrammarError, codes_from_ids
from lumina_core.testing.tokenizer import build_tokenizer
from lumina_core.tokens import (
    IMAGE_END, IMAGE_START, NEW_LINE, SEPARATOR, UNUSED_SEPARATORS, TokenLayout, dual_panel_prefix_ids, image_ids,
    image_token_count, load_text_tokenizer, prompt_ids, size_token_string,
)

NUM_CODES = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), words="A red cat sits on the mat.", num_image_codes=NUM_CODES)


@pytest.fixture(scope="module")
def layout(tokenizer):
    return TokenLayout.from_tokenizer(tokenizer)


def test_layout_finds_every_id_by_string(tokenizer, layout):
    by_string = tokenizer.convert_tokens_to_ids
    assert layout.image_start == by_string(IMAGE_START)
    assert layout.image_end == by_string(IMAGE_END)
    assert layout.new_line == by_string(NEW_LINE)
    assert layout.separator == by_string(SEPARATOR)
    # Qwen2.5 rule: no BOS token, so BOS = EOS = <|endoftext|>.
    assert tokenizer.bos_token_id is None
    assert layout.bos == by_string("<|endoftext|>") == tokenizer.eos_token_id
    assert layout.image_code_offset == by_string("<MOVQGAN_00000>")
    assert layout.num_image_codes == NUM_CODES
    assert by_string(f"<MOVQGAN_{NUM_CODES - 1:05d}>") == layout.image_code_offset + NUM_CODES - 1
    for n in (1, 7, 24, 64):
        assert layout.size_token(n) == by_string(size_token_string(n))
        assert layout.grid_count(layout.size_token(n)) == n
    assert size_token_string(24) == "<reserved08824>"
    # Official relative order: start, end, three unused separators, new line (151665..151670 in the release).
    assert [by_string(s) for s in (IMAGE_START, IMAGE_END, *UNUSED_SEPARATORS, NEW_LINE)] == list(
        range(layout.image_start, layout.image_start + 6))
    assert layout.image_code_offset > layout.size_token(64)


def test_layout_uses_bos_token_when_present(tmp_path):
    tok = build_tokenizer(tmp_path, num_image_codes=4)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = "<racm3:break>"  # any defined token works for the rule
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reloaded = load_text_tokenizer(tmp_path)
    assert TokenLayout.from_tokenizer(reloaded).bos == reloaded.bos_token_id != tok.eos_token_id


def test_prompt_ids_are_bos_text_separator(tokenizer, layout):
    text = "Generate an image of 768x768 according to the following prompt:\na red cat."
    ids = prompt_ids(tokenizer, layout, text)
    assert ids[0] == layout.bos and ids[-1] == layout.separator
    assert ids[1:-1] == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids[1:-1]  # template words, digits and punctuation all tokenise
    assert tokenizer.convert_ids_to_tokens(ids[5:12]) == ["7", "6", "8", "x", "7", "6", "8"]
    assert tokenizer.unk_token_id in tokenizer.encode("a zebra", add_special_tokens=False)


@pytest.mark.parametrize("width,height", [(32, 32), (96, 32), (32, 96), (64, 128)], ids=["square", "wide", "tall", "dual"])
def test_grid_round_trip(layout, width, height):
    rows, cols = height // 8, width // 8
    codes = torch.randint(0, NUM_CODES, (rows, cols), generator=torch.Generator().manual_seed(width * height))
    ids = image_ids(layout, codes)
    assert len(ids) == image_token_count(width, height)
    assert ids[:3] == [layout.image_start, layout.size_token(height // 32), layout.size_token(width // 32)]
    assert ids[-1] == layout.image_end
    assert [ids[3 + r * (cols + 1) + cols] for r in range(rows)] == [layout.new_line] * rows
    assert ids[3:3 + cols] == (codes[0] + layout.image_code_offset).tolist()
    assert torch.equal(codes_from_ids(layout, ids), codes)
    assert torch.equal(codes_from_ids(layout, torch.tensor(ids)), codes)
    open_ids = image_ids(layout, codes, close=False)
    assert open_ids == ids[:-1]


def test_dual_panel_prefix_has_full_height_and_reference_rows(layout):
    upper = torch.randint(0, NUM_CODES, (4, 8), generator=torch.Generator().manual_seed(1))
    lower = torch.randint(0, NUM_CODES, (4, 8), generator=torch.Generator().manual_seed(2))
    prefix = dual_panel_prefix_ids(layout, upper)
    assert prefix[1] == layout.size_token(2) and prefix[2] == layout.size_token(2)
    assert prefix[-1] == layout.new_line and layout.image_end not in prefix
    full = image_ids(layout, torch.cat([upper, lower]))
    assert full[:len(prefix)] == prefix
    assert torch.equal(codes_from_ids(layout, full), torch.cat([upper, lower]))


def test_official_token_counts():
    assert image_token_count(768, 768) == 9316
    assert image_token_count(512, 1024) == 8324
    assert image_token_count(1024, 1024) == 16516


def test_partial_sequence_returns_complete_rows(layout):
    codes = torch.randint(0, NUM_CODES, (8, 4), generator=torch.Generator().manual_seed(3))
    ids = image_ids(layout, codes)
    partial = ids[:3 + 2 * 5 + 2]  # two complete rows, two codes of the third
    assert torch.equal(codes_from_ids(layout, partial, require_end=False), codes[:2])
    with pytest.raises(TokenGrammarError, match=r"inside row 2 .*missing image end"):
        codes_from_ids(layout, partial)


def _ids(layout):
    codes = torch.arange(4 * 4).reshape(4, 4) % NUM_CODES
    return image_ids(layout, codes)


@pytest.mark.parametrize("edit,message", [
    (lambda ids, L: [L.separator, *ids[1:]], r"missing image start at position 0"),
    (lambda ids, L: ids[:1] + [L.image_code_offset] + ids[2:], r"unknown height size token at position 1: \d+ \(image code 0\)"),
    (lambda ids, L: ids[:2] + [L.new_line] + ids[3:], r"unknown width size token at position 2"),
    (lambda ids, L: ids[:5] + ids[6:], r"row too short at position 6 \(row 0, column 3\): expected an image code \(4 per row\)"),
    (lambda ids, L: ids[:7] + [L.image_code_offset] + ids[7:], r"row too long at position 7 \(end of row 0\)"),
    (lambda ids, L: ids[:12] + [L.separator] + ids[13:], r"missing new line at position 12 \(end of row 1\)"),
    (lambda ids, L: ids[:9] + [L.separator] + ids[10:], r"non-image id at position 9 \(row 1, column 1\)"),
    (lambda ids, L: ids[:-1], r"missing image end at position 23"),
    (lambda ids, L: ids[:-1] + [L.new_line], r"missing image end at position 23: expected"),
    (lambda ids, L: ids + [L.image_end], r"1 unexpected tokens after the image end \(position 24"),
], ids=["start", "height", "width", "short_row", "long_row", "newline", "non_image", "no_end", "wrong_end", "trailing"])
def test_malformed_sequences_say_what_and_where(layout, edit, message):
    with pytest.raises(TokenGrammarError, match=message):
        codes_from_ids(layout, edit(_ids(layout), layout))


def test_bad_code_grids_are_refused(layout):
    with pytest.raises(ValueError, match="multiple of 4"):
        image_ids(layout, torch.zeros(6, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.63, got 0\.\.64"):
        image_ids(layout, torch.tensor([[0, 1, 2, 64]] * 4))
    with pytest.raises(TypeError, match="integer"):
        image_ids(layout, torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"no size token for 65 grids .*1\.\.64"):
        layout.size_token(65)


def test_image_codes_from_vocabulary_map(tmp_path):
    tok = build_tokenizer(tmp_path, num_image_codes=0)
    base = len(tok) + 10
    vocab_map = {f"<MOVQGAN_x{i}>": base + i for i in range(32)}
    layout = TokenLayout.from_tokenizer(tok, vocabulary_map=vocab_map)
    assert (layout.image_code_offset, layout.num_image_codes) == (base, 32)
    with pytest.raises(ValueError, match="not contiguous"):
        TokenLayout.from_tokenizer(tok, vocabulary_map={**vocab_map, "<MOVQGAN_far>": base + 100})
    with pytest.raises(ValueError, match="cannot locate the image-code tokens"):
        TokenLayout.from_tokenizer(tok)


def test_layout_on_a_qwen2_class_bpe_tokenizer(tmp_path):
    """The official tokenizer is a byte-level BPE with tokenizer_class Qwen2Tokenizer; lookup must work there."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a red cat sits on the mat"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = ["<|endoftext|>", IMAGE_START, IMAGE_END, *UNUSED_SEPARATORS, NEW_LINE, SEPARATOR,
                size_token_string(1), size_token_string(2)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(f"<MOVQGAN_{i:05d}>", normalized=False) for i in range(8)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>"}))
    loaded = load_text_tokenizer(tmp_path)
    layout = TokenLayout.from_tokenizer(loaded)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert layout.image_start == raw.token_to_id(IMAGE_START)
    assert layout.bos == raw.token_to_id("<|endoftext|>")
    assert (layout.image_code_offset, layout.num_image_codes) == (raw.token_to_id("<MOVQGAN_00000>"), 8)
    assert prompt_ids(loaded, layout, "a red cat")[1:-1] == raw.encode("a red cat").ids
