"""Logit rules, batched CFG against the unbatched definition, AR decoding on a tiny real transformer."""
import pytest
import torch

from lumina_core.config import ModelConfig
from lumina_core.model import build_transformer
from lumina_core.sampling import GenerationCancelled, SamplingConfig
from lumina_core.sampling.ar import decode_ar
from lumina_core.sampling.state import DecodeJob
from lumina_core.sampling.logits import (CODE, END, NEW_LINE, full_vocab_probs, guidance_table, image_probs,
                                         position_kind, sample_inverse_cdf, top_k_filter)

# A tiny vocabulary: text 0..9, image start 10, end 11, new line 12, sizes 13..15, codes 16..(16+C-1).
START, END_ID, NL, OFFSET = 10, 11, 12, 16


def tiny_model(num_codes=6, seed=0, sharpen=3.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=OFFSET + num_codes, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_transformer(cfg).eval()
    with torch.no_grad():  # bigger weights than the init so distributions depend on the context
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen / cfg.initializer_range * 0.02 * 8)
    return model


def job_for(rows=2, cols=3, num_codes=6, prompt=(1, 2, 3, 4), reference=None):
    header = (START, 13, 14)
    ref_ids = ()
    first_row = 0
    if reference is not None:
        first_row = reference.shape[0]
        ref_ids = tuple(int(x) for row in reference.tolist() for x in [*(c + OFFSET for c in row), NL])
    return DecodeJob(cond_prefix=tuple(prompt) + header + ref_ids, uncond_prefix=header + ref_ids, rows=rows, cols=cols,
                      new_line=NL, image_end=END_ID, code_offset=OFFSET, num_codes=num_codes, first_row=first_row,
                      reference_codes=reference)


def test_position_kind_follows_official_rule():
    rows, cols = 3, 4
    t = torch.arange(rows * (cols + 1) + 1)
    kinds = position_kind(t, rows, cols).tolist()
    for i, k in enumerate(kinds):
        if (i + 1) % (cols + 1) == 0:
            assert k == NEW_LINE
        elif i + 1 == (cols + 1) * rows + 1:
            assert k == END
        else:
            assert k == CODE
    assert kinds[-1] == END and kinds.count(NEW_LINE) == rows


def test_guidance_schedule():
    rows = cols = 96  # 768 px: denominator 4*24*24 = 2304
    g = guidance_table(4.0, "official", rows, cols)
    assert torch.all(g == 4.0)
    g = guidance_table(2.0, "official", rows, cols)
    assert torch.all(g == 4.0)  # any cfg in (1, 4) becomes the floor at the first image token
    g = guidance_table(10.0, "official", rows, cols)
    assert g[0] == pytest.approx(10.0 * (1 - 2 / 2304))
    assert g[1] == pytest.approx(10.0 * (1 - 2 / 2304) * (1 - 3 / 2304))
    assert torch.all(g[1:] <= g[:-1]) and g[-1] == 4.0
    assert torch.all(guidance_table(1.0, "official", rows, cols) == 1.0)
    assert torch.all(guidance_table(7.0, "constant", rows, cols) == 7.0)
    # I2I: the reference half counts, so the value starts much lower.
    g_i2i = guidance_table(10.0, "official", rows, cols, first=48 * 97)
    assert g_i2i.numel() == 48 * 97 + 1 and torch.all(g_i2i == 4.0)


def test_top_k_keeps_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    out = top_k_filter(x, 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False, False]]
    out = top_k_filter(x, 3)
    assert torch.isfinite(out).sum() == 3
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(x, 0)


def test_image_probs_equal_the_full_vocabulary_chain():
    torch.manual_seed(0)
    vocab, offset, count = 40, 20, 12
    cond, uncond = torch.randn(5, vocab) * 3, torch.randn(5, vocab) * 3
    kind = torch.full((5,), CODE)
    full = full_vocab_probs(cond, uncond, 3.0, kind, 4, 0.7, NL, END_ID, offset, count)
    img = image_probs(cond[:, offset:offset + count], uncond[:, offset:offset + count], 3.0, 4, 0.7)
    assert torch.allclose(full[:, offset:offset + count], img, atol=1e-6)
    assert full[:, :offset].sum() == 0 and full[:, offset + count:].sum() == 0
    forced = full_vocab_probs(cond, uncond, 3.0, torch.tensor([NEW_LINE, END, CODE, CODE, CODE]), 4, 0.7,
                              NL, END_ID, offset, count)
    assert forced[0, NL] == 1 and forced[1, END_ID] == 1


def test_image_probs_in_the_callers_buffers_are_bit_identical():
    """`overwrite` (the decoders' fresh head outputs) reuses cond / uncond as buffers: same bits, and
    without it the caller's logits are left as they were. Shapes: plain [N, 1, C] and an SJD window
    [N, W, C] with one guidance value per position; the real code count, so numpy's selection runs."""
    torch.manual_seed(0)
    for shape, scale in (((1, 1, 16384), torch.tensor([4.0])), ((2, 16, 16384), torch.rand(2, 16) * 6 + 1),
                         ((3, 1, 257), 2.5)):
        cond, uncond = torch.randn(shape) * 3, torch.randn(shape) * 3
        kept = cond.clone(), uncond.clone()
        expected = image_probs(cond, uncond, scale, 4096 if shape[-1] > 4096 else 50, 0.9)
        assert torch.equal(cond, kept[0]) and torch.equal(uncond, kept[1])
        got = image_probs(cond, uncond, scale, 4096 if shape[-1] > 4096 else 50, 0.9, overwrite=True)
        assert torch.equal(got, expected)
        assert torch.equal(image_probs(kept[0].clone(), None, None, 50, 1.0, overwrite=True),
                           image_probs(kept[0], None, None, 50, 1.0))


def test_inverse_cdf_sampling_is_exact():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25]])
    u = torch.linspace(0, 0.999999, 4000)
    idx = sample_inverse_cdf(probs.expand(4000, -1), u)
    counts = torch.bincount(idx, minlength=5).float() / 4000
    assert torch.allclose(counts, probs[0], atol=1e-3)


@pytest.mark.parametrize("bad,match", [(dict(cfg=0.5), "cfg"), (dict(top_k=0), "top_k"), (dict(temperature=0.0), "temperature"),
                                       (dict(num_images=0), "num_images"), (dict(guidance="x"), "guidance"),
                                       (dict(sjd_window=1), "sjd_window"), (dict(sjd_coupled=True), "sjd_coupled")])
def test_sampling_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**bad)


def _unbatched_reference(model, job, sampling, body_tokens, t):
    """p at body position t by the definition: two separate full forward passes (no cache), full vocabulary."""
    body = body_tokens[: t].tolist()  # includes the reference rows, which end both prefixes
    cut = job.first_body
    cond_ids = torch.tensor([list(job.cond_prefix[:len(job.cond_prefix) - cut]) + body])
    cond = model(cond_ids)[0, -1]
    g = guidance_table(sampling.cfg, sampling.guidance, job.rows, job.cols, job.first_body)[t - job.first_body]
    uncond = None
    if sampling.cfg != 1.0:
        uncond = model(torch.tensor([list(job.uncond_prefix[:len(job.uncond_prefix) - cut]) + body]))[0, -1]
    kind = position_kind(torch.tensor(t), job.rows, job.cols)
    full = full_vocab_probs(cond, uncond, float(g), kind, sampling.top_k, sampling.temperature,
                            job.new_line, job.image_end, job.code_offset, job.num_codes)
    return full[job.code_offset: job.code_offset + job.num_codes]


@pytest.mark.parametrize("cfg,guidance,reference", [(3.0, "constant", False), (9.0, "official", False),
                                                     (1.0, "official", False), (5.0, "official", True)])
def test_batched_cfg_equals_unbatched_definition(cfg, guidance, reference):
    model = tiny_model()
    ref = torch.tensor([[0, 1, 2], [3, 4, 5]]) if reference else None
    job = job_for(rows=4 if reference else 2, cols=3, reference=ref)
    sampling = SamplingConfig(cfg=cfg, guidance=guidance, top_k=4, temperature=0.9, seed=3, num_images=2)
    trace = []
    codes, stats = decode_ar(model, job, sampling, sampling.seeds, trace=trace)
    assert codes.shape == (2, job.rows, job.cols)
    if reference:
        assert torch.equal(codes[:, :2], ref.expand(2, -1, -1))
    body = torch.cat([codes + OFFSET, torch.full((2, job.rows, 1), NL)], -1).reshape(2, -1)
    body = torch.cat([body, torch.full((2, 1), END_ID)], 1)
    assert len(trace) == (job.rows - job.first_row) * job.cols
    with torch.no_grad():
        for t, probs in trace:
            for i in range(2):
                expected = _unbatched_reference(model, job, sampling, body[i], t)
                assert torch.allclose(probs[i], expected, atol=1e-5), (t, i)
    assert stats["forward_passes"] == job.generated_tokens  # prefill + one per token except the end


def test_same_seed_same_image_whatever_the_batch():
    model = tiny_model()
    job = job_for(rows=3, cols=3)
    many = decode_ar(model, job, SamplingConfig(cfg=3.0, top_k=6, seed=10, num_images=3), [10, 11, 12])[0]
    one = decode_ar(model, job, SamplingConfig(cfg=3.0, top_k=6, seed=11), [11])[0]
    assert torch.equal(many[1], one[0])
    assert not torch.equal(many[0], many[1]) or not torch.equal(many[1], many[2])


def test_progress_once_per_row_and_cancel():
    model = tiny_model()
    job = job_for(rows=3, cols=2)
    calls = []
    decode_ar(model, job, SamplingConfig(cfg=2.0), [0], progress=lambda d, t, c: calls.append((d, t, tuple(c.shape))))
    assert [c[2] for c in calls] == [(1, 1, 2), (1, 2, 2), (1, 3, 2), (1, 3, 2)]
    assert calls[-1][0] == calls[-1][1] == job.generated_tokens
    checks = []

    def cancel():
        checks.append(1)
        return len(checks) >= 2

    with pytest.raises(GenerationCancelled):
        decode_ar(model, job, SamplingConfig(cfg=2.0), [0], should_cancel=cancel)
    assert len(checks) == 2


@pytest.mark.slow
def test_compiled_step_gives_the_same_images():
    from lumina_core.sampling.step import compile_step
    from lumina_core.sampling.sjd import decode_sjd

    model = tiny_model()
    job = job_for(rows=3, cols=3)
    step = compile_step(model)
    plain = SamplingConfig(cfg=3.0, top_k=4, seed=1, num_images=2)
    assert torch.equal(decode_ar(model, job, plain, plain.seeds)[0],
                       decode_ar(model, job, plain, plain.seeds, step_fn=step)[0])
    sjd = SamplingConfig(cfg=3.0, top_k=4, seed=1, num_images=2, sjd=True, sjd_window=4)
    assert torch.equal(decode_sjd(model, job, sjd, sjd.seeds)[0], decode_sjd(model, job, sjd, sjd.seeds, step_fn=step)[0])
