"""Evaluation: mean loss, perplexity, masked-token and next-sentence accuracy on fixed batches.

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
from minillm.data.pairs import nsp_pairs
from minillm.model.losses import IGNORE_INDEX, cross_entropy

OBJECTIVES = ("clm", "mlm", "mlm+nsp")  # what draw_batch makes batches for (seq2seq has its own loop)


def draw_batch(tokens, batch_size: int, block_size: int, objective: str = "clm", tokenizer=None,
               generator: torch.Generator | None = None) -> dict:
    """One batch for an objective, as keyword arguments of the model: {"x", "y", ...}.

        clm       x = a window of text, y = the same window shifted by one (next tokens)
        mlm       x = the window with BERT's 80/10/10 corruption, y = the hidden originals
        mlm+nsp   x = [CLS] A [SEP] B [SEP], masked; y as mlm; plus token_type_ids and
                  next_sentence_labels (data/pairs.py)
    """
    if objective == "mlm+nsp":
        x, types, nsp = nsp_pairs(tokens, batch_size, block_size, tokenizer, generator)
        x, y = mask_tokens(x, tokenizer, generator=generator)
        return {"x": x, "y": y, "token_type_ids": types, "next_sentence_labels": nsp}
    x, y = get_batch(tokens, batch_size, block_size, generator=generator)
    if objective == "mlm":
        x, y = mask_tokens(x, tokenizer, generator=generator)
    return {"x": x, "y": y}


def model_loss(model, batch: dict):
    """(logits, loss) of a draw_batch batch: model(x, y, **the rest)."""
    extra = {k: v for k, v in batch.items() if k not in ("x", "y")}
    return model(batch["x"], batch["y"], **extra)


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
    masked = objective in ("mlm", "mlm+nsp")
    losses, nsp_losses, correct, total, nsp_correct, nsp_total = [], [], 0, 0, 0, 0
    for _ in range(iters):
        batch = {k: v.to(device) for k, v in draw_batch(tokens, batch_size, block_size, objective, tokenizer,
                                                         generator).items()}
        with autocast or nullcontext():
            logits, loss = model_loss(model, batch)
        losses.append(loss.float())
        if masked:
            y = batch["y"]
            chosen = y != IGNORE_INDEX
            correct += (logits.argmax(dim=-1)[chosen] == y[chosen]).sum()
            total += chosen.sum()
        if objective == "mlm+nsp":  # the NSP head's verdict on the same pairs
            with autocast or nullcontext():
                nsp_logits = _unwrap(model).pretraining_logits(batch["x"], token_type_ids=batch["token_type_ids"])[1]
            nsp_losses.append(cross_entropy(nsp_logits, batch["next_sentence_labels"]))
            nsp_correct += (nsp_logits.argmax(dim=-1) == batch["next_sentence_labels"]).sum()
            nsp_total += len(batch["next_sentence_labels"])
    model.train(was_training)
    loss = torch.stack(losses).mean().item()
    # perplexity is of the token predictions: for mlm+nsp, of L_MLM = L - L_NSP
    nsp_loss = torch.stack(nsp_losses).mean().item() if nsp_losses else 0.0
    out = {"loss": loss, "ppl": math.exp(min(loss - nsp_loss, 700.0))}  # (exp overflows a float past ~709)
    if masked:
        out["acc"] = (correct / max(int(total), 1)).item() if total else 0.0
    if objective == "mlm+nsp":
        out.update(mlm_loss=loss - nsp_loss, nsp_loss=nsp_loss, nsp_acc=(nsp_correct / nsp_total).item())
    return out


def _unwrap(model):
    """The module under torch.compile's wrapper (its methods other than forward live there)."""
    return getattr(model, "_orig_mod", model)


# --- which batches: one answer for `minillm eval`, `quantize` and `prune` ----------------------------

def checkpoint_eval_batches(meta: dict, batch_size: int | None = None, iters: int | None = None,
                            seed: int | None = None) -> dict:
    """{"batch_size", "iters", "seed"} of the batches a checkpoint's own evaluations scored: its run's
    batch_size and eval_iters, and the generator seed training evaluates with (seed + 1, train/loop.py).
    `minillm eval`, `quantize` and `prune` all default to these, so the three commands print the same
    perplexity for the same checkpoint (and the same as training's last "val ... ppl"); an argument
    that is not None replaces the recorded value. Without a recorded run: TrainConfig's defaults."""
    from minillm.train.config import TrainConfig

    for name, value in (("batch_size", batch_size), ("eval_iters", iters)):
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    run = meta.get("train") if isinstance(meta.get("train"), dict) else {}

    def recorded(key: str, default: int, least: int = 1) -> int:
        value = run.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= least else default

    return {"batch_size": batch_size or recorded("batch_size", TrainConfig.batch_size),
            "iters": iters or recorded("eval_iters", TrainConfig.eval_iters),
            "seed": seed if seed is not None else recorded("seed", TrainConfig.seed, least=0) + 1}


def describe_batches(iters: int, batch_size: int, block_size: int, what: str) -> str:
    """What a perplexity was measured on, e.g. "20 batches of 12 x 64 = 15,360 tokens of python-docs val"."""
    return f"{iters} batches of {batch_size} x {block_size} = {iters * batch_size * block_size:,} tokens of {what}"
