"""The gradient through a frozen quantized linear layer, with Ŵ recomputed in the backward, never kept.

QLoRA (Dettmers et al. 2023, finetune/qlora.py) trains adapters beside layers whose weights stay
packed in 4 bits. The codes get no gradient (they are frozen, and integers), but the activations
must: an adapter in block 3 learns from the loss only through blocks 4..L, so the gradient has to
flow back through every quantized layer on the way. For y = x Ŵᵀ + b:

    ∂L/∂x = ∂L/∂y · Ŵ          (..., N) @ (N, K) -> (..., K)

Autograd could do this by itself (F.linear on the dequantized Ŵ), but it would then *save* Ŵ for
the backward: one float copy of every layer, alive from its forward to its backward — the fp32
model again, which is exactly the memory QLoRA exists to avoid. This Function saves nothing but a
reference to the layer (whose packed codes are there anyway) and dequantizes Ŵ again in the
backward, one layer at a time: a little more arithmetic, float memory of one layer at a time.

The forward is the layer's own (its backend: the C kernel on CPU, Triton on CUDA, or the reference).
QuantLinear.forward calls this whenever its input requires a gradient.
"""

from __future__ import annotations

import torch


class QuantLinearFunction(torch.autograd.Function):
    """y = layer(x) forward; ∂L/∂x = ∂L/∂y · Ŵ backward, with Ŵ dequantized on the fly (no grad for the codes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer) -> torch.Tensor:  # (..., K) -> (..., N)
        ctx.layer = layer  # the packed codes, scales and zeros: no float copy of Ŵ is kept
        return layer(x.detach())  # detached: the layer takes its inference path (its backend's kernel)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # (..., N) -> (..., K)
        w = ctx.layer.dequantized_weight(grad_y.dtype)  # (N, K), freed when this returns
        return grad_y @ w, None  # no gradient for the layer (frozen codes)


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """The layer's output, differentiable with respect to x (the codes stay frozen)."""
    return QuantLinearFunction.apply(x, layer)
