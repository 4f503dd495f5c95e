"""epts: Elastic Post-Training Sparsity for causal language models."""

__version__ = "0.1.0"  # before the imports: submodules record it in what they write

from .api import as_loaded, compress, evaluate_ppl, export, prune, zero_shot
from .artifact import ElasticModel
from .config import CalibConfig, EPTSConfig, ExportConfig, PruneConfig, RefitConfig
from .importance import Pattern
from .models import LoadedModel, load_model, save_model
from .runtime import RuntimeModel

__all__ = [
    "CalibConfig",
    "EPTSConfig",
    "ElasticModel",
    "ExportConfig",
    "LoadedModel",
    "Pattern",
    "PruneConfig",
    "RefitConfig",
    "RuntimeModel",
    "as_loaded",
    "compress",
    "evaluate_ppl",
    "export",
    "load_model",
    "prune",
    "save_model",
    "zero_shot",
]
