"""Evaluation: mean loss, perplexity and masked-token accuracy on fixed batches.

Perplexity is exp(mean cross-entropy in nats/token): the number of equally likely tokens the model
is, on average, choosing between. A uniform guess over V tokens scores exactly V, so `log(V)` is the
loss to beat. Every evaluation of a run scores the *same* batches (a generator seeded the same way
each time), so the difference between two evaluations is the model's, not the sampling noise's.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from minillm.data.dataset import get_batch, mask_tokens
from minillm.model.losses import IGNORE_INDEX


@torch.no_grad()
def evaluate(model, tokens, batch_size: int, block_size: int, iters: int, device="cpu",
             generator: torch.Generator | None = None, tokenizer=None, objective: str = "clm",
             autocast=None) -> dict:
    """Mean loss over `iters` random batches; perplexity exp(loss); masked-token accuracy for MLM.

    Pass a generator seeded the same way each time (the default is seed 0) to score every
    evaluation on the same batches: then differences between evaluations are the model's, not noise.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    losses, correct, total = [], 0, 0
    for _ in range(iters):
        x, y = get_batch(tokens, batch_size, block_size, generator=generator)
        if objective == "mlm":
            x, y = mask_tokens(x, tokenizer, generator=generator)
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits, loss = model(x, y)
        losses.append(loss.float())
        if objective == "mlm":
            chosen = y != IGNORE_INDEX
            correct += (logits.argmax(dim=-1)[chosen] == y[chosen]).sum()
            total += chosen.sum()
    model.train(was_training)
    loss = torch.stack(losses).mean().item()
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0))}  # (exp overflows a float past ~709)
    if objective == "mlm":
        out["acc"] = (correct / max(int(total), 1)).item() if total else 0.0
    return out
