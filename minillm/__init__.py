"""minillm: a readable, from-scratch Transformer engine (GPT-style and BERT-style) in PyTorch.

The folders are the stages of a language model's life, in reading order:
    model/      the Transformer itself: config, layers, positions, attention, GPT and BERT
    weights/    weights on disk: the checkpoint format, Hugging Face folders (GPT-2, BERT, Llama, BART)
    data/       corpora, tokenizers, token streams and batches
    train/      the training loop, optimizer, resume, metrics, evaluation
    finetune/   task heads, LoRA, instruction tuning
    compress/   quantization, pruning, distillation
    evaluate/   BLEU, ROUGE, classification metrics
    generate/   sampling and the KV-cache decode loop, beam search, continuous batching
    serve/      the HTTP API and ONNX export
    cli/        the `minillm` command: a thin layer that parses, calls the library and prints
and beside them the pieces every stage shares: files.py (atomic writes), hardware.py (devices,
dtypes, GPU peak figures).
The fast paths live in kernels/ (imported as minillm.kernels).
"""

from minillm.weights.checkpoint import load_model, save_model
from minillm.model import (PRESETS, CausalLM, KVCache, MaskedLM, ModelConfig, MultiHeadAttention,
                           apply_overrides, build_model, count_parameters, flops_per_token,
                           scaled_dot_product_attention)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CausalLM", "KVCache", "MaskedLM", "ModelConfig", "MultiHeadAttention",
    "apply_overrides", "build_model", "count_parameters", "flops_per_token", "load_model",
    "save_model", "scaled_dot_product_attention",
]
