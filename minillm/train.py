"""The training loop: a GPT (causal LM) or BERT (masked LM) on a text corpus, nanoGPT-style.

One optimizer step is
    for each micro-batch (gradient accumulation):   loss = model(x, y) / accum;  loss.backward()
    clip the global gradient norm;  lr = warm-up/cosine schedule(step);  AdamW step;  zero grads
so `gradient_accumulation_steps` micro-batches of `batch_size` make one larger batch without the
memory of a larger batch. Every `eval_interval` steps the model is evaluated on fixed validation
batches (same batches every time, so the numbers are comparable), and a checkpoint is written.

Distributed data parallel (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): every process holds a
replica, computes gradients on its share of the batch, and DDP averages the gradients across
processes during backward. The global batch of a step is drawn from ONE generator seeded the same
everywhere, and process r takes its slice, so N processes see exactly the batch one process with
N× the accumulation would see, and compute the same update (tests/test_ddp.py).
As in nanoGPT, `gradient_accumulation_steps` counts micro-batches across all processes.

Precision: fp32 on CPU; on GPU autocast to bf16 where supported, else fp16 with a GradScaler
(fp16's narrow exponent range would flush small gradients to zero without loss scaling).

    python -m minillm.cli train --preset=tiny --max_iters=500
    torchrun --nproc_per_node=2 -m minillm.cli train --preset=shakespeare-char
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .builtin_ops import builtin_loss, use_builtin_ops
from .checkpoint import read_config, save_model
from .config import ModelConfig
from .data import MLM_SPECIAL_TOKENS, get_batch, mask_tokens, prepare_dataset
from .losses import IGNORE_INDEX
from .model import build_model, count_parameters, flops_per_token
from .optim import clip_grad_norm, lr_at, make_optimizer, set_lr
from .trainlog import MetricsLog, peak_flops
from .trainstate import load_train_state, save_train_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    # --- how long, how often ---------------------------------------------------------------
    max_iters: int = 1000  # optimizer steps; `minillm train` (tiny, python-docs): minutes on 2 CPU cores
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 20  # batches per evaluation: more = less noisy estimate, slower evaluation
    log_interval: int = 10  # log loss/speed every this many steps (each log waits for the device)
    # --- batch -----------------------------------------------------------------------------
    batch_size: int = 12  # sequences per micro-batch per process (block_size lives in ModelConfig)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, summed over all processes
    # --- optimizer (AdamW) and schedule ----------------------------------------------------
    learning_rate: float = 1e-3  # peak learning rate, reached after warm-up; small models take ~1e-3
    min_lr: float = 1e-4  # floor of the cosine decay (Chinchilla: ~learning_rate/10)
    warmup_iters: int = 100  # linear warm-up steps: Adam's variance estimates are noisy at first
    lr_decay_iters: int | None = None  # step where the cosine reaches min_lr; None = max_iters
    weight_decay: float = 0.1  # on 2-D matmul weights only (see optim.py)
    beta1: float = 0.9  # Adam momentum
    beta2: float = 0.99  # Adam's second-moment decay; 0.99 (not 0.999) for small batches: few tokens/step
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # --- where and how to run --------------------------------------------------------------
    device: str = "auto"  # "auto" = cuda if available, else cpu; or "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" = bf16 on GPUs that have it, else fp16 (+GradScaler); fp32 on CPU
    compile: bool = False  # torch.compile the model: faster steps after a compile of tens of seconds
    builtin_ops: bool = False  # train with PyTorch's fused norms/GELU/cross-entropy (builtin_ops.py)
    seed: int = 1337  # weights, batches, dropout: the same seed gives the same run
    # --- what to train ---------------------------------------------------------------------
    objective: str = "clm"  # "clm" next-token prediction (GPT) | "mlm" masked tokens (BERT)
    tokenizer: str = "char"  # "char" (nanoGPT's shakespeare-char) | "bpe" (byte-level, trained on the data)
    vocab_size: int = 1024  # BPE vocabulary size (ignored by char: its vocabulary is the text's characters)
    cache_dir: str | None = None  # prepared datasets and downloads; None = ~/.cache/minillm
    # --- checkpoints -----------------------------------------------------------------------
    out_dir: str = "out"  # checkpoint folder: weights, config, tokenizer, train state, metrics, plot
    always_save_checkpoint: bool = True  # save at every evaluation, not only when val loss improves
    resume: bool = False  # continue the run in out_dir exactly where its last checkpoint stopped

    def __post_init__(self):
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                     "gradient_accumulation_steps", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.objective not in ("clm", "mlm"):
            raise ValueError(f"TrainConfig.objective must be 'clm' or 'mlm', got {self.objective!r}")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"TrainConfig.tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}")


# Named recipes: plain data, a model preset plus overrides for both dataclasses and a data source.
RECIPES: dict[str, dict] = {
    # what `minillm train` runs with no arguments: the tiny preset (sinusoidal positions, the
    # engine's default) on the embedded python-docs corpus.
    "python-docs-char": dict(preset="tiny", data="python-docs", model=dict(), train=dict()),
    # nanoGPT README's CPU run of config/train_shakespeare_char.py (~2-3 min on a laptop)
    "shakespeare-char-cpu": dict(
        preset="tiny", data="shakespeare",
        model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, positional="learned",
                   bias=False, attention="sdpa"),
        train=dict(builtin_ops=True, max_iters=2000, lr_decay_iters=2000, eval_interval=250, eval_iters=20,
                   log_interval=10,
                   batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                   always_save_checkpoint=False, out_dir="out-shakespeare-char"),
    ),
    # nanoGPT's config/train_shakespeare_char.py: the baby GPT (6/6/384, block 256) for one GPU
    "shakespeare-char": dict(
        preset="char-small", data="shakespeare",
        model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, positional="learned",
                   bias=False, attention="sdpa"),
        train=dict(builtin_ops=True, max_iters=5000, lr_decay_iters=5000, eval_interval=250, eval_iters=200,
                   log_interval=10,
                   batch_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                   always_save_checkpoint=False, out_dir="out-shakespeare-char"),
    ),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


# --- devices, precision, processes -------------------------------------------------------------

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but PyTorch sees no GPU; use --device=cpu (or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32  # CPU autocast to bf16 is slower than fp32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and name != "float32":
        raise ValueError(f"dtype={name} is for GPUs; minillm trains in float32 on CPU")
    return DTYPES[name]


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0  # a plain single-process run
    use_nccl = torch.cuda.is_available() and device_name != "cpu"
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")  # gloo: collectives on CPU
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


# --- evaluation ------------------------------------------------------------------------------

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


# --- the loop --------------------------------------------------------------------------------

def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_source: str = "python-docs",
          *, on_step=None, progress: bool = True) -> dict:
    """Train and checkpoint into train_cfg.out_dir; returns a summary (losses, speed, paths).

    on_step(step, model): called after each optimizer step (tests use it to inject faults).
    """
    from tqdm.auto import tqdm

    tc = train_cfg
    rank, world, local_rank = init_distributed(tc.device)
    master = rank == 0
    try:
        device = resolve_device(tc.device, local_rank)
        dtype = resolve_dtype(tc.dtype, device)
        if tc.gradient_accumulation_steps % world:
            raise ValueError(f"gradient_accumulation_steps={tc.gradient_accumulation_steps} must be a "
                             f"multiple of the number of processes ({world})")
        local_accum = tc.gradient_accumulation_steps // world
        out_dir = Path(tc.out_dir)

        # data and tokenizer; the model's vocabulary is the tokenizer's
        ds = prepare_dataset(data_source, tokenizer=tc.tokenizer,
                             vocab_size=tc.vocab_size if tc.tokenizer == "bpe" else None,
                             special_tokens=MLM_SPECIAL_TOKENS if tc.objective == "mlm" else (),
                             cache_dir=tc.cache_dir, verbose=master and progress)
        tok = ds.tokenizer
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
        if model_cfg.causal != (tc.objective == "clm"):
            raise ValueError(f"objective={tc.objective} needs causal={tc.objective == 'clm'} in the model "
                             f"config (pass --causal={str(tc.objective == 'clm').lower()})")
        T = model_cfg.block_size

        torch.manual_seed(tc.seed)  # same initial weights in every process
        model = build_model(model_cfg).to(device)
        optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), device.type)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        autocast = (torch.autocast(device_type=device.type, dtype=dtype)
                    if device.type == "cuda" and dtype != torch.float32 else nullcontext())
        batch_gen = torch.Generator().manual_seed(tc.seed)  # draws every batch; same in every process
        torch.manual_seed(tc.seed + rank)  # dropout masks: different per process, as in nanoGPT

        step, best_val = 0, math.inf
        if tc.resume:
            step, best_val = _resume(out_dir, model, optimizer, batch_gen, scaler, tok, device)
        start_step = step
        if tc.builtin_ops:
            use_builtin_ops(model)  # same Parameters, fused kernels; the checkpoint is unchanged
        raw_model = model
        if tc.compile:
            model = torch.compile(model)
        eval_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        log = MetricsLog(out_dir, resume_step=start_step if tc.resume else None) if master else None
        n_params = count_parameters(raw_model)
        flops_per_step = flops_per_token(model_cfg, count_parameters(raw_model, non_embedding=True))["train"]
        tokens_per_step = tc.batch_size * T * tc.gradient_accumulation_steps
        peak = peak_flops(device)
        meta = dict(train=dataclasses.asdict(tc), data=str(data_source), n_params=n_params)
        if master and progress:
            print(f"training {n_params / 1e6:.2f}M parameters on {device} ({str(dtype).split('.')[-1]}"
                  f"{f', {world} processes' if world > 1 else ''}), {tokens_per_step:,} tokens/step, "
                  f"data {ds.meta['source']} ({ds.meta['train_tokens']:,} train tokens, vocab {tok.vocab_size})")

        def run_eval(s: int) -> dict:
            # every evaluation scores the same batches: a fresh generator with a fixed seed per split
            res = {"step": s}
            for split, tokens in (("train", ds.train), ("val", ds.val)):
                r = evaluate(eval_model, tokens, tc.batch_size, T, tc.eval_iters, device,
                             torch.Generator().manual_seed(tc.seed + 1), tok, tc.objective, autocast)
                res.update({f"{split}_{k}": v for k, v in r.items()})
            return res

        def checkpoint(s: int, ev: dict) -> None:
            nonlocal best_val
            if not math.isfinite(ev["val_loss"]):
                raise TrainingDiverged(f"validation loss is {ev['val_loss']} at step {s}; "
                                       f"the last good checkpoint in {out_dir} is kept")
            improved = ev["val_loss"] < best_val
            best_val = min(best_val, ev["val_loss"])
            log.write(ev)
            if s > 0 and (improved or tc.always_save_checkpoint):
                # train state first, config.json (with the step) last: see _resume's consistency check
                save_train_state(out_dir, optimizer, batch_gen, scaler, step=s, best_val_loss=best_val)
                save_model(out_dir, raw_model, tok, step=s, best_val_loss=best_val, **meta)
            log.plot(f"{model_cfg.n_layer}L/{model_cfg.n_embd} on {ds.meta['source']}")

        bar = tqdm(total=tc.max_iters, initial=start_step, disable=not (master and progress),
                   unit="step", dynamic_ncols=True)
        last_eval: dict = {}
        pending: list[tuple[int, torch.Tensor]] = []  # losses not yet read back from the device
        # speed = training time only: evaluation and checkpointing are excluded from the window
        train_time, timed_steps, window, steps_since, t_last = 0.0, 0, 0.0, 0, time.perf_counter()
        last_loss = math.nan
        model.train()
        while step < tc.max_iters:
            if step % tc.eval_interval == 0 and not (tc.resume and step == start_step):
                window += time.perf_counter() - t_last
                if master:
                    last_eval = run_eval(step)
                    checkpoint(step, last_eval)
                    bar.write(_eval_line(last_eval, tc.objective))
                t_last = time.perf_counter()

            lr = lr_at(step, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.lr_decay_iters or tc.max_iters)
            set_lr(optimizer, lr)
            # the GLOBAL batch of this step, identical in every process; process r takes its slice
            x_all, y_all = get_batch(ds.train, tc.batch_size * tc.gradient_accumulation_steps, T,
                                     generator=batch_gen)
            if tc.objective == "mlm":
                x_all, y_all = mask_tokens(x_all, tok, generator=batch_gen)
            step_loss = torch.zeros((), device=device)
            for micro in range(local_accum):
                rows = slice((rank * local_accum + micro) * tc.batch_size,
                             (rank * local_accum + micro + 1) * tc.batch_size)
                x, y = _to_device(x_all[rows], device), _to_device(y_all[rows], device)
                # DDP averages gradients in backward; only the last micro-batch needs to do it
                sync = world == 1 or micro == local_accum - 1
                with (nullcontext() if sync else model.no_sync()), autocast:
                    if tc.builtin_ops:
                        loss = builtin_loss(model(x)[0], y)
                    else:
                        loss = model(x, y)[1]  # the written-out loss of minillm/losses.py
                    loss = loss / local_accum
                scaler.scale(loss).backward()
                step_loss += loss.detach()
            if tc.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                clip_grad_norm(raw_model, tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            pending.append((step, step_loss))
            if on_step is not None:
                on_step(step, raw_model)
            step += 1
            steps_since += 1
            bar.update(1)

            if (step - 1) % tc.log_interval == 0 or step == tc.max_iters:
                losses = torch.stack([l for _, l in pending])
                if world > 1:  # the global batch's loss: average the processes' losses
                    dist.all_reduce(losses, op=dist.ReduceOp.SUM)
                    losses /= world
                values = losses.tolist()  # one device sync per log, not per step
                for (s, _), v in zip(pending, values):
                    if not math.isfinite(v):
                        raise TrainingDiverged(
                            f"loss is {v} at step {s} (learning_rate={lr:.3g}); stopping. The last good "
                            f"checkpoint in {out_dir} is kept. Try a lower --learning_rate, --grad_clip=1.0, "
                            "or --dtype=bfloat16 instead of float16")
                pending.clear()
                dt = window + time.perf_counter() - t_last
                train_time, timed_steps = train_time + dt, timed_steps + steps_since
                last_loss = values[-1]
                rec = {"step": step - 1, "loss": last_loss, "lr": lr, "ms_per_iter": 1000 * dt / steps_since,
                       "tokens_per_s": tokens_per_step * steps_since / dt}
                if peak:
                    rec["mfu"] = flops_per_step * rec["tokens_per_s"] / peak
                if master:
                    log.write(rec)
                    bar.set_postfix_str(_bar_text(rec, last_eval))
                t_last, steps_since, window = time.perf_counter(), 0, 0.0

        if master and not (tc.resume and step == start_step):  # (a finished run resumed: nothing new)
            last_eval = run_eval(step)  # the final evaluation (and checkpoint) at max_iters
            checkpoint(step, last_eval)
            bar.write(_eval_line(last_eval, tc.objective))
        bar.close()
        return {"step": step, "loss": last_loss, "val_loss": last_eval.get("val_loss"),
                "best_val_loss": best_val, "eval": last_eval, "n_params": n_params,
                "ms_per_iter": 1000 * train_time / max(timed_steps, 1),
                "tokens_per_s": tokens_per_step * timed_steps / train_time if train_time else None,
                "out_dir": str(out_dir), "model": raw_model, "tokenizer": tok, "device": str(device),
                "rank": rank, "world_size": world}
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _resume(out_dir: Path, model, optimizer, batch_gen, scaler, tok, device) -> tuple[int, float]:
    """Load weights and train state from out_dir; check they belong together and to this data."""
    from safetensors.torch import load_model as st_load_model

    from .checkpoint import MODEL_FILE, TOKENIZER_FILE
    meta = read_config(out_dir)
    st_load_model(model, str(out_dir / MODEL_FILE), device=str(device))  # strict: shapes must match
    scalars = load_train_state(out_dir, optimizer, batch_gen, scaler)
    if scalars["step"] != meta.get("step"):
        raise ValueError(f"{out_dir}: train state is at step {scalars['step']} but the weights at step "
                         f"{meta.get('step')} (a save was interrupted); cannot resume exactly")
    import json
    saved_tok = json.loads((out_dir / TOKENIZER_FILE).read_text())
    if saved_tok != json.loads(json.dumps(tok.to_dict())):
        raise ValueError(f"{out_dir} was trained with a different tokenizer than this data gives; "
                         "resume with the same --data, --tokenizer and --vocab_size")
    return int(scalars["step"]), float(scalars["best_val_loss"])


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # async copy overlaps the previous step
    return t.to(device)


def _eval_line(ev: dict, objective: str) -> str:
    acc = f", val acc {ev['val_acc']:.1%}" if objective == "mlm" else ""
    return (f"step {ev['step']}: train loss {ev['train_loss']:.4f}, val loss {ev['val_loss']:.4f} "
            f"(ppl {ev['val_ppl']:.2f}{acc})")


def _bar_text(rec: dict, last_eval: dict) -> str:
    parts = [f"loss {rec['loss']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s", f"{rec['ms_per_iter']:.0f} ms/it"]
    if "mfu" in rec:
        parts.append(f"MFU {rec['mfu']:.1%}")
    if last_eval:
        parts.append(f"val {last_eval['val_loss']:.3f}")
    return ", ".join(parts)
