"""A compact training loop for compression: the fine-tune after pruning, and distillation.

The full trainer (minillm/train/loop.py) owns checkpoints, resumption, DDP and mixed precision; a
compression step needs none of that, only "take N optimizer steps on this model with this loss":

    for t in range(iters):
        x, y   = next batch (random windows of the training text; BERT-masked for a masked LM)
        loss   = loss_fn(model, x, y, t)          default: the model's own cross-entropy
        loss.backward();  clip ‖g‖ ≤ 1;  lr = warm-up + cosine (train/optim.py);  AdamW step
        after_step(model, t)                      e.g. re-apply pruning masks: W ← W ⊙ M

It reuses the trainer's optimizer, schedule and evaluation, so a fine-tuned model is comparable
with one trained by `minillm train`.
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.data.dataset import get_batch, load_text, mask_tokens, split_text
from minillm.train.evaluate import evaluate
from minillm.train.optim import clip_grad_norm, lr_at, make_optimizer, set_lr


def text_tokens(source: str, tokenizer, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token ids of `source`, split as training splits it, encoded with `tokenizer`
    (the checkpoint's own, so ids mean what the model learned)."""
    train_text, val_text = split_text(load_text(source), val_fraction)
    return tuple(np.asarray(tokenizer.encode(t), dtype=np.int64) for t in (train_text, val_text))


def batches(tokens, batch_size: int, block_size: int, generator: torch.Generator, device="cpu",
            objective: str = "clm", tokenizer=None):
    """An endless stream of (x, y) training batches; masked-LM batches get BERT's 80/10/10 corruption."""
    while True:
        x, y = get_batch(tokens, batch_size, block_size, generator=generator)
        if objective == "mlm":
            x, y = mask_tokens(x, tokenizer, generator=generator)
        yield x.to(device), y.to(device)


def finetune(model, train_tokens, iters: int, *, batch_size: int = 12, block_size: int | None = None,
             learning_rate: float = 3e-4, min_lr: float | None = None, warmup_iters: int = 10,
             weight_decay: float = 0.1, grad_clip: float = 1.0, loss_fn=None, after_step=None,
             objective: str = "clm", tokenizer=None, device="cpu", seed: int = 1337) -> list[float]:
    """Train `model` in place for `iters` AdamW steps; returns the loss of every step.

    loss_fn(model, x, y, step) -> scalar loss (default: the model's cross-entropy, model(x, y)[1]).
    after_step(model, step) runs after each optimizer step (masks, gradual pruning schedules).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if objective == "mlm" and tokenizer is None:
        raise ValueError("a masked LM is fine-tuned on masked batches: pass its tokenizer")
    block_size = block_size or model.cfg.block_size
    min_lr = learning_rate / 10 if min_lr is None else min_lr  # Chinchilla's floor, as in train/config.py
    optimizer = make_optimizer(model, learning_rate, weight_decay, (0.9, 0.99), torch.device(device).type)
    stream = batches(train_tokens, batch_size, block_size, torch.Generator().manual_seed(seed), device,
                     objective, tokenizer)
    loss_fn = loss_fn or (lambda m, x, y, t: m(x, y)[1])
    model.train()
    losses = []
    for step in range(iters):
        x, y = next(stream)
        loss = loss_fn(model, x, y, step)
        loss.backward()
        clip_grad_norm(model, grad_clip)
        set_lr(optimizer, lr_at(step, learning_rate, min_lr, warmup_iters, iters))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, step)
        losses.append(loss.item())
    model.eval()
    return losses


def val_loss(model, val_tokens, batch_size: int = 8, iters: int = 20, device="cpu", seed: int = 1337,
             objective: str = "clm", tokenizer=None) -> dict:
    """minillm.train.evaluate on fixed batches (seeded): every model measured sees the same text."""
    T = min(model.cfg.block_size, len(val_tokens) - 1)
    return evaluate(model, val_tokens, batch_size, T, iters, device, torch.Generator().manual_seed(seed),
                    tokenizer=tokenizer, objective=objective)
