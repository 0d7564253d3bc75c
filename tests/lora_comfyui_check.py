"""Run by tests/test_lora.py (comfyui marker) with ComfyUI's python: the LoRA node through ComfyUI's own
ModelPatcher and model management (CPU), printing one JSON line of findings.

    COMFYUI_PATH=/path/to/ComfyUI python tests/lora_comfyui_check.py MODEL_FOLDER MODELS_DIR

MODELS_DIR holds loras/fox/adapter_model.safetensors (a peft adapter for MODEL_FOLDER).
"""
from __future__ import annotations

import importlib.util
import importlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    model_folder, models_dir = sys.argv[1], sys.argv[2]
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it
    import comfy.model_management as mm  # noqa: F401  (ComfyUI's memory manager in this process)
    import folder_paths
    import torch

    folder_paths.add_model_folder_path("loras", str(Path(models_dir) / "loras"))
    spec = importlib.util.spec_from_file_location("workflow_tools", REPO / "tests" / "workflow_tools.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    pack = tools.import_pack()
    core = importlib.import_module(pack.__name__ + ".lumina_core.pipeline")
    bridge = importlib.import_module(pack.__name__ + ".nodes.comfy_bridge")
    lora = importlib.import_module(pack.__name__ + ".lumina_core.lora")
    assert bridge.in_comfyui()

    pipe = core.LuminaPipeline.from_pretrained(model_folder, device="cpu", dtype=torch.float32)
    bridge.manage(pipe)
    transformer = pipe.transformer
    q_proj = transformer.model.layers[0].self_attn.q_proj
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    node = pack.NODE_CLASS_MAPPINGS["LuminaMGPT2LoRA"]()
    name = "fox/adapter_model.safetensors"
    assert name in node.INPUT_TYPES()["required"]["lora_name"][0]
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(p):
        # What the sampler node does first (load through ComfyUI), then a forward without re-installing.
        bridge.load_on_device(p)
        with torch.no_grad():
            return transformer(ids)

    base = logits(pipe)
    (adapted,) = node.apply(pipe, name, 1.0)
    adapted_logits = logits(adapted)
    patched_is_lora = isinstance(transformer.model.layers[0].self_attn.q_proj, lora.LoraLinear)
    reference = core.LuminaPipeline.from_pretrained(model_folder, device="cpu", dtype=torch.float32)
    reference.load_lora(Path(models_dir) / "loras" / "fox", 1.0)
    with torch.no_grad():
        lumina_core_logits = reference.transformer(ids)
    (weaker,) = node.apply(pipe, name, 0.25)
    weaker_logits = logits(weaker)
    back = logits(pipe)  # the node "removed": the base pipe loads again
    result = {
        "patched_is_lora": patched_is_lora,
        "lora_matches_lumina_core": float((adapted_logits - lumina_core_logits).abs().max()),
        "strength_change_differs": float((weaker_logits - adapted_logits).abs().max()),
        "base_restored": transformer.model.layers[0].self_attn.q_proj is q_proj and bool(torch.equal(back, base)),
        "base_weights_unchanged": all(torch.equal(v, weights[k]) for k, v in transformer.state_dict().items()),
        "adapter_effect": float((adapted_logits - base).abs().max()),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
