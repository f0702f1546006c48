"""Language-model losses, written out: cross-entropy via a stable log-sum-exp.

For logits z over V classes and the true class y:
    -log softmax(z)_y = logsumexp(z) - z_y,   logsumexp(z) = m + log Σ_j exp(z_j - m),  m = max_j z_j
Subtracting the max keeps every exp() ≤ 1, so logits of size 1e4 do not overflow (tested ×1000).
The probabilities themselves, softmax(z)_i = exp(z_i - m) / Σ_j exp(z_j - m), use the same shift.

- causal LM: position t predicts token t+1; `targets` are the inputs shifted left by one
  (`next_token_targets`), the last position has nothing to predict (-100).
- masked LM: only the ~15% chosen positions carry a label; every other position is -100 and ignored.
"""

from __future__ import annotations

import torch

from minillm.data.dataset import IGNORE_INDEX  # -100, the label of positions that do not count (made by data)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x)_i = exp(x_i - m) / Σ_j exp(x_j - m), m = max_j x_j: the same value for any m.

    Choosing the max makes the largest exponent exp(0) = 1, so nothing overflows, and the sum is ≥ 1,
    so nothing divides by 0. Equal to F.softmax, gradients included, even for logits ×1000.
    """
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))  # every entry in [0, 1] (tiny ones round to 0), the max's is 1
    return e / e.sum(dim=dim, keepdim=True)


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log Σ_j exp(x_j) = m + log Σ_j exp(x_j - m), m = max_j x_j (finite even for |x| ~ 1e4)."""
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row: avoid inf - inf
    return (m + torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))).squeeze(dim)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean negative log-likelihood over positions whose target is not `ignore_index`.

    logits (..., V), targets (...) integer class ids. Computed in fp32 whatever the logits' dtype.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))  # a valid index for gather
    nll = logsumexp(logits, dim=-1) - logits.gather(1, safe[:, None]).squeeze(1)  # (N,)
    n = keep.sum()
    # an all-ignored batch has loss 0 (not NaN), and still a graph for backward
    return (nll * keep).sum() / n.clamp_min(1)


def next_token_targets(idx: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, T) inputs -> (B, T) targets: targets[:, t] = idx[:, t+1], the last one ignored."""
    targets = torch.full_like(idx, ignore_index)
    targets[:, :-1] = idx[:, 1:]
    return targets


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V); targets (B, T) where targets[:, t] is the token after position t."""
    return cross_entropy(logits, targets)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V); labels (B, T): the original token at masked positions, -100 elsewhere."""
    return cross_entropy(logits, labels)
