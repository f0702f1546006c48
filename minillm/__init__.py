"""minillm: a readable, from-scratch Transformer engine (GPT-style and BERT-style) in PyTorch.

Start reading at minillm/model.py; the fast paths live in kernels/ (imported as minillm.kernels).
"""

from .attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from .config import PRESETS, ModelConfig, apply_overrides
from .model import CausalLM, MaskedLM, build_model, count_parameters, flops_per_token

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CausalLM", "KVCache", "MaskedLM", "ModelConfig", "MultiHeadAttention",
    "apply_overrides", "build_model", "count_parameters", "flops_per_token",
    "scaled_dot_product_attention",
]
