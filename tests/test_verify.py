"""Verifiers on tiny random models in the real formats, loaded through the production loaders; ranking; best-of-N."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from lumina_core.verify import (BestOfN, DemoCheckVerifier, average_ranks, best_of_n, get_verifier,
                                load_aesthetic_head, rank, to_pil_images, weight_memory, zscores)
from lumina_core.verify.base import load_pil_image_processor
from lumina_core.testing.verifiers import make_tiny_aesthetic_head, make_tiny_clip, make_tiny_qwen_vl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("verifiers")
    return {
        "clip": make_tiny_clip(str(root / "clip")),
        "head": make_tiny_aesthetic_head(str(root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")),
        "qwen2.5-vl": make_tiny_qwen_vl(str(root / "qwen25"), "qwen2.5-vl"),
        "qwen2-vl": make_tiny_qwen_vl(str(root / "qwen2"), "qwen2-vl"),
    }


def build(name: str, tiny: dict, **kw):
    if name == "aesthetic":
        return get_verifier("aesthetic", model=tiny["clip"], head=tiny["head"], **kw)
    if name in ("pickscore", "clipscore"):
        return get_verifier(name, model=tiny["clip"], **kw)
    return get_verifier("vqascore", model=tiny[name], **kw)


def images(n=3, h=40, w=56, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


ALL = ["pickscore", "clipscore", "aesthetic", "qwen2.5-vl", "qwen2-vl"]


@pytest.mark.parametrize("name", ALL)
def test_scores_shape_deterministic_and_lazy(name, tiny):
    verifier = build(name, tiny, batch_size=2)
    assert not verifier.loaded
    batch = images(3)
    first = verifier.score(batch, "a red cube")
    assert verifier.loaded
    assert first.shape == (3,) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(verifier.score(batch, "a red cube"), first)
    # same images as PIL give the same scores
    assert torch.allclose(verifier.score(to_pil_images(batch), "a red cube"), first, atol=1e-6)
    # scores depend on the image content
    assert first.unique().numel() == 3
    # unloaded, then loaded again from the folder: the same scores
    verifier.unload()
    assert not verifier.loaded
    assert torch.allclose(verifier.to("cpu").score(batch, "a red cube"), first, atol=1e-5)


@pytest.mark.parametrize("name", ["pickscore", "aesthetic", "qwen2.5-vl"])
def test_weights_load_in_the_asked_dtype(tiny, name):
    # from_pretrained's dtype keyword is `torch_dtype` before transformers 4.56: a wrong name would
    # silently load float32.
    verifier = build(name, tiny, dtype=torch.bfloat16).load()
    model = verifier._modules()[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert verifier.score(images(1), "a red cube").isfinite().all()


def test_clip_scores_match_clipmodel_outputs(tiny):
    from transformers import AutoTokenizer, CLIPModel

    batch = images(4)
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    text = AutoTokenizer.from_pretrained(tiny["clip"])(["a red cube"], padding="max_length", max_length=77,
                                                          return_tensors="pt")
    processor = load_pil_image_processor(tiny["clip"])
    pixels = processor(images=to_pil_images(batch), return_tensors="pt")
    with torch.no_grad():
        out = model(**text, **pixels)
    pick = build("pickscore", tiny).score(batch, "a red cube")
    clip = build("clipscore", tiny).score(batch, "a red cube")
    assert torch.allclose(pick, out.logits_per_image[:, 0], atol=1e-5)
    assert torch.allclose(clip, 100 * out.logits_per_image[:, 0] / model.logit_scale.exp(), atol=1e-4)
    # the aesthetic tower read out of the full CLIP folder gives the full model's image embedding
    head = load_aesthetic_head(tiny["head"])
    with torch.no_grad():
        expected = head(out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True))
    assert torch.allclose(build("aesthetic", tiny).score(batch, "ignored"), expected, atol=1e-5)


def test_clip_prompt_longer_than_77_tokens_is_cut(tiny):
    verifier = build("pickscore", tiny)
    long_prompt = " ".join(["red cube"] * 200)
    score = verifier.score(images(2), long_prompt)
    assert score.shape == (2,) and torch.isfinite(score).all()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl"])
def test_vqascore_is_p_yes_and_batching_does_not_change_it(family, tiny):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    folder = tiny[family]
    # different sizes: different vision token counts, so the batch is left-padded
    pil = [to_pil_images(images(1, 40, 56, seed=1))[0], to_pil_images(images(1, 84, 60, seed=2))[0],
           to_pil_images(images(1, 30, 30, seed=3))[0]]
    batched = build(family, tiny, batch_size=3).score(pil, "a red cube")
    one_by_one = build(family, tiny, batch_size=1).score(pil, "a red cube")
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert ((batched > 0) & (batched < 1)).all()

    # Independent reference: expand the image placeholder in the text as the HF processor does,
    # then read P("Yes") from the first generated position of model.generate.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = load_pil_image_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    question = 'Does this figure show "a red cube"? Please answer yes or no.'
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vision = processor(images=[pil[1]], return_tensors="pt")
    n = int(vision["image_grid_thw"][0].prod()) // processor.merge_size ** 2
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt",
                    add_special_tokens=False)["input_ids"]
    image_id = model.config.image_token_id
    extra = ({"mm_token_type_ids": (ids == image_id).int()}  # transformers >= 5 builds its rope positions from it
             if "mm_token_type_ids" in inspect.signature(model.forward).parameters else {})
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=vision["pixel_values"],
                             image_grid_thw=vision["image_grid_thw"], max_new_tokens=1, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **extra)
    yes = tokenizer.convert_tokens_to_ids("Yes")
    expected = torch.softmax(out.scores[0][0].float(), dim=-1)[yes]
    assert torch.allclose(batched[1], expected, atol=1e-5)


def test_vqascore_multi_token_answer_is_geometric_mean(tiny):
    verifier = build("qwen2.5-vl", tiny, answer="Yes.")
    single = build("qwen2.5-vl", tiny).score(images(2), "a red cube")
    double = verifier.score(images(2), "a red cube")
    assert len(verifier._answer_ids) == 2
    assert double.shape == (2,) and not torch.allclose(double, single)


def test_image_convention_is_checked():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_pil_images(images(2) * 2 - 1)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_pil_images(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="empty"):
        to_pil_images([])
    pil = to_pil_images(torch.zeros(1, 3, 4, 5))
    assert pil[0].size == (5, 4) and pil[0].mode == "RGB"


def test_aesthetic_head_formats(tiny, tmp_path):
    from safetensors.torch import save_file

    head = load_aesthetic_head(tiny["head"])
    as_safetensors = tmp_path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(as_safetensors))
    x = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    assert torch.equal(load_aesthetic_head(str(as_safetensors))(x), head(x))
    html = tmp_path / "broken.pth"
    html.write_text("<html>rate limited</html>")
    with pytest.raises(ValueError, match="download it again"):
        load_aesthetic_head(str(html))


def test_model_resolution_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lumina_core.hub import resolve_weights

    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_weights(str(tmp_path / "missing" / "folder"), auto_download=False)
    with pytest.raises(FileNotFoundError, match="auto-download"):
        resolve_weights("Qwen/Qwen2.5-VL-7B-Instruct", auto_download=False)
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("imagereward")


def test_weight_memory_of_real_checkpoints():
    # parameter counts published for these checkpoints: CLIP ViT-L/14 427.6 M, PickScore (ViT-H/14) 986 M,
    # Qwen2.5-VL-7B 8.29 B
    clip = weight_memory("clipscore")
    assert clip["parameters"] == 427_616_513 and clip["bytes"] == 2 * 427_616_513
    assert 985e6 < weight_memory("pickscore")["parameters"] < 987e6
    assert 8.28e9 < weight_memory("vqascore")["parameters"] < 8.30e9
    aesthetic = weight_memory("aesthetic", dtype=torch.float32)
    assert 300e6 < aesthetic["parameters"] < 310e6


# ------------------------------------------------------------------ ranking ------------------------

def test_average_ranks_and_zscores():
    assert average_ranks(torch.tensor([5.0, 5.0, 1.0, 7.0])).tolist() == [1.5, 1.5, 0.0, 3.0]
    assert zscores(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    z = zscores(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(z, torch.tensor([-1.224745, 0.0, 1.224745], dtype=torch.float64), atol=1e-6)


def test_rank_known_tables():
    scores = {"vqa": [0.9, 0.5, 0.1], "aesthetic": [4.0, 6.0, 5.0]}
    # equal weights: ranks vqa [2,1,0], aesthetic [0,2,1] -> combined [1, 1.5, 0.5]
    result = rank(scores)
    assert result.order == [1, 0, 2] and result.best_index == 1
    assert result.combined.tolist() == [1.0, 1.5, 0.5]
    assert result.table[0] == {"index": 0, "place": 2, "combined": 1.0, "vqa": 0.9, "vqa_rank": 2.0,
                               "aesthetic": 4.0, "aesthetic_rank": 0.0}
    # alignment weighted up: vqa wins
    assert rank(scores, weights={"vqa": 3, "aesthetic": 1}).order == [0, 1, 2]
    # a zero weight removes a verifier from the choice but keeps it in the table
    only_aesthetic = rank(scores, weights={"vqa": 0})
    assert only_aesthetic.order == [1, 2, 0] and "vqa" in only_aesthetic.table[0]


def test_rank_ties_break_on_first_verifier_then_index():
    tied = rank({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]})  # combined all 1.0
    assert tied.order == [2, 1, 0]
    assert rank({"b": [3.0, 2.0, 1.0], "a": [1.0, 2.0, 3.0]}).order == [0, 1, 2]
    assert rank({"a": [1.0, 1.0, 1.0]}).order == [0, 1, 2]


def test_rank_zscore_keeps_margins():
    scores = {"vqa": [0.10, 0.11, 0.12, 0.95], "pick": [20.0, 21.0, 22.0, 20.5]}
    # ranks: vqa [0,1,2,3], pick [0,2,3,1] -> combined [0, 1.5, 2.5, 2]: the large vqa margin is ignored
    assert rank(scores, method="rank").order == [2, 3, 1, 0]
    # z-scores: vqa [-0.60,-0.58,-0.55,1.73], pick [-1.18,0.17,1.52,-0.51] -> candidate 3 leads
    z = rank(scores, method="zscore")
    assert z.order == [3, 2, 1, 0]
    assert "vqa_z" in z.table[0]


@pytest.mark.parametrize("scores, weights, method, message", [
    ({"a": [1.0, 2.0], "b": [1.0]}, None, "rank", "same"),
    ({"a": [1.0, float("nan")]}, None, "rank", "NaN"),
    ({"a": [1.0, 2.0]}, {"c": 1.0}, "rank", "without scores"),
    ({"a": [1.0, 2.0]}, {"a": -1.0}, "rank", ">= 0"),
    ({"a": [1.0, 2.0]}, None, "borda", "method"),
    ({}, None, "rank", "at least one"),
])
def test_rank_rejects_bad_input(scores, weights, method, message):
    with pytest.raises(ValueError, match=message):
        rank(scores, weights, method)


# ------------------------------------------------------------------ best-of-N ----------------------

@dataclass
class FakeCodes:
    codes: torch.Tensor
    request: object
    seeds: list
    stats: dict = field(default_factory=dict)


@dataclass
class FakeRequest:
    prompt: str
    needs_reference: bool = False


@dataclass
class FakeSampling:
    num_images: int = 1
    seed: int = 0


class StandInPipeline:
    """Test double of LuminaPipeline's generate/decode contract: candidate i is a fixed demo image."""

    def __init__(self, captions: list[str], upper: str | None = None) -> None:
        from lumina_core.demo.data import parse_caption, render

        rng = np.random.default_rng(0)
        self.pixels = torch.stack([torch.from_numpy(render(parse_caption(c), rng, "white").copy()) for c in captions])
        if upper is not None:  # dual panel: the same given upper panel above every candidate
            top = torch.from_numpy(render(parse_caption(upper), rng, "white").copy())
            self.pixels = torch.cat([top.expand_as(self.pixels), self.pixels], dim=1)
        self.calls = []

    def generate(self, request, sampling, progress=None, should_cancel=None):
        self.calls.append(sampling)
        n = sampling.num_images
        return FakeCodes(codes=torch.arange(n).view(n, 1, 1).expand(n, 8, 8), request=request, seeds=list(range(n)))

    def decode(self, codes):
        index = codes.codes[:, 0, 0]
        return self.pixels[index].permute(0, 3, 1, 2).float() / 127.5 - 1  # [-1, 1] like MoVQGAN


def test_best_of_n_picks_the_candidate_that_matches(tiny):
    captions = ["a blue square in the top left", "a green circle in the center",
                "a red circle in the bottom right", "a red square in the top right"]
    pipe = StandInPipeline(captions)
    verifiers = {"demo_check": DemoCheckVerifier(), "pickscore": build("pickscore", tiny)}
    weights = {"demo_check": 3.0, "pickscore": 1.0}
    result = best_of_n(pipe, FakeRequest("a red circle in the bottom right"), FakeSampling(num_images=4),
                       verifiers, weights=weights)
    assert isinstance(result, BestOfN)
    assert pipe.calls[0].num_images == 4
    assert result.best_index == 2 and result.order[0] == 2
    assert result.images.shape == (4, 3, 64, 64) and 0 <= result.images.min() and result.images.max() <= 1
    assert torch.equal(result.best_image, result.images[2:3])
    assert result.scores["demo_check"].tolist()[2] == 3.0
    assert [row["index"] for row in result.table] == [0, 1, 2, 3]
    assert result.table[2]["place"] == 1 and "pickscore" in result.table[2]
    assert result.codes.seeds == [0, 1, 2, 3]
    # scoring against another prompt (the user's original when the request holds a refined one)
    other = best_of_n(pipe, FakeRequest("a red circle in the bottom right, glossy, studio light"),
                      FakeSampling(num_images=4), verifiers, weights=weights,
                      score_prompt="a red square in the top right")
    assert other.best_index == 3


def test_best_of_n_judges_only_the_generated_panel():
    captions = ["a blue square in the top left", "a red circle in the bottom right", "a green circle in the center"]
    pipe = StandInPipeline(captions, upper="a green circle in the center")
    result = best_of_n(pipe, FakeRequest("a red circle in the bottom right", needs_reference=True),
                       FakeSampling(num_images=3), [DemoCheckVerifier()])
    assert result.images.shape == (3, 3, 128, 64)
    assert result.best_index == 1 and result.scores["demo_check"].tolist() == [0.0, 3.0, 0.0]


def test_best_of_n_validates_before_generating(tiny):
    pipe = StandInPipeline(["a red circle in the center"])
    with pytest.raises(ValueError, match="unknown verifiers"):
        best_of_n(pipe, FakeRequest("a red circle in the center"), FakeSampling(num_images=1),
                  [DemoCheckVerifier()], weights={"vqascore": 1.0})
    with pytest.raises(ValueError, match="num_images"):
        best_of_n(pipe, FakeRequest("x"), replace(FakeSampling(), num_images=0), [DemoCheckVerifier()])
    assert pipe.calls == []


@pytest.mark.parametrize("content", [b"", b"e" * 4096], ids=["empty", "garbage"])
def test_issue15_item9_broken_aesthetic_head_is_one_line(tmp_path, content):
    from lumina_core.errors import InputError

    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    path.write_bytes(content)  # an EOFError and an IndexError escaped before
    with pytest.raises(InputError, match="download it again") as error:
        load_aesthetic_head(str(path))
    assert "\n" not in str(error.value) and str(path) in str(error.value)
