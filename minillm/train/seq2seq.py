"""Training the encoder–decoder (model/seq2seq.py) on parallel text: the paper's recipe, compactly.

One optimizer step is the shared one (train/fit.py), on a batch of pairs:
    sample batch_size pairs -> collate: src (B, S), tgt_in = [BOS y], tgt_out = [y EOS]
    loss = label-smoothed cross-entropy (ε = Seq2SeqConfig.label_smoothing, 0.1 as in §5.4)
    clip the gradient norm;  lr = the paper's schedule (§5.3);  AdamW step
Every `eval_interval` steps the loss on fixed train/val pairs and the greedy BLEU of the first
`bleu_sentences` held-out pairs ("val_bleu": what the loss is a proxy for) are logged to
metrics.jsonl and drawn in loss.png, and a checkpoint is written through the ONE format
(weights/checkpoint.py: begin_checkpoint, save_model with a "seq2seq" section, prune_checkpoints) together
with the train state (state.py), so `--resume=true` continues the run exactly, as for language
models. BLEU with beam search on a whole split is `minillm eval --metric=bleu --beam=4`.

The schedule keeps the paper's shape, lr ∝ min(step^-0.5, step·warmup^-1.5), i.e. a linear warm-up
then decay as 1/√step, but scales it so that its peak (at step = warmup) is `learning_rate` instead
of (d_model·warmup)^-0.5: the paper's 4000-step warm-up does not fit a run of a few thousand steps.

One vocabulary for both languages (§3.4): a char tokenizer ("dates": 30-odd symbols) or a byte-level
BPE trained on source and target text together, each with <pad>, <bos>, <eos>. Sentences longer
than block_size tokens (the decoder: block_size - 1, leaving room for BOS/EOS) are cut and counted.

Not yet: DDP, gradient accumulation, torch.compile.

    minillm train --objective=seq2seq                   the offline date task, a few CPU minutes
    minillm train --objective=seq2seq --n_enc_layer=3 --n_dec_layer=1    a deep encoder, a shallow decoder
    minillm train --objective=seq2seq --resume=true --max_iters=4000     continue out/ where it stopped
    minillm train --objective=seq2seq --data=multi30k --tokenizer=bpe --vocab_size=8000
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import torch

from minillm.weights.checkpoint import (CHECKPOINTS_DIR, begin_checkpoint, find_checkpoint, prune_checkpoints, read_config,
                                save_model)
from minillm.data.tokenizer import BPETokenizer, CharTokenizer
from minillm.data.translation import SPECIALS, collate, translation_pairs
from minillm.evaluate.translation import score_translations
from minillm.generate.beam import translate
from minillm.hardware import resolve_device
from minillm.model.config import ModelConfig
from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig
from minillm.model.transformer import count_parameters
from minillm.train.config import TrainConfig, TrainingDiverged, TrainingInterrupted
from minillm.train.fit import fit
from minillm.train.loop import check_out_dir
from minillm.train.metrics import MetricsLog
from minillm.train.optim import make_optimizer
from minillm.train.state import resume, save_train_state

# what a run may choose of Seq2SeqConfig (the special-token ids come from the tokenizer)
SEQ2SEQ_OPTIONS = ("n_enc_layer", "n_dec_layer", "label_smoothing")


def seq2seq_lr(step: int, peak: float, warmup: int) -> float:
    """The paper's warm-up then 1/√step decay, peaking at `peak` on step `warmup` (steps from 1)."""
    step, warmup = max(step, 1), max(warmup, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def make_tokenizer(pairs: list[tuple[str, str]], tc: TrainConfig):
    """One vocabulary for source and target, with <pad>, <bos>, <eos> (ids: tokenizer.special_tokens)."""
    text = "\n".join(s + "\n" + t for s, t in pairs)
    if tc.tokenizer == "char":
        return CharTokenizer.from_text(text, special_tokens=SPECIALS)
    return BPETokenizer.train(text, tc.vocab_size, special_tokens=SPECIALS)


def encode_pairs(tok, pairs, block_size: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Token ids of every pair, cut to fit: source ≤ block_size, target ≤ block_size - 1 (BOS/EOS).
    Returns (ids, how many pairs had to be cut)."""
    out, cut = [], 0
    for s, t in pairs:
        s_ids, t_ids = tok.encode(s, allowed_special=()), tok.encode(t, allowed_special=())
        if len(s_ids) > block_size or len(t_ids) > block_size - 1:
            cut += 1
        out.append((s_ids[:block_size], t_ids[:block_size - 1]))
    return out, cut


@torch.no_grad()
def seq2seq_loss(model: Seq2Seq, ids, batch_size: int, device) -> float:
    """Mean label-smoothed loss over all of `ids` (fixed pairs: comparable from one eval to the next)."""
    cfg, was_training = model.cfg, model.training
    model.eval()
    total, n_tok = 0.0, 0
    for i in range(0, len(ids), batch_size):
        src, tgt_in, tgt_out = (x.to(device) for x in collate(ids[i:i + batch_size], cfg.pad_id, cfg.bos_id, cfg.eos_id))
        _, loss = model(src, tgt_in, tgt_out)
        n = int((tgt_out != cfg.pad_id).sum())
        total, n_tok = total + loss.item() * n, n_tok + n  # the loss is a per-token mean: weight by tokens
    model.train(was_training)
    return total / max(n_tok, 1)


@torch.no_grad()
def greedy_bleu(model: Seq2Seq, tok, pairs: list[tuple[str, str]]) -> float:
    """Corpus BLEU of greedy translations of `pairs` (fixed sentences: comparable between evaluations).
    Greedy decoding draws no random numbers, so measuring it does not change the run that follows."""
    was_training = model.training
    model.eval()
    hyps = translate(model, tok, [s for s, _ in pairs], beam_size=1)
    model.train(was_training)
    return score_translations(hyps, [t for _, t in pairs], ["bleu"])["bleu"]


def seq2seq_options(tc: TrainConfig, model_cfg: ModelConfig, changes: dict | None) -> dict:
    """Encoder/decoder depths and label smoothing: the resumed checkpoint's, else n_layer for both
    sides (and the dataclass default), with `changes` (from --n_enc_layer=... etc.) on top."""
    changes = dict(changes or {})
    unknown = set(changes) - set(SEQ2SEQ_OPTIONS)
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))}: not a training option "
                         f"(choose from {', '.join(SEQ2SEQ_OPTIONS)})")
    if tc.resume:
        saved = read_config(find_checkpoint(tc.out_dir)).get("seq2seq")
        if not isinstance(saved, dict):
            raise ValueError(f"{tc.out_dir} does not hold a Seq2Seq run; it cannot be resumed with objective=seq2seq")
        return {**{k: saved[k] for k in SEQ2SEQ_OPTIONS if k in saved}, **changes}
    return {"n_enc_layer": model_cfg.n_layer, "n_dec_layer": model_cfg.n_layer, **changes}


def train_seq2seq(model_cfg: ModelConfig, tc: TrainConfig, data_source: str = "dates", progress: bool = True,
                  seq2seq: dict | None = None) -> dict:
    """Train a Seq2Seq on `data_source`; see the docstring. `seq2seq` may set n_enc_layer, n_dec_layer
    (default: n_layer for both) and label_smoothing. With tc.resume, continue the run in tc.out_dir."""
    say = print if progress else (lambda *a, **k: None)
    check_out_dir(tc)
    options = seq2seq_options(tc, model_cfg, seq2seq)
    device = resolve_device(tc.device)
    train_pairs = translation_pairs(data_source, "train", tc.cache_dir)
    val_pairs = translation_pairs(data_source, "val", tc.cache_dir)
    # a char vocabulary must also cover the held-out text (no learning from it: only its alphabet)
    tok = make_tokenizer(train_pairs + (val_pairs if tc.tokenizer == "char" else []), tc)
    T = model_cfg.block_size
    train_ids, cut = encode_pairs(tok, train_pairs, T)
    val_ids, val_cut = encode_pairs(tok, val_pairs, T)
    say(f"{data_source}: {len(train_ids):,} training pairs, {len(val_ids):,} held out; vocabulary {tok.vocab_size} "
        f"({tc.tokenizer}); {cut + val_cut} pairs longer than block_size={T} were truncated")

    pad, bos, eos = (tok.special_tokens[s] for s in SPECIALS)
    cfg = Seq2SeqConfig(dataclasses.replace(model_cfg, vocab_size=tok.vocab_size, sliding_window=None),
                        pad_id=pad, bos_id=bos, eos_id=eos, **options)
    torch.manual_seed(tc.seed)
    model = Seq2Seq(cfg).to(device)
    optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), device.type,
                               readable=not tc.builtin_ops)
    gen = torch.Generator().manual_seed(tc.seed)  # draws every batch; its state is part of the train state
    start, best = 0, math.inf
    if tc.resume:  # weights, AdamW moments, RNGs and the step from the newest complete checkpoint
        start, best, folder = resume(tc.out_dir, model, optimizer, gen, None, tok, device)
        say(f"resuming from {folder} (step {start}, best val loss {best:.4f})")
        if start >= tc.max_iters:
            return dict(step=start, already_done=True, best_val_loss=best, out_dir=tc.out_dir, rank=0)
    if tc.overwrite:  # only now, with data and model ready: a bad --data loses nothing
        shutil.rmtree(Path(tc.out_dir) / CHECKPOINTS_DIR, ignore_errors=True)
    log = MetricsLog(tc.out_dir, resume_step=start if tc.resume else None)
    n_params = count_parameters(model)
    meta = dict(train=dataclasses.asdict(tc), data=str(data_source), n_params=n_params)
    say(f"Seq2Seq {cfg.n_enc_layer}+{cfg.n_dec_layer} layers, C={cfg.model.n_embd}: {n_params / 1e6:.2f}M "
        f"parameters on {device}")

    n_eval = tc.eval_iters * tc.batch_size  # fixed pairs for the train/val loss
    eval_train, eval_val = train_ids[:n_eval], val_ids[:n_eval]
    bleu_pairs = [(s, t) for s, t in val_pairs if s.strip()][:tc.bleu_sentences]  # fixed sentences for val_bleu
    val_loss = math.inf
    at = {"step": start, "checkpoint": start if tc.resume else None}  # where an interrupt finds the run

    def evaluate_and_save(step: int) -> None:
        nonlocal val_loss, best
        val_loss = seq2seq_loss(model, eval_val, tc.batch_size, device)
        ev = {"step": step, "train_loss": seq2seq_loss(model, eval_train, tc.batch_size, device),
              "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"validation loss is {val_loss} at step {step}; the last good checkpoint "
                                   f"in {tc.out_dir} is kept")
        if bleu_pairs:
            ev["val_bleu"] = greedy_bleu(model, tok, bleu_pairs)
        log.write(ev)
        bleu = f", val BLEU {ev['val_bleu']:.2f} (greedy, {len(bleu_pairs)} sentences)" if bleu_pairs else ""
        say(f"step {step}: train loss {ev['train_loss']:.4f}, val loss {val_loss:.4f}{bleu}")
        if step > 0 and (val_loss < best or tc.always_save_checkpoint):
            # train state first; the manifest, written last by save_model, commits the folder
            # (weights, config, tokenizer, train state together); then the old one goes
            folder = begin_checkpoint(tc.out_dir, step)
            try:
                save_train_state(folder, optimizer, gen, None, step=step, best_val_loss=min(best, val_loss))
                save_model(folder, model, tok, step=step, best_val_loss=min(best, val_loss), **meta)
            except BaseException:  # a full disk, Ctrl-C: the half-written folder goes, the previous one stays
                shutil.rmtree(folder, ignore_errors=True)
                raise
            prune_checkpoints(tc.out_dir, keep=folder)
            at["checkpoint"] = step
        best = min(best, val_loss)
        log.plot(f"Seq2Seq {cfg.n_enc_layer}+{cfg.n_dec_layer}L/{cfg.model.n_embd} on {data_source}")

    def next_batch(step: int) -> dict:
        idx = torch.randint(len(train_ids), (tc.batch_size,), generator=gen).tolist()
        src, tgt_in, tgt_out = (x.to(device) for x in collate([train_ids[i] for i in idx], pad, bos, eos))
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}

    def on_step(step: int, loss: torch.Tensor, lr: float) -> None:
        at["step"] = step + 1
        if step % tc.log_interval == 0:  # reading the loss waits for the device: only when it is logged
            loss_f = loss.item()
            if not math.isfinite(loss_f):
                raise TrainingDiverged(f"training loss is {loss_f} at step {step}; the last good checkpoint in "
                                       f"{tc.out_dir} is kept")
            log.write({"step": step, "loss": loss_f, "lr": lr})

    # the shared loop (train/fit.py); a resumed run already evaluated and saved its first step
    try:
        train_s = fit(model, optimizer, next_batch, steps=tc.max_iters, start=start, grad_clip=tc.grad_clip,
                      schedule=lambda step: seq2seq_lr(step + 1, tc.learning_rate, tc.warmup_iters),
                      evaluate=evaluate_and_save, eval_interval=tc.eval_interval, eval_first=not tc.resume,
                      on_step=on_step)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into one: say where, as train/loop.py does
        raise TrainingInterrupted.from_interrupt(e, at["step"], at["checkpoint"], tc.out_dir) from None
    return dict(step=tc.max_iters, val_loss=val_loss, best_val_loss=best, device=str(device), out_dir=tc.out_dir,
                ms_per_iter=1000 * train_s / max(tc.max_iters - start, 1), model=model.eval(), tokenizer=tok,
                val_pairs=val_pairs, rank=0)
