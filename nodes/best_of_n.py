"""Verifier-BestOfN: IMAGE batch + prompt -> the best image, all images best first, and the score table."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from . import comfy_bridge as bridge
from .common import CATEGORY, NodeInputError

logger = logging.getLogger(__name__)

# Verifier name -> (Hugging Face repo of its weights, what it judges). The repos are fixed here, never
# taken from a workflow; a copy in models/lumina_mgpt2/verifiers/<repo name> is used first.
VERIFIER_MODELS = {
    "clipscore": ("openai/clip-vit-large-patch14", "prompt alignment (CLIP, 100 x cosine)"),
    "pickscore": ("yuvalkirstain/PickScore_v1", "human preference (PickScore)"),
    "aesthetic": ("openai/clip-vit-large-patch14", "LAION aesthetic predictor v2"),
    "vqascore": ("Qwen/Qwen2.5-VL-7B-Instruct", "prompt alignment (VQAScore, P('Yes'))"),
    "demo_check": (None, "pixel checker for the procedural demo model (no weights)"),
}
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_HEAD = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
VERIFIER_SETS = {
    "clipscore": ["clipscore"],
    "pickscore": ["pickscore"],
    "aesthetic": ["aesthetic"],
    "vqascore": ["vqascore"],
    "pickscore+aesthetic": ["pickscore", "aesthetic"],
    "clipscore+aesthetic": ["clipscore", "aesthetic"],
    "vqascore+pickscore+aesthetic": ["vqascore", "pickscore", "aesthetic"],
    "demo_check": ["demo_check"],
}
_WEIGHT_RE = re.compile(r"^\s*([a-z_]+)\s*[=:]\s*([0-9]*\.?[0-9]+)\s*$")


def parse_weights(text: str, names: list[str]) -> dict[str, float]:
    """'vqascore=2, aesthetic=0.5' -> {name: weight}; unnamed verifiers weigh 1; unknown names are an error."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").replace(";", ",").split(","))):
        match = _WEIGHT_RE.match(part)
        if not match:
            raise NodeInputError(f"cannot read weight {part!r}: write name=number, e.g. 'vqascore=2, aesthetic=0.5'")
        name, value = match.group(1), float(match.group(2))
        if name not in names:
            raise NodeInputError(f"weight for {name!r}, which is not among the chosen verifiers {names}")
        weights[name] = value
    if weights and sum(weights.get(n, 1.0) for n in names) <= 0:
        raise NodeInputError("the weights must not all be 0")
    return weights


def _verifier_dirs() -> list[Path]:
    return [Path(base) / "verifiers" for base in bridge.model_dirs()]


def _local_copy(repo: str, auto_download: bool) -> str:
    """models/lumina_mgpt2/verifiers/<repo name> when present (downloaded there when allowed), else the repo id."""
    name = repo.split("/")[-1]
    for base in _verifier_dirs():
        if (base / name).is_dir():
            return str(base / name)
    if auto_download and _verifier_dirs():
        from huggingface_hub import snapshot_download

        from ..lumina_core.verify.base import MODEL_FILE_PATTERNS

        # Into ComfyUI's model folder, not a cache elsewhere: the pack writes only under models/.
        target = _verifier_dirs()[0] / name
        logger.info("Verifier-BestOfN: downloading %s to %s", repo, target)
        snapshot_download(repo, local_dir=str(target), allow_patterns=MODEL_FILE_PATTERNS)
        return str(target)
    return repo  # outside ComfyUI: the Hugging Face cache


def _local_file(spec: str, auto_download: bool) -> str:
    """'owner/repo/file' -> models/lumina_mgpt2/verifiers/<file> when present (downloaded there when allowed)."""
    owner, repo, filename = spec.split("/", 2)
    for base in _verifier_dirs():
        if (base / filename).is_file():
            return str(base / filename)
    if auto_download and _verifier_dirs():
        from huggingface_hub import hf_hub_download

        return hf_hub_download(f"{owner}/{repo}", filename, local_dir=str(_verifier_dirs()[0]))
    return spec


def make_verifier(name: str, device: torch.device, auto_download: bool) -> Any:
    """Build one verifier by its name in VERIFIER_MODELS (weights load on first score)."""
    from ..lumina_core.verify.clip import AestheticVerifier, ClipSimilarityVerifier
    from ..lumina_core.verify.pixels import DemoCheckVerifier
    from ..lumina_core.verify.vqascore import VQAScoreVerifier

    if name == "demo_check":
        return DemoCheckVerifier(device=device)
    if name not in VERIFIER_MODELS:
        raise NodeInputError(f"unknown verifier {name!r}; allowed: {sorted(VERIFIER_MODELS)}")
    source = _local_copy(VERIFIER_MODELS[name][0], auto_download)
    common = {"device": device, "auto_download": auto_download}
    if name == "clipscore":
        return ClipSimilarityVerifier(source, scale=100.0, name="clipscore", **common)
    if name == "pickscore":
        return ClipSimilarityVerifier(source, processor=_local_copy(PICKSCORE_PROCESSOR, auto_download),
                                      name="pickscore", **common)
    if name == "aesthetic":
        return AestheticVerifier(source, head=_local_file(AESTHETIC_HEAD, auto_download), **common)
    return VQAScoreVerifier(source, **common)


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
        """images, prompt, verifier set, weights, method, auto_download, unload_after."""
        return {
            "required": {
                "images": ("IMAGE",),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt to judge "
                                      "against (the user's own prompt, not the refined one)."}),
                "verifiers": (list(VERIFIER_SETS), {"default": "pickscore+aesthetic"}),
                "weights": ("STRING", {"default": "", "placeholder": "e.g. vqascore=2, aesthetic=0.5 (empty: equal)"}),
                "method": (["rank", "zscore"], {"default": "rank", "tooltip": "rank: average of each verifier's "
                                                "rank (scale-free); zscore: average of standardised scores."}),
                "auto_download": ("BOOLEAN", {"default": False}),
                "unload_after": ("BOOLEAN", {"default": True, "tooltip": "Free the verifier models after scoring."}),
            }
        }

    def select(self, images: torch.Tensor, prompt: str, verifiers: str, weights: str, method: str,
               auto_download: bool, unload_after: bool) -> dict:
        """Score, rank, return best / sorted / JSON; show score badges on the node."""
        from ..lumina_core.verify.best_of_n import score_candidates

        if verifiers not in VERIFIER_SETS:
            raise NodeInputError(f"verifiers {verifiers!r} is not one of {list(VERIFIER_SETS)}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
            raise NodeInputError("images must be a ComfyUI IMAGE batch [N, H, W, 3]")
        names = VERIFIER_SETS[verifiers]
        parsed = parse_weights(weights, names)
        device = bridge.torch_device()
        built = {name: make_verifier(name, device, bool(auto_download)) for name in names}
        pixels = images.permute(0, 3, 1, 2).float().clamp(0, 1)
        try:
            scores, ranking = score_candidates(pixels, prompt, built, parsed or None, method)
        finally:
            if unload_after:
                for verifier in built.values():
                    verifier.unload()
                bridge.free_cache()
        order = torch.tensor(ranking.order, dtype=torch.long)
        table = sorted(ranking.table, key=lambda row: row["place"])
        text = json.dumps({"best_index": ranking.best_index, "method": method, "verifiers": names,
                           "weights": {n: parsed.get(n, 1.0) for n in names}, "candidates": table}, indent=1)
        best = images[ranking.best_index:ranking.best_index + 1]
        return {"ui": {"lumina_scores": table, "text": [text]}, "result": (best, images[order], text)}
