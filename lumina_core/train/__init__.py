"""Fine-tuning Lumina-mGPT 2.0: `python -m lumina_core.train prepare | fit | export` (FSDP2 under torchrun)."""
from __future__ import annotations

from .checkpoint import latest_checkpoint
from .export import export_official
from .data import PrepareSummary, prepare
from .loop import FitResult, causal_lm_loss, fit
from .options import FitOptions
from .stream import SampleOrder, TokenDataset, make_sample

__all__ = ["prepare", "PrepareSummary", "TokenDataset", "SampleOrder", "make_sample", "fit", "FitOptions",
           "FitResult", "causal_lm_loss", "export_official", "latest_checkpoint"]
