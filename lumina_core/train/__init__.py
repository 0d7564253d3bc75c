"""Fine-tuning Lumina-mGPT 2.0: `python -m lumina_core.train prepare | fit | export` (FSDP2 under torchrun)."""
from __future__ import annotations

from .checkpoint import latest_checkpoint
from .export import export_official
from .data import PrepareSummary, SampleOrder, TokenDataset, make_sample, prepare
from .loop import FitOptions, FitResult, causal_lm_loss, fit

__all__ = ["prepare", "PrepareSummary", "TokenDataset", "SampleOrder", "make_sample", "fit", "FitOptions",
           "FitResult", "causal_lm_loss", "export_official", "latest_checkpoint"]
