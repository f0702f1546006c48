"""The optimizer and the learning-rate schedule of a GPT training run.

AdamW (Loshchilov & Hutter, 2019) decouples weight decay from the adaptive gradient step:
    m ← β1·m + (1-β1)·g        v ← β2·v + (1-β2)·g²
    θ ← θ - lr·( m̂ / (√v̂ + ε) + λ·θ )          (m̂, v̂ bias-corrected)
Weight decay pulls weights towards 0. It is meant for the matrices that mix features (attention and
FFN projections). Applied to a LayerNorm gain it would pull the gain towards 0, to a bias it buys
nothing, and an embedding row is only updated when its token appears, so decaying it shrinks rare
tokens for no reason. Hence two parameter groups (as in GPT-2/nanoGPT, plus embeddings excluded as in
many later recipes): decay = 2-D weights of Linear layers; no decay = norms, biases, embeddings.
A tied output head IS the token embedding (one tensor), so it is not decayed either.

Schedule (GPT-3 §B, nanoGPT's get_lr): linear warm-up from 0 to learning_rate over warmup_iters,
then a half cosine from learning_rate down to min_lr at lr_decay_iters, then constant min_lr:
    lr(t) = lr_max · (t+1)/(warmup+1)                                    t < warmup
    lr(t) = min_lr + ½(1 + cos(π·(t-warmup)/(decay-warmup)))·(lr_max - min_lr)   warmup ≤ t ≤ decay
Warm-up matters because Adam's second-moment estimate v is noisy for the first steps; a full step
size then can throw the weights somewhere the model never recovers from.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matmul weights) and a non-decayed one (the rest)."""
    # embeddings are found by module type, not by name, so a tied head (same tensor) is caught too
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields each tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float], device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over the two groups; the fused CUDA kernel on GPU (one launch for all tensors)."""
    groups = param_groups(model, weight_decay)
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def lr_at(step: int, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, cosine decay, floor."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step > lr_decay_iters:
        return min_lr
    span = max(1, lr_decay_iters - warmup_iters)
    ratio = (step - warmup_iters) / span  # 0 → 1 over the decay
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 → 0
    return min_lr + coeff * (learning_rate - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Rescale all gradients together so their global L2 norm is ≤ max_norm; returns the norm before.

    One outlier batch can produce a huge gradient; clipping the *global* norm keeps the update's
    direction and only shortens it (Pascanu et al., 2013). max_norm = 0 disables clipping.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm <= 0:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
