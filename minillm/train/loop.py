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

The loop itself is `train()` at the bottom; what happens around a step has a name: `setup` builds
the run, `train_step` is one optimizer step, `evaluate_and_save` evaluates and checkpoints, and
`SpeedMeter` keeps evaluation time out of the tokens/s figure.

    python -m minillm.cli train --preset=tiny --max_iters=500
    torchrun --nproc_per_node=2 -m minillm.cli train --preset=shakespeare-char
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from minillm.weights.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, begin_checkpoint, check_output_folder,
                                        latest_checkpoint, prune_checkpoints, remove_temporaries, save_model,
                                        step_folders)
from minillm.data.dataset import MLM_SPECIAL_TOKENS, Dataset, prepare_dataset
from minillm.data.pairs import NSP_SPECIAL_TOKENS
from minillm.hardware import peak_flops, resolve_device, resolve_dtype
from minillm.model.builtin_ops import builtin_loss, use_builtin_ops
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model, count_parameters, flops_per_token
from minillm.train.config import TrainConfig, TrainingDiverged, TrainingInterrupted
from minillm.train.evaluate import draw_batch, evaluate, model_loss
from minillm.train.metrics import MetricsLog
from minillm.train.optim import clip_grad_norm, lr_at, make_optimizer, set_lr
from minillm.train.state import resume, save_train_state


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0  # a plain single-process run
    use_nccl = torch.cuda.is_available() and device_name != "cpu"
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")  # gloo: collectives on CPU
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


@dataclass
class Run:
    """Everything a run holds, built once by `setup`."""
    tc: TrainConfig
    cfg: ModelConfig
    data: Dataset
    device: torch.device
    dtype: torch.dtype
    raw_model: torch.nn.Module  # the plain model: what is saved and what generates
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped raw_model
    eval_model: torch.nn.Module  # compiled but not DDP-wrapped (evaluation runs on rank 0 alone)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    batch_gen: torch.Generator  # draws every batch; same seed (and state) in every process
    rank: int
    world: int
    accum: int  # micro-batches per optimizer step over all processes: a multiple of `world`
    out_dir: Path
    meta: dict  # what config.json records beside the model: train config, data, n_params
    log: MetricsLog | None  # rank 0 only
    step: int = 0
    start_step: int = 0
    best_val: float = math.inf
    checkpoint_step: int | None = None  # the step of the newest complete checkpoint on disk

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.tc.batch_size * self.cfg.block_size * self.accum


def setup(model_cfg: ModelConfig, tc: TrainConfig, data_source: str, rank: int, world: int, local_rank: int,
          progress: bool) -> Run:
    """Data, tokenizer, model, optimizer and precision for a run; resumed from out_dir if asked."""
    check_out_dir(tc)
    device = resolve_device(tc.device, local_rank)
    dtype = resolve_dtype(tc.dtype, device)
    # Each process runs the same number of micro-batches, so the global count is a multiple of the
    # processes: rounded up when it is not (nanoGPT asserts instead), and said so.
    accum = -(-tc.gradient_accumulation_steps // world) * world
    if accum != tc.gradient_accumulation_steps and rank == 0 and progress:
        print(f"gradient_accumulation_steps={tc.gradient_accumulation_steps} is not a multiple of the {world} "
              f"processes: using {accum} (one or more micro-batches per process)")
    # data and tokenizer; the model's vocabulary is the tokenizer's
    ds = prepare_dataset(data_source, tokenizer=tc.tokenizer,
                         vocab_size=tc.vocab_size if tc.tokenizer == "bpe" else None,
                         special_tokens={"clm": (), "mlm": MLM_SPECIAL_TOKENS,
                                         "mlm+nsp": NSP_SPECIAL_TOKENS}[tc.objective],
                         cache_dir=tc.cache_dir, verbose=rank == 0 and progress)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=ds.tokenizer.vocab_size)
    if model_cfg.causal != (tc.objective == "clm"):
        raise ValueError(f"objective={tc.objective} needs causal={tc.objective == 'clm'} in the model "
                         f"config (pass --causal={str(tc.objective == 'clm').lower()})")
    if tc.objective == "mlm+nsp" and not (model_cfg.nsp_head and model_cfg.n_token_types >= 2):
        raise ValueError("objective=mlm+nsp needs the NSP head and segment embeddings in the model config "
                         "(pass --nsp_head=true --n_token_types=2)")

    torch.manual_seed(tc.seed)  # same initial weights in every process
    model = build_model(model_cfg).to(device)
    # the written-out AdamW (train/optim.py), or PyTorch's fused one with the other builtin_ops
    optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), device.type,
                               readable=not tc.builtin_ops)
    # fp16's narrow exponent range flushes small gradients to zero without loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype)
                if device.type == "cuda" and dtype != torch.float32 else nullcontext())
    batch_gen = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed + rank)  # dropout masks: different per process, as in nanoGPT

    step, best_val, checkpoint_step = 0, math.inf, None
    if tc.resume:
        step, best_val, folder = resume(tc.out_dir, model, optimizer, batch_gen, scaler, ds.tokenizer, device)
        checkpoint_step = step
        if rank == 0 and progress:
            print(f"resuming from step {step} ({folder})")
    elif tc.overwrite and rank == 0:  # only now, with data and model ready: a bad --data loses nothing
        shutil.rmtree(Path(tc.out_dir) / CHECKPOINTS_DIR, ignore_errors=True)
    if rank == 0:  # what a killed process left half-written (metrics, plot): never read, so it goes
        remove_temporaries(tc.out_dir)
    if tc.builtin_ops:
        use_builtin_ops(model)  # same Parameters, fused kernels; the checkpoint is unchanged
    raw_model = model
    if tc.compile:
        model = torch.compile(model)
    eval_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = count_parameters(raw_model)
    meta = dict(train=dataclasses.asdict(tc), data=str(data_source), n_params=n_params)
    log = MetricsLog(tc.out_dir, resume_step=step if tc.resume else None) if rank == 0 else None
    return Run(tc=tc, cfg=model_cfg, data=ds, device=device, dtype=dtype, raw_model=raw_model, model=model,
               eval_model=eval_model, optimizer=optimizer, scaler=scaler, autocast=autocast,
               batch_gen=batch_gen, rank=rank, world=world, accum=accum, out_dir=Path(tc.out_dir), meta=meta,
               log=log, step=step, start_step=step, best_val=best_val, checkpoint_step=checkpoint_step)


def check_out_dir(tc: TrainConfig) -> None:
    """A run never silently replaces another: an out_dir that holds one needs resume or overwrite."""
    out = Path(tc.out_dir)
    check_output_folder(out)
    if tc.resume or tc.overwrite:
        return
    held = [s for s, _ in step_folders(out)]
    if held and latest_checkpoint(out) is None:  # a run stopped inside its first save: nothing to continue
        raise ValueError(f"{out} holds only an incomplete checkpoint (step {held[0]}: its save was interrupted), "
                         "so there is nothing to resume; start afresh with --overwrite=true (or pick another "
                         "--out_dir)")
    if not held and not (out / CONFIG_FILE).exists() and (out / "metrics.jsonl").is_file() \
            and (out / "metrics.jsonl").stat().st_size:
        raise ValueError(f"{out} holds a previous run that stopped before its first checkpoint, so there is "
                         "nothing to resume; start afresh with --overwrite=true (or pick another --out_dir)")
    if held or (out / CONFIG_FILE).exists():
        what = f"checkpoints up to step {held[0]}" if held else "a previous run"
        raise ValueError(f"{out} already holds {what}; continue it with --resume=true, or start afresh "
                         "with --overwrite=true (or pick another --out_dir)")


def train_step(run: Run) -> tuple[float, torch.Tensor]:
    """One optimizer step on the global batch of run.step: (learning rate, loss on the device)."""
    tc, T = run.tc, run.cfg.block_size
    lr = lr_at(run.step, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.lr_decay_iters or tc.max_iters)
    set_lr(run.optimizer, lr)
    # the GLOBAL batch of this step, identical in every process; process r takes its slice
    batch_all = draw_batch(run.data.train, tc.batch_size * run.accum, T, tc.objective, run.data.tokenizer,
                           run.batch_gen)
    local_accum = run.accum // run.world
    step_loss = torch.zeros((), device=run.device)
    for micro in range(local_accum):
        first = (run.rank * local_accum + micro) * tc.batch_size
        batch = {k: _to_device(v[first:first + tc.batch_size], run.device) for k, v in batch_all.items()}
        # DDP averages gradients in backward; only the last micro-batch needs to do it
        sync = run.world == 1 or micro == local_accum - 1
        with (nullcontext() if sync else run.model.no_sync()), run.autocast:
            if tc.builtin_ops and tc.objective != "mlm+nsp":  # (two heads: the model sums its own losses)
                loss = builtin_loss(run.model(batch["x"])[0], batch["y"])
            else:
                loss = model_loss(run.model, batch)[1]  # the written-out loss of minillm/model/losses.py
            loss = loss / local_accum
        run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    if tc.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the loss-scaled ones
        clip_grad_norm(run.raw_model, tc.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, step_loss


def evaluate_and_save(run: Run) -> dict:
    """Evaluate on both splits (the same batches every time) and checkpoint; rank 0 only."""
    tc = run.tc
    ev = {"step": run.step}
    for split, tokens in (("train", run.data.train), ("val", run.data.val)):
        r = evaluate(run.eval_model, tokens, tc.batch_size, run.cfg.block_size, tc.eval_iters, run.device,
                     torch.Generator().manual_seed(tc.seed + 1), run.data.tokenizer, tc.objective, run.autocast)
        ev.update({f"{split}_{k}": v for k, v in r.items()})
    if not math.isfinite(ev["val_loss"]):
        raise TrainingDiverged(f"validation loss is {ev['val_loss']} at step {run.step}; "
                               f"the last good checkpoint in {run.out_dir} is kept")
    improved = ev["val_loss"] < run.best_val
    run.best_val = min(run.best_val, ev["val_loss"])
    run.log.write(ev)
    if run.step > 0 and (improved or tc.always_save_checkpoint):
        # A fresh step folder; its manifest, written last by save_model, commits all four files at
        # once. Only then is the previous checkpoint removed: a kill at any byte leaves one to resume.
        folder = begin_checkpoint(run.out_dir, run.step)
        try:
            save_train_state(folder, run.optimizer, run.batch_gen, run.scaler, step=run.step,
                             best_val_loss=run.best_val)
            save_model(folder, run.raw_model, run.data.tokenizer, step=run.step, best_val_loss=run.best_val,
                       **run.meta)
        except BaseException as e:  # a full disk, Ctrl-C: the half-written folder goes (freeing what it took)
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(folder)  # the one-line error (minillm.cli) says where the save failed
            raise
        prune_checkpoints(run.out_dir, keep=folder)
        run.checkpoint_step = run.step
    run.log.plot(f"{run.cfg.n_layer}L/{run.cfg.n_embd} on {run.data.meta['source']}")
    return ev


class SpeedMeter:
    """Training time only: the clock pauses while evaluating and checkpointing."""

    def __init__(self):
        self.total_s, self.total_steps = 0.0, 0  # over the whole run
        self.window_s, self.window_steps = 0.0, 0  # since the last log line
        self.t = time.perf_counter()

    def pause(self) -> None:
        self.window_s += time.perf_counter() - self.t

    def restart(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> tuple[float, int]:
        """(seconds, steps) since the last lap; adds them to the run's totals."""
        dt, n = self.window_s + time.perf_counter() - self.t, self.window_steps
        self.total_s, self.total_steps = self.total_s + dt, self.total_steps + n
        self.window_s, self.window_steps, self.t = 0.0, 0, time.perf_counter()
        return dt, n


def check_losses(run: Run, pending: list[tuple[int, torch.Tensor]], lr: float) -> list[float]:
    """Read the losses of the last steps back from the device (one sync per log, not per step)."""
    losses = torch.stack([loss for _, loss in pending])
    if run.world > 1:  # the global batch's loss: average the processes' losses
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        losses /= run.world
    values = losses.tolist()
    for (s, _), v in zip(pending, values):
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"loss is {v} at step {s} (learning_rate={lr:.3g}); stopping. The last good checkpoint in "
                f"{run.out_dir} is kept. Try a lower --learning_rate, --grad_clip=1.0, or --dtype=bfloat16 "
                "instead of float16")
    return values


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data_source: str = "python-docs",
          *, on_step=None, progress: bool = True) -> dict:
    """Train and checkpoint into train_cfg.out_dir; returns a summary (losses, speed, paths).

    on_step(step, model): called after each optimizer step (tests use it to inject faults).
    progress: a progress bar and evaluation lines on the terminal (rank 0 only).
    """
    from tqdm.auto import tqdm

    tc = train_cfg
    rank, world, local_rank = init_distributed(tc.device)
    run, bar = None, None
    try:
        run = setup(model_cfg, tc, data_source, rank, world, local_rank, progress)
        if run.step >= tc.max_iters:  # resumed a finished run: nothing to train
            return {"step": run.step, "already_done": True, "best_val_loss": run.best_val, "out_dir": str(run.out_dir),
                    "model": run.raw_model, "tokenizer": run.data.tokenizer, "device": str(run.device),
                    "rank": rank, "world_size": world}
        show = run.master and progress
        flops_per_step = flops_per_token(run.cfg, count_parameters(run.raw_model, non_embedding=True))["train"]
        peak = peak_flops(run.device)
        if show:
            print(f"training {run.meta['n_params'] / 1e6:.2f}M parameters on {run.device} "
                  f"({str(run.dtype).split('.')[-1]}{f', {world} processes' if world > 1 else ''}), "
                  f"{run.tokens_per_step:,} tokens/step, data {run.data.meta['source']} "
                  f"({run.data.meta['train_tokens']:,} train tokens, vocab {run.data.tokenizer.vocab_size})")
        bar = tqdm(total=tc.max_iters, initial=run.step, disable=not show, unit="step", dynamic_ncols=True)
        say = bar.write if show else (lambda line: None)
        last_eval: dict = {}
        pending: list[tuple[int, torch.Tensor]] = []  # losses not yet read back from the device
        last_loss = math.nan
        speed = SpeedMeter()
        run.model.train()
        while run.step < tc.max_iters:
            if run.step % tc.eval_interval == 0 and not (tc.resume and run.step == run.start_step):
                speed.pause()
                if run.master:
                    last_eval = evaluate_and_save(run)
                    say(_eval_line(last_eval, tc.objective))
                speed.restart()

            lr, loss = train_step(run)
            pending.append((run.step, loss))
            if on_step is not None:
                on_step(run.step, run.raw_model)
            run.step += 1
            speed.window_steps += 1
            bar.update(1)

            if (run.step - 1) % tc.log_interval == 0 or run.step == tc.max_iters:
                last_loss = check_losses(run, pending, lr)[-1]
                pending.clear()
                dt, n = speed.lap()
                rec = {"step": run.step - 1, "loss": last_loss, "lr": lr, "ms_per_iter": 1000 * dt / n,
                       "tokens_per_s": run.tokens_per_step * n / dt}
                if peak:
                    rec["mfu"] = flops_per_step * rec["tokens_per_s"] / peak
                if run.master:
                    run.log.write(rec)
                    bar.set_postfix_str(_bar_text(rec, last_eval))

        if run.master and not (tc.resume and run.step == run.start_step):  # (finished run resumed: nothing new)
            last_eval = evaluate_and_save(run)  # the final evaluation (and checkpoint) at max_iters
            say(_eval_line(last_eval, tc.objective))
        bar.close()
        return {"step": run.step, "loss": last_loss, "val_loss": last_eval.get("val_loss"),
                "best_val_loss": run.best_val, "eval": last_eval, "n_params": run.meta["n_params"],
                "ms_per_iter": 1000 * speed.total_s / max(speed.total_steps, 1),
                "tokens_per_s": run.tokens_per_step * speed.total_steps / speed.total_s if speed.total_s else None,
                "out_dir": str(run.out_dir), "model": run.raw_model, "tokenizer": run.data.tokenizer,
                "device": str(run.device), "rank": rank, "world_size": world}
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into one (train/config.py Terminated)
        if bar is not None:
            bar.close()  # the bar's last line first, then the caller's one-line message
        checkpoint = run.checkpoint_step if run is not None else None
        raise TrainingInterrupted.from_interrupt(e, run.step if run is not None else None, checkpoint,
                                                 tc.out_dir) from None
    finally:
        if bar is not None:
            bar.close()  # before any error line: the bar's last line is not left half-drawn beside it
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # async copy overlaps the previous step
    return t.to(device)


def _eval_line(ev: dict, objective: str) -> str:
    acc = f", val acc {ev['val_acc']:.1%}" if objective in ("mlm", "mlm+nsp") else ""
    if objective == "mlm+nsp":
        acc += f", val NSP acc {ev['val_nsp_acc']:.1%}"
    return (f"step {ev['step']}: train loss {ev['train_loss']:.4f}, val loss {ev['val_loss']:.4f} "
            f"(ppl {ev['val_ppl']:.2f}{acc})")


def _bar_text(rec: dict, last_eval: dict) -> str:
    parts = [f"loss {rec['loss']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s", f"{rec['ms_per_iter']:.0f} ms/it"]
    if "mfu" in rec:
        parts.append(f"MFU {rec['mfu']:.1%}")
    if last_eval:
        parts.append(f"val {last_eval['val_loss']:.3f}")
    return ", ".join(parts)
