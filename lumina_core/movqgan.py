"""MoVQGAN (SBER, 270M): the image tokenizer of Lumina-mGPT 2.0.

Encoder -> quant_conv -> nearest-code quantiser (16384 codes of dim 4) -> post_quant_conv ->
decoder whose every normalisation is a SpatialNorm conditioned on the quantised latent.
Parameter names are identical to the official flat state dict (`movqgan_270M.ckpt`, 431 tensors),
so the official file loads strictly and `save_movqgan` writes the same format back.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, MissingFileError
from .fileio import atomic_path, load_torch_file


@dataclass(frozen=True)
class MoVQConfig:
    """Architecture hyper-parameters; the defaults are the released 270M model."""

    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    resolution: int = 256  # nominal; only used to decide which levels have attention
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 16384
    in_channels: int = 3
    out_ch: int = 3

    @classmethod
    def preset(cls, name: str) -> "MoVQConfig":
        """Named configuration: only "270m" (the one Lumina-mGPT 2.0 uses) exists."""
        if name.lower() != "270m":
            raise ValueError(f"unknown MoVQGAN preset {name!r}; available: '270m'")
        return cls()

    def has_attention(self, level: int) -> bool:
        """Whether resolution level `level` (0 = full size) carries attention blocks."""
        return self.resolution // 2**level in self.attn_resolutions

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for 270M)."""
        return 2 ** (len(self.ch_mult) - 1)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class SpatialNorm(nn.Module):
    """GroupNorm of the features, modulated per pixel by the (nearest-resized) quantised latent."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = group_norm(channels)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nn.Module):
    """norm -> swish -> 3x3 conv, twice, plus a (1x1 if channels change) shortcut.

    With `zq_channels` the norms are SpatialNorms (decoder); without, plain GroupNorms (encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, zq_channels: int | None = None):
        super().__init__()
        norm = (lambda c: SpatialNorm(c, zq_channels)) if zq_channels else group_norm
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        norm_args = () if zq is None else (zq,)
        h = self.conv1(swish(self.norm1(x, *norm_args)))
        h = self.conv2(swish(self.norm2(h, *norm_args)))  # dropout is 0 in every released config
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 conv projections), residual."""

    def __init__(self, channels: int, zq_channels: int | None = None):
        super().__init__()
        self.norm = SpatialNorm(channels, zq_channels) if zq_channels else group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x) if zq is None else self.norm(x, zq)
        b, c, height, width = x.shape
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5, as official
        out = out.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (asymmetric, as official)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            block_out = cfg.ch * mult
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if cfg.has_attention(level):
                    stage.attn.append(AttnBlock(block_in))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """MOVQDecoder: every norm is a SpatialNorm conditioned on the quantised latent zq."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        zq_ch = cfg.embed_dim
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, zq_ch)
        self.mid.attn_1 = AttnBlock(block_in, zq_ch)
        self.mid.block_2 = ResnetBlock(block_in, block_in, zq_ch)
        stages = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, zq_ch))
                block_in = block_out
                if cfg.has_attention(level):
                    stage.attn.append(AttnBlock(block_in, zq_ch))
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)  # registered as up.0 .. up.N-1, run from the deepest level
        self.up = nn.ModuleList(stages)
        self.norm_out = SpatialNorm(block_in, zq_ch)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, zq), zq), zq)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h, zq)
                if len(stage.attn):
                    h = stage.attn[i](h, zq)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h, zq)))


class MoVQGAN(nn.Module):
    """The full autoencoder: images in [-1, 1] <-> LongTensor code grids (8x smaller per side)."""

    def __init__(self, cfg: MoVQConfig = MoVQConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if self.quantize.embedding.weight.device.type != "meta":
            nn.init.uniform_(self.quantize.embedding.weight, -1.0 / cfg.n_embed, 1.0 / cfg.n_embed)

    @property
    def codebook(self) -> torch.Tensor:
        """The [n_embed, embed_dim] code vectors."""
        return self.quantize.embedding.weight

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latent after quant_conv: [B, embed_dim, H/8, W/8]."""
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor [B, {self.config.in_channels}, H, W] in [-1, 1]; "
                f"got {tuple(images.shape)} {images.dtype}")
        height, width = images.shape[-2:]
        if height % f or width % f or height == 0 or width == 0:
            raise ValueError(f"image height and width must be positive multiples of {f} "
                             f"(one code per {f}x{f} pixels); got {height}x{width}")
        weight = self.quant_conv.weight
        return self.quant_conv(self.encoder(images.to(device=weight.device, dtype=weight.dtype)))

    def quantize_latent(self, latent: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code per latent cell: (quantised latent [B, D, h, w], codes LongTensor [B, h, w])."""
        b, d, h, w = latent.shape
        flat = latent.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.codebook
        codes = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        # |z|^2 + |e|^2 - 2 z.e exactly as official (same rounding); chunked so that a 1024x1024
        # image does not materialise a [16384 x 16384] distance matrix at once.
        with torch.no_grad():  # argmin has no gradient; the codebook gets it through the lookup below
            code_sq = codebook.pow(2).sum(1)
            for start in range(0, flat.shape[0], chunk_rows):
                z = flat[start:start + chunk_rows]
                dist = z.pow(2).sum(1, keepdim=True) + code_sq - 2 * (z @ codebook.t())
                codes[start:start + chunk_rows] = dist.argmin(1)  # first index on ties
        quantised = F.embedding(codes, codebook).view(b, h, w, d).permute(0, 3, 1, 2)
        return quantised, codes.view(b, h, w)

    def decode_quantized(self, quantised: torch.Tensor) -> torch.Tensor:
        """Decoder on a quantised latent [B, embed_dim, h, w] -> images [B, 3, 8h, 8w]."""
        return self.decoder(self.post_quant_conv(quantised), quantised)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> codes LongTensor [B, H/8, W/8]."""
        return self.quantize_latent(self.encode_latent(images))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes LongTensor [B, h, w] -> float32 images [B, 3, 8h, 8w], unclamped (nominally [-1, 1])."""
        n = self.config.n_embed
        if codes.ndim != 3 or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor [B, h, w]; got {tuple(codes.shape)} {codes.dtype}"
                             + (" (use codes.unsqueeze(0) for a single image)" if codes.ndim == 2 else ""))
        if codes.numel() == 0:
            raise ValueError(f"codes must not be empty; got shape {tuple(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= n:
            raise ValueError(f"codes must lie in [0, {n - 1}] (MoVQGAN codebook indices, not token ids); "
                             f"got values in [{low}, {high}]")
        codes = codes.to(device=self.codebook.device, dtype=torch.long)
        quantised = F.embedding(codes, self.codebook).permute(0, 3, 1, 2)
        return self.decode_quantized(quantised).float()

    def forward(self, images: torch.Tensor, beta: float = 0.25
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, codebook_loss, beta * commitment_loss, codes).

        The VQGAN objective is reconstruction loss + codebook_loss + commitment_loss; gradients
        reach the encoder through the straight-through estimator.
        """
        latent = self.encode_latent(images)
        quantised, codes = self.quantize_latent(latent)  # quantised carries gradient to the codebook only
        codebook_loss = F.mse_loss(quantised, latent.detach())
        commitment_loss = beta * F.mse_loss(latent, quantised.detach())
        straight_through = latent + (quantised - latent).detach()
        return self.decode_quantized(straight_through), codebook_loss, commitment_loss, codes


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> MoVQConfig:
    """Infer the architecture from the tensor names and shapes of an official-format state dict."""
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
    ch_mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block."))
    resolution = 256
    attn_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state_dict]
    n_embed, embed_dim = state_dict["quantize.embedding.weight"].shape
    return MoVQConfig(
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i in attn_levels), resolution=resolution,
        z_channels=state_dict["encoder.conv_out.weight"].shape[0], embed_dim=embed_dim, n_embed=n_embed,
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        out_ch=state_dict["decoder.conv_out.weight"].shape[0])


_EXPECTED_LAYOUT = (
    "a MoVQGAN 270M checkpoint (movqgan_270M.ckpt): a flat OrderedDict of 431 float32 tensors named "
    "'encoder.*', 'decoder.*', 'quantize.embedding.weight' [16384, 4], 'quant_conv.*', 'post_quant_conv.*'")


def _layout_error(path: Path, missing: list[str], unexpected: list[str], note: str = "") -> InputError:
    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "") if names else "none"
    return InputError(f"{path} is not a MoVQGAN checkpoint{note}: missing keys: {few(missing)}; "
                      f"unexpected keys: {few(unexpected)}. Expected {_EXPECTED_LAYOUT}.")


def load_movqgan(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> MoVQGAN:
    """Load an official-format MoVQGAN checkpoint (flat tensor state dict) strictly, in eval mode."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise MissingFileError(f"MoVQGAN checkpoint not found: {path} (expected movqgan_270M.ckpt)")
    state_dict = load_torch_file(path, _EXPECTED_LAYOUT)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(f"{path} does not hold a flat dict of tensors (got {type(state_dict).__name__}). "
                         f"Expected {_EXPECTED_LAYOUT}.")
    try:
        cfg = config_from_state_dict(state_dict)
        with torch.device("meta"):
            model = MoVQGAN(cfg)
    except (KeyError, ValueError, IndexError) as err:
        core = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.conv_out.weight",
                "decoder.conv_out.weight", "quantize.embedding.weight"]
        raise _layout_error(path, [k for k in core if k not in state_dict],
                            [k for k in state_dict if not k.startswith(("encoder.", "decoder.", "quantize.",
                                                                        "quant_conv.", "post_quant_conv."))],
                            f" (cannot infer its architecture: {err!r})") from err
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise _layout_error(path, missing, unexpected)
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        raise InputError(f"{path}: tensors with inconsistent shapes: {'; '.join(wrong[:5])}. Expected {_EXPECTED_LAYOUT}.")
    model.load_state_dict(state_dict, strict=True, assign=True)  # takes the loaded tensors, no second copy
    return model.to(device=device, dtype=dtype).eval()


def save_movqgan(model: MoVQGAN, path: str | os.PathLike) -> None:
    """Write the model as an official-format flat OrderedDict .ckpt, atomically."""
    path = Path(path)
    state_dict = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)
