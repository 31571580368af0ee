"""mixtral_nb: Mixtral-8x7B on the GPUs people have (Colab T4, 12 GB cards, Kaggle 2xT4).

Quantized experts live in host RAM and an LRU cache of GPU slots; the rest is a stock transformers
``MixtralForCausalLM``. The article's notebook code runs with only its import line changed.
"""

from .build import build_model
from .cache import ExpertCache
from .checkpoint import CheckpointError, NotEnoughDiskError, download, open_checkpoint, quantize, verify
from .config import OffloadConfig, QuantConfig, article_quant_config
from .moe import OffloadedExperts
from .planner import PRESETS, MemoryPlanError, check_fits, detect, plan

__all__ = ["build_model", "ExpertCache", "CheckpointError", "open_checkpoint", "quantize", "OffloadConfig",
           "QuantConfig", "article_quant_config", "OffloadedExperts", "download", "NotEnoughDiskError", "PRESETS",
           "MemoryPlanError", "check_fits", "detect", "plan", "verify"]
__version__ = "0.1.0"
