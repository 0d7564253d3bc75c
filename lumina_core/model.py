"""The Lumina-mGPT 2.0 decoder (Chameleon-style, official parameter names); its KV cache is in kv_cache.py."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype before the weight (as the official code)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """Per-head LayerNorm of q/k (eps 1e-5, no affine inside), then weight and bias shared by head groups."""

    def __init__(self, num_heads: int, head_dim: int, model_parallel_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.ones(model_parallel_size, head_dim))
        self.bias = nn.Parameter(torch.zeros(model_parallel_size, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., heads, D]
        x = F.layer_norm(x, x.shape[-1:], None, None, eps=1e-5)
        repeat = self.num_heads // self.weight.shape[0]
        return x * self.weight.repeat_interleave(repeat, dim=0) + self.bias.repeat_interleave(repeat, dim=0)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, L, D] for split-halves RoPE, computed in float32 and cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, D] with the "rotate_half" convention (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.num_attention_heads, config.head_dim
        kv = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=config.attention_bias)
        self.q_norm = HeadLayerNorm(h, d, config.model_parallel_size)
        self.k_norm = HeadLayerNorm(kv, d, config.model_parallel_size)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, write_pos):
        b, n, _ = x.shape
        h, kv, d = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        q = self.q_norm(self.q_proj(x).view(b, n, h, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, kv, d)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, kv, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(layer, write_pos, k, v)
            out = cache.attend(layer, q, mask)
        else:
            # mask None: plain causal attention (training): no [n, n] mask in memory, and SDPA's fused kernels apply.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=kv != h)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, h * d))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.dropout = nn.Dropout(config.dropout)  # residual dropout, active only in training

    def forward(self, x, cos, sin, mask, cache=None, layer=0, write_pos=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, write_pos))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Backbone(nn.Module):
    """`model.*` of the official checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecodeVocabulary(nn.Module):
    """The rows of the embedding table and of lm_head that decode steps meet, kept on the device.

    After the prefill, a decode step feeds only image codes and the few tokens the image grammar
    can put there (new line, end of image, and the prefix's last token, which SJD's first window
    repeats: a size token or a new line), and it scores only image codes. So the decoding device
    needs `embed` = those rows of the embedding table and `head` = the image-code rows of lm_head;
    the full tables (1.3 GiB each for the 7B in bf16) are needed only to embed the prompt.
    Buffers, not parameters: they are copies of official tensors and never in the state dict.
    """

    def __init__(self, embed_weight: torch.Tensor, head_weight: torch.Tensor, token_ids: list[int],
                 code_offset: int, num_codes: int, device: torch.device | str) -> None:
        super().__init__()
        codes = range(code_offset, code_offset + num_codes)
        ids = sorted(set(token_ids) | set(codes))
        if ids[0] < 0 or ids[-1] >= embed_weight.shape[0]:
            raise ValueError(f"decode vocabulary ids must lie in 0..{embed_weight.shape[0] - 1}")
        self.code_offset, self.num_codes = code_offset, num_codes
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        rows = torch.tensor(ids, dtype=torch.long, device=embed_weight.device)
        self.register_buffer("embed", embed_weight.detach()[rows].to(device), persistent=False)
        # Same values in the same layout as lm_head.weight[codes]: the image logits stay bit-identical.
        self.register_buffer("head", head_weight.detach()[code_offset:code_offset + num_codes].to(device),
                             persistent=False)
        self._id_set = frozenset(ids)

    def covers(self, token_ids) -> bool:
        """True when every id of `token_ids` (host ints) has a row here."""
        return set(int(t) for t in token_ids) <= self._id_set

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids that are in this vocabulary (others get a wrong row: see `covers`)."""
        return F.embedding(torch.searchsorted(self.token_ids, input_ids), self.embed)

    @staticmethod
    def nbytes_for(hidden_size: int, num_tokens: int, num_codes: int, dtype: torch.dtype) -> int:
        """Device bytes of a decode vocabulary of `num_tokens` embedding rows and `num_codes` head rows."""
        return (num_tokens * (hidden_size * torch.empty((), dtype=dtype).element_size() + 8)
                + num_codes * hidden_size * torch.empty((), dtype=dtype).element_size())

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers (ids, embedding rows, head rows)."""
        return sum(t.numel() * t.element_size() for t in (self.token_ids, self.embed, self.head))


class LuminaTransformer(nn.Module):
    """Decoder-only transformer with the official names: `model.embed_tokens`, `model.layers.i.*`, `model.norm`, `lm_head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        self.gradient_checkpointing = False
        # With checkpointing: keep each layer's saved input in host memory (pinned) until backward needs it.
        self.offload_checkpointed_inputs = False
        self.decode_vocab: DecodeVocabulary | None = None

    @property
    def device(self) -> torch.device:
        """Where the decoder layers run (the full vocabulary tables may live elsewhere)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype."""
        return self.model.norm.weight.dtype

    def use_decode_vocabulary(self, token_ids: list[int], code_offset: int, num_codes: int,
                              full_tables_on: torch.device | str = "cpu") -> DecodeVocabulary:
        """Keep on the layers' device only the rows decode steps meet; move the full tables to `full_tables_on`.

        The prompt is then embedded from the full table wherever it is (`embed`), decode steps use
        `decode_vocab` (`decode_step`), and `forward` computes full logits where lm_head is.
        """
        self.decode_vocab = DecodeVocabulary(self.model.embed_tokens.weight, self.lm_head.weight, token_ids,
                                             code_offset, num_codes, self.device)
        self.offload_full_vocabulary(full_tables_on)
        return self.decode_vocab

    def offload_full_vocabulary(self, device: torch.device | str = "cpu") -> None:
        """Move the full embedding table and lm_head to `device` (after `.to()` brought them back)."""
        for module in (self.model.embed_tokens, self.lm_head):
            if module.weight.device != torch.device(device):
                module.weight = nn.Parameter(module.weight.detach().to(device), requires_grad=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings from the full table, on the ids' device (the table may be on the host)."""
        table = self.model.embed_tokens.weight
        if table.device == input_ids.device:
            return self.model.embed_tokens(input_ids)
        return self.model.embed_tokens(input_ids.to(table.device)).to(input_ids.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                num_logits: int | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Float32 logits [B, L, vocab] (only the last `num_logits` positions when given)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache, kv_len)
        if num_logits is not None:
            hidden = hidden[:, -num_logits:]
        head = self.lm_head.weight
        if head.device == hidden.device:
            return self.lm_head(hidden).float()
        return self.lm_head(hidden.to(head.device)).float().to(hidden.device)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      kv_len: int | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, L, hidden] (what lm_head reads); see `forward` for the arguments.

        Without a cache: a full causal pass; `attention_mask` [B, L] (1 = real token, 0 = padding).
        With a cache: `input_ids` are new tokens written at each row's pointer; `attention_mask` [B, L]
        marks which of them are real; keys are read up to `kv_len` (default: the longest filled row),
        so a caller can keep that length fixed for static shapes.
        """
        return self._layers(self.embed(input_ids), attention_mask, position_ids, cache, kv_len)

    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                    kv_len: int | None = None) -> torch.Tensor:
        """`hidden_states` for a decode step: ids embedded from `decode_vocab` when the model has one.

        The sampler's step (eager, compiled or replayed from a CUDA graph) is this function.
        """
        x = self.decode_vocab.embed_ids(input_ids) if self.decode_vocab is not None else self.embed(input_ids)
        return self._layers(x, attention_mask, position_ids, cache, kv_len)

    def _layers(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                cache: KVCache | None, kv_len: int | None) -> torch.Tensor:
        b, n = x.shape[:2]
        device = x.device
        write_pos = None
        if cache is None:
            if position_ids is None:
                position_ids = torch.arange(n, device=device).expand(b, n)
            # Without padding information the mask is plain causal: SDPA's is_causal, no tensor (the
            # 7B's [1, 1, n, n] mask at 768 px is 0.25 GiB, and every checkpointed layer would save it).
            mask = None if attention_mask is None else \
                _causal_mask(n, n, torch.zeros(b, dtype=torch.long, device=device), attention_mask, x.dtype)
        else:
            start = cache.lengths
            write_pos = start[:, None] + torch.arange(n, device=device)
            if kv_len is None:
                kv_len = int(start.max()) + n
            if kv_len > cache.max_len:
                raise ValueError(f"the request needs {kv_len} positions but the KV cache holds {cache.max_len}")
            if position_ids is None:
                position_ids = write_pos
            valid = torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
            cache.key_valid[torch.arange(b, device=device)[:, None], write_pos] = valid
            mask = _causal_mask(n, kv_len, start, cache.key_valid[:, :kv_len], x.dtype)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = self._checkpointed(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, cache, i, write_pos)
        if cache is not None:
            cache.lengths.add_(n)  # in place, so the step can be captured in a CUDA graph
        return self.model.norm(x)

    def _checkpointed(self, layer: nn.Module, *inputs) -> torch.Tensor:
        """One layer under activation checkpointing: only its inputs are saved, the rest is recomputed in backward.

        With `offload_checkpointed_inputs` the saved inputs go to host memory: torch's `save_on_cpu`
        packs exactly what the checkpoint saves (the layer's inputs; the checkpoint's own hooks take
        over inside the layer), so at most one layer's input is back on the device during backward.
        """
        offload = torch.autograd.graph.save_on_cpu(pin_memory=inputs[0].is_cuda) \
            if self.offload_checkpointed_inputs else contextlib.nullcontext()
        with offload:
            return torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False)


def _causal_mask(n: int, kv_len: int, start: torch.Tensor, key_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, n, kv_len]: query i of row b sees key j when j <= start[b] + i and key j is valid.

    The dtype minimum (not -inf) keeps fully masked rows (padding queries) finite, as the official code does.
    """
    device = start.device
    j = torch.arange(kv_len, device=device)
    i = torch.arange(n, device=device)
    allowed = j[None, None, :] <= (start[:, None, None] + i[None, :, None])
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def init_weights(model: LuminaTransformer) -> None:
    """Initialise a freshly built model for training from scratch (normal(0, initializer_range) linears/embeddings)."""
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, HeadLayerNorm)):
            nn.init.ones_(module.weight)
            if isinstance(module, HeadLayerNorm):
                nn.init.zeros_(module.bias)


def build_transformer(config: ModelConfig) -> LuminaTransformer:
    """Build the transformer; under `torch.device("meta")` this allocates nothing."""
    model = LuminaTransformer(config)
    if next(model.parameters()).device.type != "meta":
        init_weights(model)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(math.prod(p.shape) for p in model.parameters())
