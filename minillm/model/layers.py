"""Normalisation and feed-forward layers, written out.

LayerNorm (Ba et al., 2016) centres and scales each token's features; RMSNorm (Zhang & Sennrich,
2019) only rescales by the root-mean-square, which is cheaper and what Llama uses. The FFN is the
position-wise two-layer network of "Attention Is All You Need", FFN(x) = act(x W1 + b1) W2 + b2,
with the activations used by the models minillm reproduces: ReLU (original Transformer), GELU
(BERT, exact erf form), GELU-tanh (GPT-2's approximation) and SwiGLU (Shazeer, 2020; Llama).

Layers plug in through one factory each, `make_norm(cfg)` and `make_ffn(cfg)` (like litgpt's
`mlp_class_name`): a new kind of FFN (a mixture of experts, say) is a new branch there, and code
outside the FFN never reads its weights by name. A decode step that wants the FFN without the
module machinery asks it for `bound_forward()` (minillm/generate/flat.py).

Each piece is tested against its PyTorch twin in tests/test_layers.py.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model.config import ModelConfig


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 even under bf16 autocast
        mean = xf.mean(dim=-1, keepdim=True)
        var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        y = y.to(x.dtype) * self.weight.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight — no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """drop(x) while training. In eval mode dropout is the identity, so even the module call is
    skipped: decoding a small model one token at a time is bound by such per-call overheads."""
    return drop(x) if drop.training and drop.p > 0 else x


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm `cfg.norm` asks for: RMSNorm, or LayerNorm (with a bias when cfg.bias)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# --- activations -----------------------------------------------------------------------------

def relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0.0)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: x·Φ(x), with Φ the standard normal CDF = ½(1 + erf(x/√2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation: ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish: x·σ(x), the gate inside SwiGLU."""
    return x * torch.sigmoid(x)


ACTIVATION_FNS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}

# PyTorch's fused twin of each activation above: the same function in one kernel instead of ~5
# elementwise ones (tests/test_layers.py holds each pair equal). `FeedForward.use_fused_activation`
# swaps one in; model/builtin_ops.py does it for a whole model.
FUSED_ACTIVATIONS = {relu: F.relu, gelu: F.gelu, gelu_tanh: functools.partial(F.gelu, approximate="tanh"),
                     silu: F.silu}


class FeedForward(nn.Module):
    """Position-wise FFN: C → hidden → C.

    Plain:  down(act(up(x)))
    SwiGLU: down(silu(gate(x)) * up(x))   — a third matrix gates the hidden units.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.act = silu if self.swiglu else ACTIVATION_FNS[cfg.activation]
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)
        self.down.is_residual_proj = True  # scaled at init, see model.init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.swiglu:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))

    def use_fused_activation(self) -> None:
        """Swap the written-out activation for PyTorch's fused twin (`FUSED_ACTIVATIONS`), in place.
        The weights are untouched; an activation without a twin (or already fused) stays as it is."""
        self.act = FUSED_ACTIVATIONS.get(self.act, self.act)

    def bound_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> self(x) as one plain function, with the weights as they are now bound into it:
        the same ops in the same order as `forward` (so the same bits), without nn.Module.__call__
        and attribute look-ups on every call. What a flat decode step runs (generate/flat.py)."""
        up, down, act = bound_forward(self.up), bound_forward(self.down), self.act
        if self.gate is None:
            return lambda x: down(act(up(x)))
        gate = bound_forward(self.gate)
        return lambda x: down(act(gate(x)) * up(x))


def make_ffn(cfg: ModelConfig) -> nn.Module:
    """The position-wise FFN of a block: the one place that says which FFN a config gets."""
    return FeedForward(cfg)


def bound_forward(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> m(x) with m's weights bound now: F.linear / F.layer_norm / F.rms_norm for PyTorch's own
    layers (exactly what their forward calls), the step a layer binds itself where it has a
    `bound_forward()` (a QuantLinear on the C backends: the kernel's call, the same bits), the
    module's own bound `forward` for anything else (a LoRA linear, minillm's written-out norms).
    Forward hooks do not fire: callers check for them (generate/flat.py steps aside when a model
    has any)."""
    if type(m) is nn.Linear:
        w, b = m.weight, m.bias
        return lambda x: F.linear(x, w, b)
    if type(m) is nn.LayerNorm:
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(m) is nn.RMSNorm:
        shape, w, eps = m.normalized_shape, m.weight, m.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    if hasattr(type(m), "bound_forward"):  # a layer that binds its own step (QuantLinear's C kernel)
        return m.bound_forward()
    return m.forward


class Pooler(nn.Module):
    """BERT's pooler: one vector for the whole sequence, tanh(W·h_[CLS] + b).

    [CLS] is the first token of every BERT input; through attention it sees the whole sequence, and
    pre-training's next-sentence task teaches it to summarise the pair. The pooled vector feeds the
    NSP head, and later a fine-tuned classifier (Devlin et al. 2019, §3 and Figure 1).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, C)
        return torch.tanh(self.dense(h[:, 0]))  # position 0 holds [CLS]
