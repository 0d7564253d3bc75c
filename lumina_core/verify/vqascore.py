"""VQAScore with a Qwen-VL model: the probability that the model answers "Yes" to a question about the image.

Score = P("Yes" | image, 'Does this figure show "{prompt}"? Please answer yes or no.') read from one
forward pass (the logits of the first answer position), not renormalised against "No"; an answer of
several tokens gives the geometric mean of their probabilities (teacher forced). The processor is
assembled from the tokenizer and the PIL image processor, so torchvision is not needed. Works with every
transformers the pack allows (4.50.3 on): optional forward arguments are passed only where the model takes them.
"""
from __future__ import annotations

import inspect
import json
import os

import torch
from PIL import Image
from torch import nn

from .base import Verifier, dtype_option, load_pil_image_processor

QUESTION_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'

# Checkpoints that load with transformers' own classes; the first is the default.
VQASCORE_MODELS = {
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
}


def _read_chat_template(folder: str, tokenizer) -> str:
    # The processor's template first: it is the one written for image content (a tokenizer's own
    # template may be text-only).
    as_json = os.path.join(folder, "chat_template.json")
    if os.path.isfile(as_json):
        with open(as_json, encoding="utf-8") as handle:
            return json.load(handle)["chat_template"]
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as handle:
            return handle.read()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(f"{folder} has no chat template (chat_template.json, chat_template.jinja or tokenizer_config.json)")


class VQAScoreVerifier(Verifier):
    """VQAScore (Lin et al. 2024) on a Qwen2-VL / Qwen2.5-VL instruct model."""

    name = "vqascore"

    def __init__(self, model: str = VQASCORE_MODELS["qwen2.5-vl-7b"], *, question: str = QUESTION_TEMPLATE,
                 answer: str = "Yes", max_pixels: int | None = None, batch_size: int = 4, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if "{prompt}" not in question:
            raise ValueError("question must contain {prompt}")
        self.model_name = VQASCORE_MODELS.get(model, model)
        self.question = question
        self.answer = answer
        self.max_pixels = max_pixels  # caps the vision tokens per image (None: the checkpoint's setting)
        self._model = self._tokenizer = self._image_processor = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        folder = self.weights(self.model_name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        extra = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        image_processor = load_pil_image_processor(folder, **extra)
        model = AutoModelForImageTextToText.from_pretrained(folder, **dtype_option(dtype), use_safetensors=True)
        self._chat_template = _read_chat_template(folder, tokenizer)
        self._image_token_id = model.config.image_token_id
        self._answer_ids = tokenizer.encode(self.answer, add_special_tokens=False)
        if not self._answer_ids:
            raise ValueError(f"the tokenizer of {self.model_name} turns the answer {self.answer!r} into no tokens")
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        forward_options = inspect.signature(model.forward).parameters
        self._takes_mm_types = "mm_token_type_ids" in forward_options
        self._takes_logits_to_keep = "logits_to_keep" in forward_options  # not in 4.50's Qwen-VL classes
        self._tokenizer, self._image_processor = tokenizer, image_processor
        self._model = model.to(self.device).eval()

    def _prefix_ids(self, prompt: str) -> list[int]:
        question = self.question.replace("{prompt}", prompt)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self._tokenizer.apply_chat_template(messages, chat_template=self._chat_template, tokenize=False,
                                                   add_generation_prompt=True)
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        if ids.count(self._image_token_id) != 1:
            raise ValueError(f"the chat template of {self.model_name} must place exactly one image token, "
                             f"found {ids.count(self._image_token_id)}")
        return ids

    def _score(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        vision = self._image_processor(images=images, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self._image_processor.merge_size
        prefix = self._prefix_ids(prompt)
        at = prefix.index(self._image_token_id)
        answer = self._answer_ids
        rows = []
        for thw in grid:
            n_tokens = int(thw.prod()) // (merge * merge)
            rows.append(prefix[:at] + [self._image_token_id] * n_tokens + prefix[at + 1:] + answer[:-1])
        # Left padding puts the answer positions at the same (last) columns of every row.
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row):] = torch.tensor(row)
            attention[i, length - len(row):] = 1
        inputs = dict(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                      pixel_values=vision["pixel_values"].to(self.device, self._model.dtype),
                      image_grid_thw=grid.to(self.device), use_cache=False)
        if self._takes_logits_to_keep:  # only the answer positions' logits (not all, a vocabulary each)
            inputs["logits_to_keep"] = len(answer)
        if self._takes_mm_types:  # transformers >= 5 builds the 3-D rope positions from these
            inputs["mm_token_type_ids"] = (input_ids == self._image_token_id).int().to(self.device)
        logits = self._model(**inputs).logits[:, -len(answer):].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(answer, device=log_probs.device).expand(len(rows), -1)
        return log_probs.gather(-1, targets[..., None])[..., 0].mean(dim=-1).exp()

    def _modules(self) -> list[nn.Module]:
        return [self._model] if self._model is not None else []

    def _release(self) -> None:
        self._model = self._tokenizer = self._image_processor = None
