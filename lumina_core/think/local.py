"""The optional local fallback: a transformers causal LM in a folder, answering greedily."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .instructions import chat_messages
from .settings import ThinkConfig

_LOCAL_MODELS: dict[str, tuple[Any, Any]] = {}


def ask_local(config: ThinkConfig, prompt: str) -> str:
    """Greedy answer of the transformers causal LM stored in `config.local_model`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(Path(config.local_model).expanduser().resolve())
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"local ThinkPrompt model folder not found: {folder}")
    if folder not in _LOCAL_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        _LOCAL_MODELS[folder] = (tokenizer, model)
    tokenizer, model = _LOCAL_MODELS[folder]
    ids = tokenizer.apply_chat_template(chat_messages(config.instructions, prompt), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    input_ids = ids["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=config.local_max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def unload_local_models() -> None:
    """Free the cached local fallback LMs."""
    _LOCAL_MODELS.clear()
