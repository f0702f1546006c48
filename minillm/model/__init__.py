"""The model: every line that turns token ids into logits, written out.

Read in this order, the order the pieces are built in:
    config.py        ModelConfig: every architectural choice, presets as plain data
    layers.py        LayerNorm, RMSNorm, activations, the feed-forward network
    positional.py    sinusoidal, learned and rotary (RoPE) positions
    attention.py     scaled dot-product attention, multi-head attention, the KV cache
    flash.py         the same attention tiled, FlashAttention-2 in plain PyTorch (the step to kernels/)
    transformer.py   Block, Transformer, CausalLM (GPT-style), MaskedLM (BERT-style, + next-sentence head)
    heads.py         SequenceClassifier: a label per sequence from [CLS], the last token, or the mean
    losses.py        softmax and cross-entropy for next-token and masked-token prediction
    seq2seq.py       the paper's encoder–decoder: cross-attention, label smoothing, its lr schedule
    builtin_ops.py   the same layers swapped for PyTorch's fused kernels (same parameters); for_inference

Weights files (minillm's checkpoints, Hugging Face folders) are read and written in minillm/weights/.
"""

from minillm.model.attention import KVCache, MultiHeadAttention, scaled_dot_product_attention
from minillm.model.config import PRESETS, ModelConfig, apply_overrides
from minillm.model.transformer import (Block, CausalLM, MaskedLM, Transformer, build_model, count_parameters,
                                       flops_per_token)

__all__ = ["PRESETS", "Block", "CausalLM", "KVCache", "MaskedLM", "ModelConfig", "MultiHeadAttention",
           "Transformer", "apply_overrides", "build_model", "count_parameters", "flops_per_token",
           "scaled_dot_product_attention"]
