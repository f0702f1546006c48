"""Convergence check: nanoGPT's shakespeare-char recipes trained with minillm, val loss per eval step.

    python bench/convergence.py --recipe cpu --data /path/to/tinyshakespeare.txt \
        --out bench/results/convergence-cpu-2026-11-23.json

Recipes (nanoGPT's config/train_shakespeare_char.py and its README's CPU variant):
    cpu  4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iters, no dropout, lr 1e-3 → 1e-4,
         warm-up 100, beta2 0.99, eval_iters 20.           nanoGPT: val loss ~1.88 at step 2000
    gpu  the baby GPT: 6/6/384, block 256, batch 64, 5000 iters, dropout 0.2, eval_iters 200.
                                                           nanoGPT: best val loss ~1.47
Writes JSON (machine, configs, val loss per eval step, speed) and a PNG plot beside it.
Targets: docs/guides/benchmarks-cloud.md, "Speed targets" (cpu ≤ 1.90 at step 2000; gpu ≤ 1.48 best).
"""

from __future__ import annotations

import argparse
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
from minillm.model.config import ModelConfig  # noqa: E402
from minillm.train import RECIPES, TrainConfig, train  # noqa: E402

RECIPE_NAMES = {"cpu": "shakespeare-char-cpu", "gpu": "shakespeare-char"}
# What nanoGPT reaches with the same recipe (docs/guides/benchmarks-cloud.md, "Speed targets") and what we must reach.
REFERENCE = {
    "cpu": {"nanogpt_val_loss_at_end": 1.8857, "target_val_loss_at_end": 1.90, "nanogpt_ms_per_iter_2core": 55},
    "gpu": {"nanogpt_best_val_loss": 1.4611, "target_best_val_loss": 1.48, "nanogpt_ms_per_iter_h100": 10.8},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--data", default="shakespeare", help="tinyshakespeare .txt (or 'shakespeare' to download)")
    p.add_argument("--out", required=True, help="results JSON path; the plot goes beside it (.png)")
    p.add_argument("--out_dir", default=None, help="checkpoint folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="--key=value overrides, e.g. --compile=true --max_iters=200")
    args, extra = p.parse_known_args(argv)
    overrides = [*args.overrides, *extra]

    from minillm.model.config import split_overrides
    recipe = RECIPES[RECIPE_NAMES[args.recipe]]
    train_changes, model_changes = split_overrides(overrides, TrainConfig, ModelConfig)
    model_cfg = ModelConfig.from_preset(recipe["preset"], **{**recipe["model"], **model_changes})
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="minillm-convergence-")
    train_cfg = TrainConfig(**{**recipe["train"], "out_dir": out_dir, **train_changes})

    t0 = time.perf_counter()
    result = train(model_cfg, train_cfg, args.data)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    evals = [{k: r[k] for k in ("step", "train_loss", "val_loss")} for r in records if "val_loss" in r]
    report = {
        "recipe": RECIPE_NAMES[args.recipe],
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "data": args.data,
        "model": dataclasses.asdict(result["model"].cfg),
        "train": dataclasses.asdict(train_cfg),
        "evals": evals,
        "val_loss_at_end": evals[-1]["val_loss"],
        "best_val_loss": min(e["val_loss"] for e in evals),
        "best_step": min(evals, key=lambda e: e["val_loss"])["step"],
        "ms_per_iter": result["ms_per_iter"],
        "tokens_per_s": result["tokens_per_s"],
        "wall_s": wall,
        # speed depends on what else the machine runs: record threads and load next to the figure
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "reference": REFERENCE[args.recipe],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"val loss at step {evals[-1]['step']}: {report['val_loss_at_end']:.4f} (best {report['best_val_loss']:.4f} "
          f"at {report['best_step']}); {report['ms_per_iter']:.1f} ms/iter; {wall:.0f} s total on "
          f"{report['machine']['device']} -> {out}")
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in report["evals"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(steps, [e["train_loss"] for e in report["evals"]], "o-", ms=3, label="minillm train")
    ax.plot(steps, [e["val_loss"] for e in report["evals"]], "o-", ms=3, label="minillm val")
    ref = report["reference"]
    target = ref.get("target_val_loss_at_end", ref.get("target_best_val_loss"))
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target}")
    ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(f"{report['recipe']} on {report['machine']['device']} ({report['ms_per_iter']:.0f} ms/iter)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
