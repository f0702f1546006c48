"""`minillm prune`: magnitude, 2:4 or structured pruning of a checkpoint, optionally fine-tuned.

    minillm prune out/shakespeare --method=magnitude --sparsity=0.5 --finetune_iters=200 --out=out/sparse50
    minillm prune out/shakespeare --method=structured --sparsity=0.25 --finetune_iters=300 --out=out/small
    minillm generate out/small --prompt=ROMEO:       (any command loads the result)
"""

from __future__ import annotations

from pathlib import Path

from minillm.compress.jobs import prune_checkpoint
from minillm.compress.prune import METHODS
from minillm.cli.options import reject_unknown
from minillm.hardware import resolve_device


def cmd_prune(args, overrides: list[str]) -> int:
    """Prune a checkpoint's block weights (zeros) or whole heads/neurons (a smaller model) and report the cost."""
    reject_unknown(args, overrides, "prune")
    if args.out is None:
        raise ValueError("--out=OUT_DIR is required: where to write the pruned checkpoint")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError("--out must differ from the input checkpoint")
    device = resolve_device(args.device or "auto")
    r = prune_checkpoint(args.checkpoint, args.out, args.method, args.sparsity, args.finetune_iters, args.schedule,
                         args.importance, args.data, args.val_fraction, args.eval_iters, device, args.seed,
                         learning_rate=args.learning_rate, batch_size=args.batch_size,
                         eval_batch_size=args.eval_batch_size)
    p = r["params"]
    print(f"pruned {args.checkpoint} -> {args.out}: {r['method']} at {r['sparsity']:.0%}, "
          f"{r['finetune_iters']} fine-tune steps ({r['schedule']}), {device}")
    print(f"{'':22}{'before':>12}{'after':>12}{'change':>10}")
    print(f"{'parameters':22}{p[0]:12,}{p[1]:12,}{p[1] / p[0]:9.2f}x")
    print(f"{'block weights zero':22}{'':>12}{r['weight_sparsity']:12.1%}")
    if "val_ppl" in r:
        v = r["val_ppl"]
        print(f"{'val perplexity':22}{v[0]:12.4f}{v[1]:12.4f}{100 * (v[1] / v[0] - 1):+9.2f}%   ({r['eval_batches']})")
    print(f"use it like any checkpoint: minillm generate {args.out} | minillm eval {args.out} | "
          f"minillm compress report {args.checkpoint} {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prune", help="magnitude / 2:4 / structured pruning of a checkpoint, with an optional fine-tune",
        description=cmd_prune.__doc__ + " Methods (minillm/compress/prune.py): magnitude (per layer) and global "
        "zero the smallest |w|; 2:4 keeps 2 of every 4 inputs; heads, neurons and structured remove whole "
        "attention heads / FFN neurons (the same number per layer) and save a smaller model. Masks are kept "
        "through the fine-tune. Only the Linear layers inside the blocks are pruned.",
        epilog="example: minillm prune out/shakespeare --method=magnitude --sparsity=0.5 --finetune_iters=200 "
               "--out=out/sparse50.  A quantized checkpoint cannot be pruned: prune the float one, then quantize.")
    p.add_argument("checkpoint", help="a float checkpoint folder written by `minillm train` (or save_model)")
    p.add_argument("--method", choices=METHODS, default="magnitude", help="what to remove")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction in [0, 1) of weights (magnitude, global) or heads/neurons (heads, neurons, "
                        "structured) to remove; 2:4 is always 0.5")
    p.add_argument("--finetune_iters", type=int, default=0, help="fine-tune steps after pruning (0: none)")
    p.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                   help="gradual: raise sparsity during the fine-tune on Zhu & Gupta's cubic schedule")
    p.add_argument("--importance", choices=("magnitude", "taylor"), default="magnitude",
                   help="how heads/neurons are ranked: weight norm or first-order Taylor |w·dL/dw|")
    p.add_argument("--out", default=None, help="output folder for the pruned checkpoint (required)")
    p.add_argument("--data", default=None, help="text for fine-tuning and perplexity (default: the source "
                   "recorded in the checkpoint)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last share of the text used as validation")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="fine-tune peak learning rate")
    p.add_argument("--batch_size", type=int, default=12, help="fine-tune batch size")
    p.add_argument("--eval_iters", type=int, default=None, help="validation batches per perplexity (default: "
                   "the checkpoint's eval_iters, the batches minillm eval scores)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="validation batch size (default: the "
                   "checkpoint's batch_size, as minillm eval)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the batches")
    p.set_defaults(func=cmd_prune)
