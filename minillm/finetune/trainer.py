"""The fine-tuning loop both tasks share: choose what trains, take AdamW steps, evaluate, checkpoint.

Fine-tuning is pre-training's loop on a labelled task (L_finetune = L_task), with one new question:
which weights move?

    full      all of them
    frozen    only the head: the trunk's features are fixed, and the head learns to read them
    lora      low-rank adapters on the trunk's linear layers (finetune/lora.py) and the head

    for step in range(max_iters):          the shared loop and step of train/fit.py
        every eval_interval steps: evaluate on dev, save a checkpoint (LoRA merged into the weights)
        batch = next_batch(step);  loss = model(**batch)[1];  loss.backward()
        clip ‖g‖;  lr = warm-up + cosine;  AdamW step on the trainable parameters only

Checkpoints use the one format of minillm/weights/checkpoint.py (OUT/checkpoints/step-N/), so every other
command (generate, eval, quantize, serve, export) takes a fine-tuned model as it is. A LoRA run also
writes OUT/adapter/: the adapters alone (a few hundred KB) and the head, as safetensors.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch

from minillm.weights.checkpoint import (CHECKPOINTS_DIR, begin_checkpoint, check_output_folder, prune_checkpoints,
                                        save_model, step_folders)
from minillm.files import write_bytes
from minillm.finetune.config import FinetuneConfig
from minillm.finetune.lora import apply_lora, merge_lora, save_adapter
from minillm.train.config import TrainingDiverged, TrainingInterrupted
from minillm.train.fit import fit as train_fit
from minillm.train.metrics import MetricsLog
from minillm.train.optim import lr_at, make_optimizer


def choose_trainable(model: torch.nn.Module, cfg: FinetuneConfig, head: list[str]) -> dict:
    """Set requires_grad for the mode; `head` names the task's own modules (always trained).
    Returns {"trainable", "total", "lora_layers"} parameter counts."""
    from minillm.finetune.qlora import check_trainable, quantized_weight_count

    check_trainable(model, cfg.mode)  # a quantized base trains adapters only (QLoRA)
    total = sum(p.numel() for p in model.parameters()) + quantized_weight_count(model)
    lora_layers = []
    if cfg.mode == "lora":
        lora_layers = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.targets, cfg.lora_dropout,  # freezes all
                                 quantized=quantized_weight_count(model) > 0)  # QLoRA over a quantized base
    elif cfg.mode == "frozen":
        model.requires_grad_(False)
    else:
        model.requires_grad_(True)
    for name in head:
        getattr(model, name).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "lora_layers": lora_layers}


def fresh_copy(lm: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A randomly initialised model of lm's class and config (FinetuneConfig.reinit)."""
    torch.manual_seed(seed)
    return type(lm)(lm.cfg).to(next(lm.parameters()).device)


def check_out_dir(cfg: FinetuneConfig) -> None:
    """A run never silently replaces another (as in training): overwrite=true says it may."""
    check_output_folder(cfg.out_dir)
    held = step_folders(cfg.out_dir)
    if held and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir} already holds checkpoints up to step {held[0][0]}; pass --overwrite=true "
                         "to replace them, or another --out_dir")
    if held:
        shutil.rmtree(Path(cfg.out_dir) / CHECKPOINTS_DIR)
        (Path(cfg.out_dir) / "metrics.jsonl").unlink(missing_ok=True)


def save(model, cfg: FinetuneConfig, step: int, tokenizer, head: list[str], meta: dict) -> Path:
    """A complete checkpoint of the model as it would be served: LoRA merged (on a copy, so training
    can go on), then the previous checkpoint removed. LoRA runs also refresh OUT/adapter/."""
    out = Path(cfg.out_dir)
    plain = merge_lora(copy.deepcopy(model)) if cfg.mode == "lora" else model
    folder = begin_checkpoint(out, step)
    try:
        save_model(folder, plain, tokenizer, step=step, **meta)
    except BaseException:  # a full disk, Ctrl-C: the half-written folder goes, the previous one stays
        shutil.rmtree(folder, ignore_errors=True)
        raise
    prune_checkpoints(out, keep=folder)
    if cfg.mode == "lora" and cfg.save_adapter:
        from safetensors.torch import save as st_save

        save_adapter(out / "adapter", model, {"task": cfg.task, "step": step, "head": head,
                                              "base": meta.get("base")})
        head_weights = {f"{h}.{k}": v.detach().cpu().contiguous() for h in head
                        for k, v in getattr(model, h).state_dict().items()}
        if head_weights:  # the task's own modules: an adapter alone cannot rebuild a fresh head
            write_bytes(out / "adapter" / "head.safetensors", st_save(head_weights))
        else:  # a causal LM's adapter: PEFT's files too, for the Hugging Face export of the base
            from minillm.finetune.peft_format import add_peft_files

            add_peft_files(out / "adapter", model, base=meta.get("base"))
    return folder


def fit(model, cfg: FinetuneConfig, next_batch, evaluate, *, tokenizer, head: list[str], meta: dict,
        device, progress: bool = True, describe=None) -> dict:
    """Train `model` in place. next_batch(step) -> model kwargs; evaluate() -> dict with "val_loss".
    describe(eval dict) -> the evaluation's one-line summary. Returns the last evaluation and timings."""
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    log = MetricsLog(out)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, (0.9, 0.999), torch.device(device).type)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # dropout masks
    bar = tqdm(total=cfg.max_iters, disable=not progress, unit="step", dynamic_ncols=True)
    say = bar.write if progress else (lambda line: None)
    last_eval, checkpoint_step, step = {}, None, 0  # `step`: where an interrupt stopped the run

    def evaluate_and_save(at: int) -> None:
        nonlocal last_eval, checkpoint_step, step
        step = at
        ev = {"step": step, **evaluate()}
        if not math.isfinite(ev["val_loss"]):
            raise TrainingDiverged(f"dev loss is {ev['val_loss']} at step {step}; lower --learning_rate")
        log.write(ev)
        say(describe(ev) if describe else f"step {step}: dev loss {ev['val_loss']:.4f}")
        if step > 0:
            save(model, cfg, step, tokenizer, head, meta)
            checkpoint_step = step
        last_eval = ev

    def on_step(at: int, loss: torch.Tensor, lr: float) -> None:
        nonlocal step
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {at}; lower --learning_rate")
        log.write({"step": at, "loss": value})
        bar.update(1)
        bar.set_postfix_str(f"loss {value:.3f}")
        step = at + 1

    try:  # the shared loop (train/fit.py); a dev evaluation and a checkpoint every eval_interval steps
        train_s = train_fit(model, optimizer, next_batch, steps=cfg.max_iters, grad_clip=cfg.grad_clip,
                            schedule=lambda at: lr_at(at, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters,
                                                      cfg.max_iters),
                            evaluate=evaluate_and_save, eval_interval=cfg.eval_interval, on_step=on_step)
        bar.close()
        log.plot(f"fine-tuning ({cfg.task}, {cfg.mode})")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into one (train/config.py Terminated)
        bar.close()
        raise TrainingInterrupted.from_interrupt(e, step, checkpoint_step, cfg.out_dir) from None
    finally:
        torch.random.set_rng_state(generator_state)
    return {"eval": last_eval, "ms_per_step": 1000 * train_s / max(cfg.max_iters, 1), "out_dir": str(out)}
