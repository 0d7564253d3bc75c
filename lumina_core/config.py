"""ModelConfig: the transformer's hyper-parameters, as presets or read from an official config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError, MissingFileError

CONFIG_FILE = "config.json"

# Whole-number fields: (smallest, largest) accepted. The upper bounds are far above any model this
# architecture could be (the release: vocab 171385, hidden 4096, 32 layers, 10240 positions); they
# catch a typo or a unit mistake (1e12) with a message instead of an allocation that fails later.
_INT_RANGES = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 19),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "model_parallel_size": (1, 4096),
}
# Real-number fields: (low, high, whether low itself is allowed).
_FLOAT_RANGES = {
    "rms_norm_eps": (0.0, 1.0, False),
    "rope_theta": (0.0, 1e12, False),
    "dropout": (0.0, 1.0, True),
    "z_loss_weight": (0.0, 1e3, True),
    "initializer_range": (0.0, 1e3, True),
}
_BOOL_FIELDS = ("attention_bias", "mlp_bias")


def config_problems(values: Mapping[str, Any]) -> list[str]:
    """Every problem with these ModelConfig values (types, ranges, head divisibility); empty when valid."""
    problems = []
    for name, (low, high) in _INT_RANGES.items():
        value = values.get(name)
        # bool is an int in Python; true/false in a config is a mistake, never a size.
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append(f"{name} must be a whole number in {low}..{high}, got {value!r}")
    for name, (low, high, low_allowed) in _FLOAT_RANGES.items():
        value = values.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (low <= value <= high if low_allowed else low < value <= high):
            bracket = "[" if low_allowed else "("
            problems.append(f"{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(values.get(name), bool):
            problems.append(f"{name} must be true or false, got {values.get(name)!r}")
    if problems:  # the divisibility rules below need the sizes to be valid numbers
        return problems
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if values["hidden_size"] % heads:
        problems.append(f"hidden_size {values['hidden_size']} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if heads % values["model_parallel_size"]:
        problems.append(f"num_attention_heads {heads} is not a multiple of model_parallel_size "
                        f"{values['model_parallel_size']}")
    return problems


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint folder; a missing, non-UTF-8 or non-JSON file is an InputError naming it."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(
            f"no {CONFIG_FILE} in {Path(folder)}: a Lumina-mGPT 2.0 checkpoint folder holds config.json, "
            "model.safetensors (or model-*.safetensors with model.safetensors.index.json), "
            "tokenizer.json and tokenizer_config.json")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded); "
                         "expected the JSON config.json of a Hugging Face checkpoint") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         "expected the JSON config.json of a Hugging Face checkpoint") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object of model settings, found a JSON {type(data).__name__}")
    return data


def vocabulary_map_of(data: Mapping[str, Any], source: str | Path = CONFIG_FILE) -> dict[str, int] | None:
    """config.json's `vocabulary_map` (token string -> id), checked; None when the file has none."""
    vocabulary_map = data.get("vocabulary_map")
    if vocabulary_map in (None, {}):
        return None
    if not isinstance(vocabulary_map, dict):
        raise InputError(f"{source}: vocabulary_map must be an object {{token: id}}, "
                         f"got a JSON {type(vocabulary_map).__name__}")
    bad = [k for k, v in vocabulary_map.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise InputError(f"{source}: vocabulary_map ids must be whole numbers >= 0; "
                         f"{bad[0]!r} maps to {vocabulary_map[bad[0]]!r}")
    return vocabulary_map


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
        problems = config_problems(dataclasses.asdict(self))
        if problems:
            raise InputError("invalid ModelConfig: " + "; ".join(problems))

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
            raise InputError(f"unknown preset {name!r}; allowed: {sorted(presets)}")
        return presets[key]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "config.json") -> "ModelConfig":
        """Read the fields we need from an official config.json dict (`source` names it in errors); the rest is ignored."""
        unsupported = []
        if data.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={data['hidden_act']!r} (only 'silu')")
        if data.get("swin_norm", False):
            unsupported.append("swin_norm=true (only the pre-norm layer of the release)")
        if data.get("rope_scaling") not in (None, {}):
            unsupported.append(f"rope_scaling={data['rope_scaling']!r} (only none)")
        if unsupported:
            raise InputError(f"{source} asks for features Lumina-mGPT 2.0 does not use: " + ", ".join(unsupported))
        # Absent fields take the official ChameleonConfig class defaults, exactly as the official loader does.
        official_defaults = {
            "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "model_parallel_size": 1, "attention_bias": False,
            "mlp_bias": False, "dropout": 0.0, "z_loss_weight": 1e-5, "initializer_range": 0.02,
        }
        values = {name: data.get(name, default) for name, default in official_defaults.items()}
        # Absent (or null, as HF writes it) means one KV head per attention head; an explicit 0 is an error.
        kv_heads = data.get("num_key_value_heads")
        values["num_key_value_heads"] = values["num_attention_heads"] if kv_heads is None else kv_heads
        problems = config_problems(values)
        if problems:
            raise InputError(f"{source}: " + "; ".join(problems))
        return cls(**values)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ModelConfig":
        """Read `config.json` from an official HF-format checkpoint folder."""
        return cls.from_dict(read_config_json(folder), Path(folder) / CONFIG_FILE)

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
