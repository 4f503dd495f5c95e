"""epts: Elastic Post-Training Sparsity for causal language models."""

from .baselines import prune
from .config import CalibConfig, PruneConfig
from .evaluate import evaluate_ppl
from .importance import Pattern
from .models import LoadedModel, load_model, save_model

__all__ = [
    "CalibConfig",
    "LoadedModel",
    "Pattern",
    "PruneConfig",
    "evaluate_ppl",
    "load_model",
    "prune",
    "save_model",
]
__version__ = "0.1.0"
