"""One training step and one compact loop, shared by every training loop except the showpiece.

`train/loop.py` is the pre-training loop, long and flat like nanoGPT's train.py (gradient
accumulation, DDP, mixed precision, resume), to be read top to bottom. The other loops need less,
and they all take the same step in the same loop:

    fit_step   one optimizer step:
                   lr = schedule(step);  loss = loss_fn(model, batch, step);  loss.backward()
                   clip ‖g‖ ≤ grad_clip;  AdamW step;  zero the gradients
    fit        the loop around it:
                   for step in range(start, steps):
                       every eval_interval steps: evaluate(step)       (log, checkpoint: the caller's)
                       batch = next_batch(step);  fit_step(...);  on_step(step, loss, lr)
                   evaluate(steps)                                     (the end is always evaluated)

Who uses them:
    train/seq2seq.py       the encoder–decoder on parallel text (checkpoints, resume, BLEU)
    finetune/trainer.py    classification and instruction tuning (which weights train, LoRA, dev set)
    `finetune` below       compression's short fine-tune: after pruning, and distillation
                           (compress/jobs.py, compress/distill.py)

What differs between them is passed in as plain functions (the batches, the loss, the schedule, what an
evaluation does, what follows a step); what a run saves and prints stays with the run that knows it.
The bottom of the file is `fit` on a text corpus: random windows, the checkpoint's own tokenizer, the
trainer's optimizer, schedule and evaluation, so a fine-tuned model compares with one from `minillm train`.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from minillm.data.dataset import get_batch, load_text, mask_tokens, split_text
from minillm.train.evaluate import evaluate
from minillm.train.optim import clip_grad_norm, lr_at, make_optimizer, set_lr


def own_loss(model, batch: dict, step: int) -> torch.Tensor:
    """The default loss: the model's own, from its keyword arguments, model(**batch) -> (logits, loss).
    (`step` is there for losses that need it, such as distillation's per-step cache of teacher logits.)"""
    return model(**batch)[1]


def fit_step(model, optimizer, batch, step: int, lr: float, grad_clip: float = 0.0,
             loss_fn: Callable = own_loss) -> torch.Tensor:
    """One optimizer step on `batch`; returns the loss (detached, still on the device: reading it is a sync)."""
    set_lr(optimizer, lr)
    loss = loss_fn(model, batch, step)
    loss.backward()
    if grad_clip > 0:  # 0 = no clipping
        clip_grad_norm(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding
    return loss.detach()


def fit(model, optimizer, next_batch: Callable, *, steps: int, schedule: Callable[[int], float],
        grad_clip: float = 0.0, loss_fn: Callable = own_loss, start: int = 0, evaluate: Callable | None = None,
        eval_interval: int = 0, eval_first: bool = True, on_step: Callable | None = None) -> float:
    """Train `model` in place from step `start` to `steps`; returns the seconds spent training.

    next_batch(step) -> a batch;  schedule(step) -> the learning rate;  loss_fn(model, batch, step) -> loss.
    evaluate(step), if given, runs before the steps that are multiples of eval_interval and after the
    last one; eval_first=False skips it at `start` (a resumed run evaluated that step before it stopped).
    on_step(step, loss, lr) runs after each step: logging, a divergence check, re-applying pruning masks.
    Evaluation time is not training time: it is left out of the seconds returned.
    """
    eval_s, t0 = 0.0, time.perf_counter()
    model.train()
    for step in range(start, steps + 1):
        due = step == steps or (eval_interval > 0 and step % eval_interval == 0)
        if evaluate is not None and due and (step > start or eval_first):
            t_eval = time.perf_counter()
            evaluate(step)
            model.train()  # an evaluation switches to eval mode (no dropout); training goes on with it
            eval_s += time.perf_counter() - t_eval
        if step == steps:
            break
        lr = schedule(step)
        loss = fit_step(model, optimizer, next_batch(step), step, lr, grad_clip, loss_fn)
        if on_step is not None:
            on_step(step, loss, lr)
    return time.perf_counter() - t0 - eval_s


# --- the loop on a text corpus: compression's short fine-tune -----------------------------------------


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
    """Train `model` in place for `iters` AdamW steps on random windows of `train_tokens`; returns the loss
    of every step. No checkpoints, no evaluation: the caller measures before and after (`val_loss`).

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
    lm_loss = loss_fn or (lambda m, x, y, t: m(x, y)[1])
    losses = []

    def on_step(step, loss, lr):
        if after_step is not None:
            after_step(model, step)
        losses.append(loss.item())

    fit(model, optimizer, lambda step: next(stream), steps=iters, grad_clip=grad_clip,
        schedule=lambda step: lr_at(step, learning_rate, min_lr, warmup_iters, iters),
        loss_fn=lambda m, xy, step: lm_loss(m, *xy, step), on_step=on_step)
    model.eval()
    return losses


def val_loss(model, val_tokens, batch_size: int = 8, iters: int = 20, device="cpu", seed: int = 1337,
             objective: str = "clm", tokenizer=None) -> dict:
    """minillm.train.evaluate on fixed batches (seeded): every model measured sees the same text."""
    T = min(model.cfg.block_size, len(val_tokens) - 1)
    return evaluate(model, val_tokens, batch_size, T, iters, device, torch.Generator().manual_seed(seed),
                    tokenizer=tokenizer, objective=objective)
