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

The backward dequantizes CHUNK output rows at a time and sums their products,
∂L/∂x = Σ_chunks ∂L/∂y[..., rows] · Ŵ[rows], so a large layer (SmolLM2's tied 49,152 × 576 head, 113 MB
as floats) never needs its whole float matrix and the temporaries of dequantizing it at once.

The forward is the layer's own (its backend: the C kernel on CPU, Triton on CUDA, or the reference).
QuantLinear.forward calls this whenever its input requires a gradient.
"""

from __future__ import annotations

import torch

from minillm.compress.quant_format import dequantize

CHUNK = 4096  # output rows dequantized at once in the backward: 4096 × K floats (9 MB at K = 576)


class QuantLinearFunction(torch.autograd.Function):
    """y = layer(x) forward; ∂L/∂x = ∂L/∂y · Ŵ backward, with Ŵ dequantized on the fly (no grad for the codes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer) -> torch.Tensor:  # (..., K) -> (..., N)
        ctx.layer = layer  # the packed codes, scales and zeros: no float copy of Ŵ is kept
        return layer(x.detach())  # detached: the layer takes its inference path (its backend's kernel)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # (..., N) -> (..., K)
        q = ctx.layer
        grad_x = None
        for n0 in range(0, q.out_features, CHUNK):  # rows n0 .. n0+CHUNK of Ŵ (N, K): codes and scales by row
            rows = slice(n0, n0 + CHUNK)
            zeros = q.zeros[rows] if q.zeros is not None else None
            w = dequantize(q.scheme, q.weight_q[rows], q.scales[rows], zeros, grad_y.dtype)  # (rows, K)
            part = grad_y[..., rows] @ w  # (..., K)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None  # no gradient for the layer (frozen codes)


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """The layer's output, differentiable with respect to x (the codes stay frozen)."""
    return QuantLinearFunction.apply(x, layer)
