"""Token layout and image-token grammar on tiny real tokenizers built in the test."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from lumina_core.testing.grammar import TokenGrammarError, codes_from_ids
from lumina_core.testing.tokenizer import build_tokenizer
from lumina_core.tokens import (
    IMAGE_END, IMAGE_START, NEW_LINE, SEPARATOR, UNUSED_SEPARATORS, TokenLayout, dual_panel_prefix_ids, image_ids,
    load_text_tokenizer, prompt_ids, size_token_string,
)
from lumina_core.request import image_token_count  # the one size rule

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


# ------------------------------------------------------------------ bad files and mismatches (issue 15) ---

from lumina_core.errors import InputError  # noqa: E402
from lumina_core.hub import BUILTIN_MODELS  # noqa: E402
from lumina_core.pipeline import LuminaPipeline  # noqa: E402
from lumina_core.testing.checkpoints import write_tiny_checkpoint  # noqa: E402
from lumina_core.tokens import check_model_match, load_tokens  # noqa: E402

DEMO = BUILTIN_MODELS["demo"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_image_codes=NUM_CODES)


@pytest.fixture
def model_copy(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    return folder


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name, content, says", [
    ("tokenizer.json", b"\x00garbage{{", "tokenizer.json is not valid JSON"),
    ("tokenizer.json", b"", "tokenizer.json is not valid JSON"),
    ("tokenizer.json", b'{"added_tokens": [], "model": "\xe9"}', "tokenizer.json is not UTF-8 text"),
    ("tokenizer.json", b'{"version": "1.0"}', "tokenizer.json is JSON but not a tokenizers file"),
    ("tokenizer.json", b"[1, 2]", "tokenizer.json must hold a JSON object"),
    ("tokenizer_config.json", b"{{", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b"[]", "tokenizer_config.json must hold a JSON object"),
])
def test_item9_garbage_tokenizer_file_is_one_line_naming_it(model_copy, name, content, says):
    (model_copy / name).write_bytes(content)
    with pytest.raises(InputError) as error:
        load_text_tokenizer(model_copy)
    message = _one_line(error)
    assert str(model_copy / name) in message and says in message and "expected the tokenizer.json" in message


def test_item9_missing_tokenizer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no tokenizer in") as error:
        load_text_tokenizer(tmp_path)
    assert isinstance(error.value, FileNotFoundError)


def _with_tokenizer_of(folder, other):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, folder / name)


def test_item11_tokenizer_larger_than_the_model_is_refused(model_copy):
    # The tiny model has vocab_size = its tokenizer's 1xx tokens; the demo's tokenizer has 645.
    _with_tokenizer_of(model_copy, DEMO)
    vocab = json.loads((model_copy / "config.json").read_text())["vocab_size"]
    with pytest.raises(InputError) as error:
        load_tokens(model_copy)
    message = _one_line(error)
    assert f"has 645 tokens but {model_copy / 'config.json'} says vocab_size {vocab}" in message
    with pytest.raises(InputError, match="do not belong to one model"):
        LuminaPipeline.from_pretrained(model_copy, device="cpu")


def test_item11_tokenizer_smaller_than_the_model_is_refused(tmp_path):
    # The demo (vocab 645, vocabulary_map in its config.json) with the tiny model's tokenizer.
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    tiny = build_tokenizer(tmp_path / "tok", num_image_codes=NUM_CODES)
    _with_tokenizer_of(folder, tmp_path / "tok")
    with pytest.raises(InputError) as error:
        load_tokens(folder)
    message = _one_line(error)
    assert f"has {len(tiny)} tokens but {folder / 'config.json'} says vocab_size 645" in message
    assert "vocabulary_map" in message  # the special tokens disagree with config.json too


def test_item11_special_token_disagreeing_with_vocabulary_map_is_named(model_copy):
    tokenizer = load_text_tokenizer(model_copy)
    vocab = tokenizer.get_vocab()
    config = json.loads((model_copy / "config.json").read_text())
    config["vocabulary_map"] = {**vocab, IMAGE_END: vocab[IMAGE_START]}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as error:
        load_tokens(model_copy)
    assert f"{IMAGE_END} is id {vocab[IMAGE_END]} in the tokenizer in {model_copy}" in _one_line(error)
    config["vocabulary_map"] = vocab  # the map of its own tokenizer: accepted
    (model_copy / "config.json").write_text(json.dumps(config))
    assert load_tokens(model_copy)[1].image_start == vocab[IMAGE_START]


def test_item11_movqgan_code_count_must_match_the_image_tokens(model_copy, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other", num_image_codes=2 * NUM_CODES)
    ckpt = other / "movqgan.ckpt"
    with pytest.raises(InputError) as error:
        load_tokens(model_copy, movqgan_codes=2 * NUM_CODES, movqgan_source=str(ckpt))
    assert f"{ckpt} has {2 * NUM_CODES} codes but the tokenizer in {model_copy} has {NUM_CODES} image tokens" \
        in _one_line(error)
    with pytest.raises(InputError, match=f"{2 * NUM_CODES} codes but the tokenizer"):
        LuminaPipeline.from_pretrained(model_copy, device="cpu", movqgan_path=ckpt)
    pipe = LuminaPipeline.from_pretrained(model_copy, device="cpu")  # its own MoVQGAN loads
    assert pipe.layout.num_image_codes == pipe.movqgan.config.n_embed == NUM_CODES


def test_item11_image_codes_past_the_embedding_are_refused(layout):
    with pytest.raises(InputError, match="past the .* rows of the embedding"):
        check_model_match(layout, tokenizer_size=layout.image_code_offset, vocab_size=layout.image_code_offset + 8)
    check_model_match(layout, tokenizer_size=layout.image_code_offset + NUM_CODES,
                      vocab_size=layout.image_code_offset + NUM_CODES + 1)  # one spare row, as the release


def test_the_demo_and_tiny_models_match_their_tokenizers(tiny_folder):
    for folder in (DEMO, tiny_folder):
        tokenizer, layout = load_tokens(folder)
        assert layout.image_code_offset + layout.num_image_codes <= len(tokenizer)


def test_issue16_item6_no_token_id_literal_in_the_package():
    """The module docstring's promise: special ids come from token strings, never from literals."""
    import io
    import tokenize

    official_ids = {151643, 151645, 151665, 151666, 151667, 151668, 151669, 151670, 155000, 171383, 171384}
    package = Path(__file__).resolve().parents[1] / "lumina_core"
    found = []
    for path in package.rglob("*.py"):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if token.type == tokenize.NUMBER and token.string.replace("_", "").isdigit() \
                    and int(token.string.replace("_", "")) in official_ids:
                found.append(f"{path.relative_to(package)}:{token.start[0]} {token.string}")
    assert not found, found
