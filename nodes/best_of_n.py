"""Verifier-BestOfN: IMAGE batch (+ the request) -> the best image, all images best first, and the score table."""
from __future__ import annotations

import json

import torch

from ..lumina_core.verify import VERIFIER_SETS, get_verifier, judge, parse_weights, verifier_names
from . import comfy_bridge as bridge
from .common import CATEGORY, REQUEST, NodeInputError

__all__ = ["LuminaMGPT2VerifierBestOfN", "parse_weights", "verifier_dirs"]


def verifier_dirs() -> list:
    """Where verifier weights are looked for first, and downloaded to: models/lumina_mgpt2/verifiers/."""
    return [base / "verifiers" for base in bridge.model_dirs()]


class LuminaMGPT2VerifierBestOfN:
    """Scores every image of a batch against the prompt and keeps the best (rank-average of the verifiers)."""

    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("best", "sorted", "scores")
    OUTPUT_TOOLTIPS = ("The best image.", "All images, best first.", "Score table as JSON (one row per image).")
    DESCRIPTION = ("Best-of-N selection: generate several candidates (ARSampler batch_size), score them with "
                   "verifier models, keep the best. Verifier weights go in models/lumina_mgpt2/verifiers/ or "
                   "the Hugging Face cache.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """images, prompt, verifier set, weights, method, auto_download, unload_after; optional request."""
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The candidates (e.g. VQDecode's image output of a batch)."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to judge against. "
                                      "Empty: the connected request's prompt (typed once, in the Composer)."}),
                "verifiers": (list(VERIFIER_SETS), {"default": "pickscore+aesthetic", "tooltip": "Models that "
                              "score the images: pickscore (preference), clipscore/vqascore (prompt alignment), "
                              "aesthetic (LAION v2), demo_check (the demo model's pixel checker, no weights)."}),
                "weights": ("STRING", {"default": "", "placeholder": "e.g. vqascore=2, aesthetic=0.5 (empty: equal)",
                                       "tooltip": "Weight of each verifier in the combined ranking, as "
                                       "name=number; verifiers not named weigh 1."}),
                "method": (["rank", "zscore"], {"default": "rank", "tooltip": "rank: average of each verifier's "
                                                "rank (scale-free); zscore: average of standardised scores."}),
                "auto_download": ("BOOLEAN", {"default": False, "tooltip": "Download missing verifier weights "
                                  "from the Hugging Face Hub into models/lumina_mgpt2/verifiers/ (GBs for vqascore)."}),
                "unload_after": ("BOOLEAN", {"default": True, "tooltip": "Free the verifier models after scoring."}),
            },
            "optional": {
                "request": (REQUEST, {"tooltip": "The Composer's request: its prompt is judged when the prompt "
                                      "above is empty, and only the generated lower panel of reference tasks."}),
            },
        }

    def select(self, images: torch.Tensor, prompt: str, verifiers: str, weights: str, method: str,
               auto_download: bool, unload_after: bool, request=None) -> dict:
        """Score, rank, return best / sorted / JSON; show score badges on the node."""
        if verifiers not in VERIFIER_SETS:
            raise NodeInputError(f"verifiers {verifiers!r} is not one of {list(VERIFIER_SETS)}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
            raise NodeInputError("images must be a ComfyUI IMAGE batch [N, H, W, 3]")
        names = verifier_names(verifiers)
        parsed = parse_weights(weights, names)
        built = {name: get_verifier(name, verifier_dirs(), bool(auto_download), bridge.torch_device())
                 for name in names}
        try:
            _, ranking = judge(images.permute(0, 3, 1, 2).float().clamp(0, 1), built, request, prompt,
                               parsed or None, method)
        finally:
            if unload_after:
                for verifier in built.values():
                    verifier.unload()
                bridge.free_cache()
        table = sorted(ranking.table, key=lambda row: row["place"])
        text = json.dumps({"best_index": ranking.best_index, "method": method, "verifiers": names,
                           "weights": {n: parsed.get(n, 1.0) for n in names}, "candidates": table}, indent=1)
        best = images[ranking.best_index:ranking.best_index + 1]
        order = torch.tensor(ranking.order, dtype=torch.long)
        return {"ui": {"lumina_scores": table, "text": [text]}, "result": (best, images[order], text)}
