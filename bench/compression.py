"""Compression lab, measured: pruning, distillation and quantization of the shakespeare-char CPU model.

    python bench/compression.py --data /path/to/tinyshakespeare.txt \
        --out bench/results/compression-cpu-2026-11-29.json [--baseline DIR] [--work DIR]

1. dense baseline: RECIPES["shakespeare-char-cpu"] (nanoGPT's CPU recipe: 4L/4H/128, block 64,
   2000 steps), trained here, or an existing checkpoint of that recipe passed as --baseline;
2. unstructured: magnitude (per layer), global magnitude, gradual (Zhu & Gupta) and 2:4, each at
   50% of the block weights, then a short fine-tune with the masks kept;
   control: the dense model fine-tuned for the same steps (does the fine-tune alone help?);
3. structured: 25% and 50% of the heads and FFN neurons of every layer removed (smaller dense model),
   fine-tuned; goal ≥ 1.2× CPU tokens/s at ≤ +5% perplexity;
4. distillation: a 2-layer, 64-wide student from the dense model as teacher (α = 0.5, τ = 2) vs the
   same student (same init, same batches, same steps) on the data alone (α = 0);
5. combinations: distilled + int8, structured-pruned + int4 (minillm.compress.quant.quantize_model);
6. one table (minillm.compress.report) of every checkpoint and a Pareto plot beside the JSON.
Every figure is measured in this run; the JSON records the machine and its load.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import machine_info  # noqa: E402
from minillm.weights.checkpoint import load_model, save_model  # noqa: E402
from minillm.compress.distill import distill  # noqa: E402
from minillm.train.fit import finetune, text_tokens, val_loss  # noqa: E402
from minillm.compress.jobs import prune_model  # noqa: E402
from minillm.compress.quant import quantize_model  # noqa: E402
from minillm.compress.report import format_table, measure, plot_pareto  # noqa: E402
from minillm.model.config import ModelConfig  # noqa: E402
from minillm.model.transformer import build_model  # noqa: E402
from minillm.train import RECIPES, TrainConfig, train  # noqa: E402

RECIPE = "shakespeare-char-cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="tinyshakespeare .txt")
    p.add_argument("--out", required=True, help="results JSON; the Pareto plot goes beside it (.png)")
    p.add_argument("--baseline", default=None, help="an existing checkpoint of the recipe (default: train one)")
    p.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    p.add_argument("--finetune_iters", type=int, default=300, help="fine-tune steps after pruning")
    p.add_argument("--distill_iters", type=int, default=2000, help="student training steps")
    p.add_argument("--eval_iters", type=int, default=50, help="validation batches (of 8) per perplexity")
    p.add_argument("--gen_tokens", type=int, default=60, help="greedy tokens per row for tokens/s")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (best kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 on a shared CPU: with more, OpenMP "
                   "threads spin against other processes' load and small ops get ~100x slower (measured)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="minillm-compression-"))
    t_start = time.perf_counter()
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "data": args.data,
              "torch_threads": torch.get_num_threads(), "settings": vars(args)}

    # 1. the dense baseline
    recipe = RECIPES[RECIPE]
    if args.baseline is None:
        cfg = ModelConfig.from_preset(recipe["preset"], **recipe["model"])
        tc = TrainConfig(**{**recipe["train"], "out_dir": str(work / "dense")})
        t0 = time.perf_counter()
        train(cfg, tc, args.data, progress=False)
        report["baseline_train_s"] = time.perf_counter() - t0
        args.baseline = str(work / "dense")
    dense, tok, meta = load_model(args.baseline)
    report["baseline"] = {"path": args.baseline, "step": meta.get("step"), "train": meta.get("train")}
    train_tokens, val_tokens = text_tokens(args.data, tok)
    ev = lambda m: val_loss(m, val_tokens, iters=args.eval_iters)  # noqa: E731  same batches for all
    saved = {"dense": args.baseline}
    keep = {k: v for k, v in meta.items() if k not in ("model", "quantization")}
    ft = dict(batch_size=12, learning_rate=3e-4, warmup_iters=20)

    def save(name, model, **record):
        saved[name] = str(save_model(work / name, model, tok, **keep, **record))
        print(f"{time.perf_counter() - t_start:6.0f} s  saved {name}", flush=True)

    # 2. unstructured, and the control
    runs = {}
    control = copy.deepcopy(dense)
    t0 = time.perf_counter()
    finetune(control, train_tokens, args.finetune_iters, **ft)
    runs["dense + fine-tune (control)"] = {"val": ev(control), "s": time.perf_counter() - t0}
    save("dense-ft", control)
    for name, method, schedule in (("magnitude-50", "magnitude", "oneshot"), ("global-50", "global", "oneshot"),
                                   ("gradual-50", "magnitude", "gradual"), ("2:4", "2:4", "oneshot")):
        t0 = time.perf_counter()
        oneshot, _ = prune_model(copy.deepcopy(dense), method, 0.5)
        pruned, record = prune_model(copy.deepcopy(dense), method, 0.5, train_tokens, args.finetune_iters,
                                     schedule, **ft)
        record["val_ppl"] = [ev(dense)["ppl"], ev(pruned)["ppl"]]
        runs[name] = {"val_before_finetune": ev(oneshot) if schedule == "oneshot" else None, "val": ev(pruned),
                      "record": record, "s": time.perf_counter() - t0}
        save(name.replace(":", "-"), pruned, pruning=record)

    # 3. structured
    for frac in (0.25, 0.5):
        name = f"structured-{int(frac * 100)}"
        t0 = time.perf_counter()
        oneshot, _ = prune_model(copy.deepcopy(dense), "structured", frac)
        pruned, record = prune_model(copy.deepcopy(dense), "structured", frac, train_tokens, args.finetune_iters, **ft)
        record["val_ppl"] = [ev(dense)["ppl"], ev(pruned)["ppl"]]
        runs[name] = {"val_before_finetune": ev(oneshot), "val": ev(pruned), "record": record,
                      "s": time.perf_counter() - t0}
        save(name, pruned, pruning=record)

    # 4. distillation: same student, same init, same batches; α = 0.5 vs data alone
    student_cfg = dataclasses.replace(dense.cfg, n_layer=2, n_head=2, n_embd=64, ffn_hidden=0)
    dist = {"teacher": args.baseline, "student": dataclasses.asdict(student_cfg), "iters": args.distill_iters,
            "alpha": 0.5, "temperature": 2.0}
    sched = dict(batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100)  # the recipe's schedule
    for name, alpha in (("student-data-only", None), ("student-distilled", 0.5)):
        torch.manual_seed(0)
        student = build_model(student_cfg)
        t0 = time.perf_counter()
        if alpha is None:
            losses = finetune(student, train_tokens, args.distill_iters, **sched)
        else:
            losses = distill(student, dense, train_tokens, args.distill_iters, alpha=alpha, temperature=2.0,
                             **sched)["losses"]
        dist[name] = {"val": ev(student), "final_train_loss": losses[-1], "s": time.perf_counter() - t0}
        save(name, student, **({"distillation": {"teacher": args.baseline, "alpha": alpha, "temperature": 2.0}}
                               if alpha is not None else {}))
    dist["val_loss_margin"] = dist["student-data-only"]["val"]["loss"] - dist["student-distilled"]["val"]["loss"]
    dist["teacher_val"] = ev(dense)

    # 5. combinations (and plain quantized baselines for reference)
    for name, src, scheme, group in (("dense-int8", "dense", "int8", 128), ("dense-int4", "dense", "int4", 32),
                                     ("student-distilled-int8", "student-distilled", "int8", 128),
                                     ("structured-25-int4", "structured-25", "int4", 32),
                                     ("magnitude-50-int8", "magnitude-50", "int8", 128)):
        model, _, m_meta = load_model(saved[src])
        q = quantize_model(model, scheme, group)
        extra = {k: v for k, v in m_meta.items() if k in ("pruning", "distillation")}
        save(name, q, **extra)

    # 6. one table and the Pareto plot
    rows = measure(list(saved.values()), args.data, (1, 16), args.gen_tokens, args.eval_iters, rounds=args.rounds)
    for row, name in zip(rows, saved):
        row["name"] = row["label"] = name
    table = format_table(rows)
    print(table)
    base = next(r for r in rows if r["name"] == "dense")
    control = next(r for r in rows if r["name"] == "dense-ft")  # the dense model after the same fine-tune
    for r in rows:
        r["ppl_vs_dense"] = r["val_ppl"] / base["val_ppl"] - 1
        r["ppl_vs_dense_finetuned"] = r["val_ppl"] / control["val_ppl"] - 1
        for b in (1, 16):
            r[f"speedup@{b}"] = r[f"tokens_per_s@{b}"] / base[f"tokens_per_s@{b}"]
    report.update(runs=runs, distillation=dist, table=rows, table_text=table,
                  load_average_1m_at_end=os.getloadavg()[0], wall_s=time.perf_counter() - t_start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot_pareto(rows, out.with_suffix(".png"))
    print(f"-> {out} and {out.with_suffix('.png')} ({report['wall_s']:.0f} s, checkpoints in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
