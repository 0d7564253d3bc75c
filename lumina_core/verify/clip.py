"""CLIP-based verifiers: PickScore v1, CLIPScore and the LAION aesthetic predictor v2."""
from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from ..errors import InputError
from ..fileio import load_torch_file
from .base import PROCESSOR_FILE_PATTERNS, Verifier, dtype_option, load_pil_image_processor


class ClipSimilarityVerifier(Verifier):
    """Cosine similarity of CLIP image and text embeddings, times a scale.

    PickScore: the fine-tuned model's own logit scale (exp(logit_scale) * cos, about 20-23 for ordinary
    images). CLIPScore: 100 * cos (the torchmetrics scale, not clamped at 0 so it still ranks).
    Prompts are cut at the text encoder's 77 tokens.
    """

    def __init__(self, model: str, *, processor: str | None = None, scale: str = "logit_scale",
                 name: str = "clip", **kwargs) -> None:
        super().__init__(**kwargs)
        if scale != "logit_scale" and not isinstance(scale, (int, float)):
            raise ValueError(f"scale must be 'logit_scale' or a number, got {scale!r}")
        self.model_name = model
        self.processor_name = processor or model
        self.scale = scale
        self.name = name
        self._model = self._tokenizer = self._image_processor = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = self.weights(self.model_name)
        processor_folder = (folder if self.processor_name == self.model_name else
                            self.weights(self.processor_name, allow_patterns=PROCESSOR_FILE_PATTERNS))
        self._tokenizer = AutoTokenizer.from_pretrained(processor_folder)
        self._image_processor = load_pil_image_processor(processor_folder)
        model = CLIPModel.from_pretrained(folder, **dtype_option(dtype), use_safetensors=True)
        self._model = model.to(self.device).eval()

    def _score(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        model = self._model
        max_length = model.config.text_config.max_position_embeddings
        text = self._tokenizer([prompt], padding="max_length", truncation=True, max_length=max_length,
                               return_tensors="pt")
        pixels = self._image_processor(images=images, return_tensors="pt")["pixel_values"]
        # The full forward returns normalised projected embeddings in every transformers version
        # (get_image_features changed its return type in transformers 5).
        out = model(input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device),
                    pixel_values=pixels.to(self.device, model.dtype))
        cosine = (out.image_embeds.float() @ out.text_embeds.float().T)[:, 0]
        scale = model.logit_scale.float().exp() if self.scale == "logit_scale" else float(self.scale)
        return cosine * scale

    def _modules(self) -> list[nn.Module]:
        return [self._model] if self._model is not None else []

    def _release(self) -> None:
        self._model = self._tokenizer = self._image_processor = None


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (linearMSE variant: no activations), state-dict keys layers.N.*."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Aesthetic score (about 1-10) of L2-normalised CLIP image embeddings [N, D] -> [N]."""
        return self.layers(embeddings)[:, 0]


def load_aesthetic_head(path: str) -> AestheticHead:
    """Read the head from a .pth state dict (as published) or a .safetensors file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        # A failed download often saves an HTML or JSON page instead; empty or garbage files too.
        state = load_torch_file(path, "a LAION aesthetic head (.pth state dict): delete it and download it again")
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise InputError(f"{path} is not a LAION aesthetic head: expected keys layers.0/2/4/6/7.weight/bias")
    head = AestheticHead(input_size=state["layers.0.weight"].shape[1])
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


def _vision_tower_class():
    from transformers import CLIPVisionModelWithProjection

    class CLIPVisionTower(CLIPVisionModelWithProjection):
        """The vision half of a full CLIP checkpoint; the text half is skipped without a warning."""

        _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    return CLIPVisionTower


class AestheticVerifier(Verifier):
    """LAION aesthetic predictor v2: CLIP ViT-L/14 projected image embedding, L2-normalised, through its MLP head."""

    name = "aesthetic"

    def __init__(self, model: str = "openai/clip-vit-large-patch14",
                 head: str = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = model
        self.head_name = head
        self._vision = self._image_processor = self._head = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoConfig

        folder = self.weights(self.model_name)
        head = load_aesthetic_head(self.weights(self.head_name, file=True))
        self._image_processor = load_pil_image_processor(folder)
        config = AutoConfig.from_pretrained(folder)
        if config.model_type == "clip":  # a full CLIP folder: take the vision tower and its projection
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
        else:
            vision_config = config
        vision = _vision_tower_class().from_pretrained(folder, config=vision_config, **dtype_option(dtype),
                                                      use_safetensors=True)
        if vision.config.projection_dim != head.layers[0].in_features:
            raise ValueError(
                f"aesthetic head expects {head.layers[0].in_features}-d embeddings but {self.model_name} "
                f"projects to {vision.config.projection_dim}"
            )
        self._vision = vision.to(self.device).eval()
        self._head = head.to(self.device)  # stays float32: the head is tiny and sensitive

    def _score(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        pixels = self._image_processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = self._vision(pixel_values=pixels.to(self.device, self._vision.dtype)).image_embeds.float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self._head(embeds)

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self._vision, self._head) if m is not None]

    def _release(self) -> None:
        self._vision = self._image_processor = self._head = None
