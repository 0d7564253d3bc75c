"""ModelConfig: the transformer's hyper-parameters, as presets or read from an official config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the Chameleon-style decoder used by Lumina-mGPT 2.0 (defaults: the released 7B)."""

    vocab_size: int = 171385
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 10240
    model_parallel_size: int = 1
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0
    z_loss_weight: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.num_attention_heads % self.model_parallel_size:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of model_parallel_size {self.model_parallel_size}")
        if min(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers) < 1:
            problems.append("vocab_size, hidden_size, intermediate_size and num_hidden_layers must be positive")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """The paper's 2B or the released 7B configuration."""
        presets = {
            "7b": cls(),
            "2b": cls(hidden_size=2048, intermediate_size=8192),
        }
        key = name.lower()
        if key not in presets:
            raise ValueError(f"unknown preset {name!r}; allowed: {sorted(presets)}")
        return presets[key]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Read the fields we need from an official config.json dict; everything else is ignored."""
        unsupported = []
        if data.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={data['hidden_act']!r} (only 'silu')")
        if data.get("swin_norm", False):
            unsupported.append("swin_norm=true (only the pre-norm layer of the release)")
        if data.get("rope_scaling") not in (None, {}):
            unsupported.append(f"rope_scaling={data['rope_scaling']!r} (only none)")
        if unsupported:
            raise ValueError("config.json asks for features Lumina-mGPT 2.0 does not use: " + ", ".join(unsupported))
        # Absent fields take the official ChameleonConfig class defaults, exactly as the official loader does.
        official_defaults = {
            "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "model_parallel_size": 1, "attention_bias": False,
            "mlp_bias": False, "dropout": 0.0, "z_loss_weight": 1e-5, "initializer_range": 0.02,
        }
        values = {name: data.get(name, default) for name, default in official_defaults.items()}
        values["num_key_value_heads"] = data.get("num_key_value_heads") or values["num_attention_heads"]
        return cls(**values)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ModelConfig":
        """Read `config.json` from an official HF-format checkpoint folder."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json in {Path(folder)}: a Lumina-mGPT 2.0 checkpoint folder holds config.json, "
                "model.safetensors (or model-*.safetensors with model.safetensors.index.json), "
                "tokenizer.json and tokenizer_config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
        return cls.from_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """The official config.json contents (ChameleonForConditionalGeneration) for this configuration."""
        fields = dataclasses.asdict(self)
        return {
            "architectures": ["ChameleonXLLMXForConditionalGeneration"],
            "model_type": "chameleon",
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": None,
            "hidden_act": "silu",
            "mask_image_logits": False,
            "rope_scaling": None,
            "swin_norm": False,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            **fields,
        }
