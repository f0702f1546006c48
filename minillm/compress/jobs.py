"""Compress a saved checkpoint into a new one: prune (+ fine-tune), or distil a student from it.

The glue between the methods (prune.py, distill.py, train/fit.py) and the checkpoint format: load,
compress, optionally fine-tune on the checkpoint's own training text, measure validation perplexity
before and after on the same batches, and save an ordinary checkpoint folder whose config.json
records what was done ("pruning": {...} or "distillation": {...}). `minillm prune` and
`minillm distill` are thin commands over `prune_checkpoint` and `distill_checkpoint`.

A magnitude / 2:4 pruned checkpoint stores its zeros as zeros: no mask file is needed, because a
loaded model is used for inference (fine-tuning it again would need the masks re-derived, which
`magnitude_masks(w, s)` does exactly: the zeros are the smallest magnitudes). Quantizing it
afterwards is defined: int8 (symmetric, code 0 ↔ 0.0) keeps every zero; int4's asymmetric grid
has no exact zero in general, so the zeros become values within half a step of 0. Pruning a
quantized checkpoint is refused: prune the float one, then quantize.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from minillm.weights.checkpoint import (check_finite_forward, check_output_folder, find_checkpoint, load_model,
                                        read_config, save_model)
from minillm.compress import prune as P
from minillm.compress.distill import check_compatible, distill, load_teacher
from minillm.compress.quantize import recorded_data_source
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model, count_parameters
from minillm.train.evaluate import checkpoint_eval_batches, describe_batches
from minillm.train.fit import batches, finetune, text_tokens, val_loss


def _tokens(meta: dict, tokenizer, data: str | None, val_fraction: float):
    source = data or recorded_data_source(meta)
    if source is None:
        raise ValueError("no training text recorded in the checkpoint: pass --data=TEXT")
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json: cannot encode the text")
    return source, *text_tokens(source, tokenizer, val_fraction)


def _objective(model) -> str:
    return "clm" if model.cfg.causal else "mlm"


def prune_model(model, method: str, sparsity: float | None, train_tokens=None, finetune_iters: int = 0,
                schedule: str = "oneshot", importance: str = "magnitude", tokenizer=None, device="cpu",
                seed: int = 1337, **finetune_kwargs):
    """(pruned model, record). Unstructured/2:4: same model, masks kept through the fine-tune;
    heads/neurons/structured: a smaller dense model, fine-tuned as it is."""
    if method not in P.METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(P.METHODS)}")
    if method == "2:4" and sparsity not in (None, 0.5):
        raise ValueError(f"2:4 sparsity is always 0.5 (2 of every 4 weights), got --sparsity={sparsity}")
    sparsity = 0.5 if sparsity is None and method == "2:4" else sparsity
    if sparsity is None:
        raise ValueError("--sparsity is required: the fraction of weights (or heads/neurons) to remove")
    P.check_sparsity(sparsity)
    if schedule not in ("oneshot", "gradual"):
        raise ValueError(f"schedule must be 'oneshot' or 'gradual', got {schedule!r}")
    if schedule == "gradual" and (method not in ("magnitude", "global") or finetune_iters <= 0):
        raise ValueError("the gradual schedule applies to magnitude/global pruning with finetune_iters > 0")
    params_before = count_parameters(model)
    ft = dict(objective=_objective(model), tokenizer=tokenizer, device=device, seed=seed, **finetune_kwargs)
    after_step = None
    if method in ("magnitude", "global", "2:4"):
        weights = P.prunable_weights(model)
        scope = "global" if method == "global" else "layer"
        if method == "2:4":
            masks = P.two_four_masks(weights)
        elif schedule == "gradual":  # start dense; s_t rises to s_f over the first 3/4 of the fine-tune
            ramp = max(1, (3 * finetune_iters) // 4)
            masks = None

            def after_step(m, t):  # noqa: F811
                P.apply_masks(m, P.magnitude_masks(weights, P.gradual_sparsity(t + 1, sparsity, n_steps=ramp), scope))
        else:
            masks = P.magnitude_masks(weights, sparsity, scope)
        if masks is not None:
            P.apply_masks(model, masks)
            after_step = lambda m, t: P.apply_masks(m, masks)  # noqa: E731  W ← W ⊙ M after each step
        plan = None
    else:
        heads = sparsity if method in ("heads", "structured") else 0.0
        neurons = sparsity if method in ("neurons", "structured") else 0.0
        grads_on = []
        if importance == "taylor":
            stream = batches(train_tokens, 8, model.cfg.block_size, torch.Generator().manual_seed(seed), device,
                             ft["objective"], tokenizer)
            grads_on = [next(stream) for _ in range(4)]
        plan = P.choose_structure(model, heads, neurons, importance, grads_on)
        model = P.shrink_model(model, plan)
    if finetune_iters > 0:
        finetune(model, train_tokens, finetune_iters, after_step=after_step, **ft)
    record = {"method": method, "sparsity": sparsity, "finetune_iters": finetune_iters, "schedule": schedule,
              "weight_sparsity": P.sparsity_of(P.prunable_weights(model)),
              "params": [params_before, count_parameters(model)]}
    if plan is not None:
        record.update(importance=importance, n_head=model.cfg.n_head, ffn_hidden=model.cfg.ffn_dim)
    return model.eval(), record


def prune_checkpoint(checkpoint, out, method: str, sparsity: float | None = None, finetune_iters: int = 0,
                     schedule: str = "oneshot", importance: str = "magnitude", data: str | None = None,
                     val_fraction: float = 0.1, eval_iters: int | None = None, device="cpu", seed: int = 1337,
                     eval_batch_size: int | None = None, **finetune_kwargs) -> dict:
    """Prune `checkpoint` into `out` (a new checkpoint); returns the record stored in its config.json.

    The perplexities before and after are on the checkpoint's own validation batches (those `minillm
    eval` scores; eval_iters and eval_batch_size replace its recorded numbers); `seed` draws the fine-tune's."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError("the output folder must differ from the input checkpoint")
    check_output_folder(out, "--out")
    model, tokenizer, meta = load_model(checkpoint, device=device)
    check_finite_forward(model, find_checkpoint(checkpoint))
    if "quantization" in meta:
        raise ValueError(f"{checkpoint} is quantized ({meta['quantization'].get('scheme')}): prune the float "
                         "checkpoint it came from, then quantize the pruned one")
    needs_data = finetune_iters > 0 or importance == "taylor"
    source, train, val = _tokens(meta, tokenizer, data, val_fraction) if (needs_data or data or
                                                                         recorded_data_source(meta)) else (None,) * 3
    obj = dict(objective=_objective(model), tokenizer=tokenizer)
    ev = checkpoint_eval_batches(meta, eval_batch_size, eval_iters)
    ev = dict(batch_size=ev["batch_size"], iters=ev["iters"], seed=ev["seed"], device=device, **obj)
    ppl_before = val_loss(model, val, **ev)["ppl"] if val is not None else None
    pruned, record = prune_model(model, method, sparsity, train, finetune_iters, schedule, importance, tokenizer,
                                 device, seed, **finetune_kwargs)
    if val is not None:
        T = min(model.cfg.block_size, len(val) - 1)  # (val_loss's window)
        record.update(data=source, val_ppl=[ppl_before, val_loss(pruned, val, **ev)["ppl"]],
                      eval_batches=describe_batches(ev["iters"], ev["batch_size"], T, f"{source} val") +
                      f", seed {ev['seed']}")
    keep = {k: v for k, v in meta.items() if k not in ("model", "quantization", "pruning")}
    save_model(out, pruned, tokenizer, **keep, pruning=record, pruned_from=str(checkpoint))
    return record


def distill_checkpoint(teacher_path, out_dir, student_cfg: ModelConfig, iters: int, alpha: float = 0.5,
                       temperature: float = 2.0, topk: int = 0, data: str | None = None, tokenizer=None,
                       val_fraction: float = 0.1, eval_iters: int = 20, device="cpu", seed: int = 1337,
                       **finetune_kwargs) -> dict:
    """Train a new `student_cfg` model from the teacher at `teacher_path` into `out_dir`; returns the record.

    tokenizer: the student's (default: the teacher's own; required for a Hugging Face teacher)."""
    check_output_folder(out_dir)
    teacher, t_tok = load_teacher(teacher_path, device)
    tokenizer = tokenizer or t_tok
    if tokenizer is None:
        raise ValueError(f"{teacher_path} has no minillm tokenizer: pass the student's tokenizer (a "
                         "tokenizer.json with the teacher's vocabulary)")
    if tokenizer.vocab_size != teacher.cfg.vocab_size:
        raise ValueError(f"the teacher's vocabulary has {teacher.cfg.vocab_size} tokens and the tokenizer "
                         f"{tokenizer.vocab_size}: distillation needs one shared vocabulary")
    meta = read_config(teacher_path) if t_tok is not None else {}  # a minillm teacher records its text
    source, train, val = _tokens(meta, tokenizer, data, val_fraction)
    student_cfg = dataclasses.replace(student_cfg, vocab_size=teacher.cfg.vocab_size, causal=teacher.cfg.causal)
    torch.manual_seed(seed)
    student = build_model(student_cfg).to(device)
    check_compatible(teacher, student, t_tok, tokenizer)
    obj = dict(objective=_objective(student), tokenizer=tokenizer)
    result = distill(student, teacher, train, iters, alpha=alpha, temperature=temperature, topk=topk,
                     device=device, seed=seed, **obj, **finetune_kwargs)
    record = {"teacher": str(teacher_path), "alpha": alpha, "temperature": temperature, "topk": topk,
              "iters": iters, "data": source, "params": [count_parameters(teacher), count_parameters(student)],
              "val_loss": [val_loss(m, val, iters=eval_iters, device=device, seed=seed, **obj)["loss"]
                           for m in (teacher, student)],
              "eval_batches": describe_batches(eval_iters, 8, min(student_cfg.block_size, len(val) - 1),
                                               f"{source} val") + f", seed {seed}",
              "final_train_loss": result["losses"][-1] if result["losses"] else None}
    save_model(out_dir, student, tokenizer, data=source, distillation=record)
    return record
