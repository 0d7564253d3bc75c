"""The pack's ComfyUI nodes: thin adapters over lumina_core, one module per node."""
from . import comfy_bridge
from .best_of_n import LuminaMGPT2VerifierBestOfN
from .composer import LuminaMGPT2DualPanelComposer
from .decode import LuminaMGPT2VQDecode
from .loader import LuminaMGPT2Loader
from .lora import LuminaMGPT2LoRA
from .sampler import LuminaMGPT2ARSamplerSJD
from .think_prompt import LuminaMGPT2ThinkPrompt

NODE_CLASS_MAPPINGS = {
    "LuminaMGPT2Loader": LuminaMGPT2Loader,
    "LuminaMGPT2LoRA": LuminaMGPT2LoRA,
    "LuminaMGPT2ThinkPrompt": LuminaMGPT2ThinkPrompt,
    "LuminaMGPT2DualPanelComposer": LuminaMGPT2DualPanelComposer,
    "LuminaMGPT2ARSamplerSJD": LuminaMGPT2ARSamplerSJD,
    "LuminaMGPT2VQDecode": LuminaMGPT2VQDecode,
    "LuminaMGPT2VerifierBestOfN": LuminaMGPT2VerifierBestOfN,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LuminaMGPT2Loader": "Lumina-mGPT 2.0 Loader",
    "LuminaMGPT2LoRA": "Lumina-mGPT 2.0 LoRA",
    "LuminaMGPT2ThinkPrompt": "Lumina-mGPT 2.0 ThinkPrompt",
    "LuminaMGPT2DualPanelComposer": "Lumina-mGPT 2.0 DualPanelComposer",
    "LuminaMGPT2ARSamplerSJD": "Lumina-mGPT 2.0 ARSampler-SJD",
    "LuminaMGPT2VQDecode": "Lumina-mGPT 2.0 VQDecode",
    "LuminaMGPT2VerifierBestOfN": "Lumina-mGPT 2.0 Verifier-BestOfN",
}

# Make models/lumina_mgpt2 known to ComfyUI (and its /models API) as soon as the pack loads.
comfy_bridge.register_model_folder()
