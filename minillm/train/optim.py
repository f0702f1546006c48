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


class AdamW(torch.optim.Optimizer):
    """AdamW written out (Loshchilov & Hutter, 2019), step for step the update torch.optim.AdamW makes.

    Per parameter θ with gradient g, at step t = 1, 2, ...:
        θ ← θ·(1 - lr·λ)                        decoupled weight decay: not part of g, so not rescaled by Adam
        m ← β1·m + (1-β1)·g                     first moment: a running mean of the gradient
        v ← β2·v + (1-β2)·g²                    second moment: a running mean of its square
        m̂ = m / (1-β1ᵗ),  v̂ = v / (1-β2ᵗ)       bias correction: m, v start at 0, so early means are too small
        θ ← θ - lr · m̂ / (√v̂ + ε)
    The state per parameter is what torch keeps, under torch's names ("step", "exp_avg", "exp_avg_sq"),
    all tensors, so a checkpoint's optimizer state (train/state.py) reads the same for both.
    The float operations are ordered as in torch's single-tensor (CPU) path, so on CPU the two agree
    to the last bit (tests/test_optim.py); torch's fused CUDA kernel rounds differently.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue  # a parameter unused this step keeps its weights and its moments
                g = p.grad
                state = self.state[p]
                if not state:  # lazily, on the first step that has a gradient (as torch does)
                    state["step"] = torch.tensor(0.0)  # a tensor, like torch's: checkpoints store it as one
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # v
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"].item()
                if wd != 0:
                    p.mul_(1 - lr * wd)  # θ ← θ(1 - lr·λ), before and apart from the Adam step
                m.lerp_(g, 1 - beta1)  # m + (1-β1)(g - m) = β1·m + (1-β1)·g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # β2·v + (1-β2)·g²
                bias_correction1 = 1 - beta1 ** t
                bias_correction2 = 1 - beta2 ** t
                # lr·m̂/(√v̂ + ε) = (lr/(1-β1ᵗ)) · m / (√v/√(1-β2ᵗ) + ε): corrections folded into scalars
                step_size = lr / bias_correction1
                denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)  # √v̂ + ε
                p.addcdiv_(m, denom, value=-step_size)  # θ ← θ - step_size · m / denom
        return loss


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float], device_type: str = "cpu",
                   readable: bool = False) -> torch.optim.Optimizer:
    """AdamW over the two groups: torch's (the fused CUDA kernel on GPU, one launch for all tensors),
    or with `readable=True` the written-out `AdamW` above (the same numbers on CPU, slower on GPU)."""
    groups = param_groups(model, weight_decay)
    if readable:
        return AdamW(groups, lr=learning_rate, betas=betas)
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
        ‖g‖ = √(Σ_p ‖g_p‖²)          every parameter's gradient seen as one long vector
        g_p ← g_p · min(1, max_norm / (‖g‖ + 1e-6))
    Written out as torch.nn.utils.clip_grad_norm_ computes it (the same numbers, tests/test_optim.py).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # the norm of the per-tensor norms is the norm of everything: √(Σ_p ‖g_p‖²)
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_norm <= 0:
        return total_norm
    # +1e-6 keeps a zero gradient from dividing by 0; the clamp makes a small gradient pass unchanged.
    # Multiplying by a tensor (not `if norm > max_norm`) needs no GPU→CPU sync to decide.
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total_norm
