"""epts: Elastic Post-Training Sparsity for causal language models."""

__version__ = "0.1.0"  # before the imports: submodules record it in what they write

from .artifact import ElasticModel
from .baselines import prune
from .config import CalibConfig, EPTSConfig, PruneConfig
from .evaluate import evaluate_ppl
from .importance import Pattern
from .models import LoadedModel, load_model, save_model
from .reconstruct import compress

__all__ = [
    "CalibConfig",
    "EPTSConfig",
    "ElasticModel",
    "LoadedModel",
    "Pattern",
    "PruneConfig",
    "compress",
    "evaluate_ppl",
    "load_model",
    "prune",
    "save_model",
]
