"""A module swap for speed: PyTorch's fused built-ins in place of minillm's written-out layers.

minillm's norms, activations and loss are written out op by op (layers.py, losses.py) so a reader
sees the math; each is tested equal to its PyTorch twin. Written out, LayerNorm is ~8 elementwise
kernels and GELU ~5, each reading and writing the whole activation tensor, and autograd records
every one for backward. PyTorch's `F.layer_norm`, `F.gelu` and `F.cross_entropy` do the same math
in one kernel each (with a hand-written backward). On a CPU that is ~20-30% of a small GPT's
training step (measured on the shakespeare-char CPU recipe; see bench/convergence.py).

`use_builtin_ops(model)` swaps, in place and explicitly (in the style of gpt-fast's
`replace_linear_weight_only_int8_per_channel`):
    minillm LayerNorm  -> nn.LayerNorm      (same weight/bias Parameters: optimizer and checkpoints
    minillm RMSNorm    -> nn.RMSNorm         are unaffected, state_dict keys are unchanged)
    FFN activation     -> F.relu / F.gelu / F.gelu(approximate="tanh") / F.silu  (the FFN swaps its
                                             own: FeedForward.use_fused_activation)
and `builtin_loss` is `F.cross_entropy` over (B·T, V) with the same ignore index (-100).
Training uses it with `--builtin_ops=true`; the model saved is the same model.

`for_inference(model)` is how `minillm generate` and `minillm serve` run a loaded checkpoint (unless
`--readable`): the same swap, plus PyTorch's fused attention (`attention="sdpa"`) where the model
was built with the written-out one. Decoding a small model on a CPU is bound by per-op overhead,
not arithmetic, so one kernel instead of eight per LayerNorm is most of the difference between
running at nanoGPT's speed and well above it (bench/decode.py measures both).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model.config import ModelConfig
from minillm.model.layers import FeedForward, LayerNorm, RMSNorm
from minillm.model.losses import IGNORE_INDEX


def _builtin_norm(norm: nn.Module) -> nn.Module:
    dim = norm.weight.shape[0]
    if isinstance(norm, LayerNorm):
        new = nn.LayerNorm(dim, eps=norm.eps, bias=norm.bias is not None)
        if norm.bias is not None:
            new.bias = norm.bias
    else:
        new = nn.RMSNorm(dim, eps=norm.eps)
    new.weight = norm.weight  # the very same Parameter: nothing to copy, nothing to re-register
    return new.to(norm.weight.device)


def use_builtin_ops(model: nn.Module) -> nn.Module:
    """Swap written-out norms and activations for PyTorch's fused ones, in place; returns model."""
    for module in list(model.modules()):
        if isinstance(module, FeedForward):
            module.use_fused_activation()  # the FFN swaps its own activation: its insides stay its own
        for name, child in list(module.named_children()):
            if isinstance(child, (LayerNorm, RMSNorm)):
                setattr(module, name, _builtin_norm(child))
    return model


def for_inference(model: nn.Module, attention: bool = True) -> nn.Module:
    """use_builtin_ops, and (attention=True) attention "naive" -> "sdpa" (tested equal); in place,
    returns model. A Triton attention stays Triton."""
    use_builtin_ops(model)
    if not attention:
        return model
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, ModelConfig) and cfg.attention == "naive":
            cfg.attention = "sdpa"
    return model


def builtin_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy over every position: logits (B, T, V), targets (B, T) with -100 = ignore."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
