"""`minillm distill`: train a small student from a teacher checkpoint (Hinton et al. 2015).

    minillm distill --teacher=out/big --preset=tiny --n_layer=2 --out_dir=out/student --max_iters=1000
    minillm distill --teacher=out/big --preset=tiny --alpha=0.0 ...      (alpha 0: data alone, a baseline)
"""

from __future__ import annotations

from minillm.compress.jobs import distill_checkpoint
from minillm.data.tokenizer import load_tokenizer
from minillm.hardware import resolve_device
from minillm.model.config import PRESETS, ModelConfig, split_overrides


def cmd_distill(args, overrides: list[str]) -> int:
    """Train a student model on the teacher's softened distribution plus the data's own targets."""
    (model_changes,) = split_overrides(overrides, ModelConfig)  # the student's shape: --n_layer=2, ...
    if args.out_dir is None:
        raise ValueError("--out_dir=DIR is required: where to write the student checkpoint")
    student_cfg = ModelConfig.from_preset(args.preset, **model_changes)
    device = resolve_device(args.device or "auto")
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    r = distill_checkpoint(args.teacher, args.out_dir, student_cfg, args.max_iters, args.alpha, args.temperature,
                           args.topk, args.data, tok, args.val_fraction, args.eval_iters, device, args.seed,
                           learning_rate=args.learning_rate, batch_size=args.batch_size,
                           warmup_iters=args.warmup_iters)
    pt, ps = r["params"]
    vt, vs = r["val_loss"]
    print(f"distilled {args.teacher} ({pt:,} parameters) -> {args.out_dir} ({ps:,}, {ps / pt:.2f}x): "
          f"{args.max_iters} steps, alpha={args.alpha}, temperature={args.temperature}"
          f"{f', top-{args.topk} teacher logits' if args.topk else ''}, {device}")
    print(f"val loss: teacher {vt:.4f}, student {vs:.4f}   ({r['eval_batches']})")
    print(f"use it like any checkpoint: minillm generate {args.out_dir} | minillm eval {args.out_dir}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a small student from a teacher's soft targets (knowledge distillation)",
        description=cmd_distill.__doc__ + " loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * "
        "cross-entropy (minillm/compress/distill.py). The teacher is a minillm checkpoint or a Hugging Face "
        "GPT-2/BERT folder with the same vocabulary; its logits are computed on the fly. The student's shape "
        "is --preset plus --key=value model overrides; it trains on the teacher's recorded text (or --data).",
        epilog="example: minillm distill --teacher=out/big --preset=tiny --n_layer=2 --out_dir=out/student")
    p.add_argument("--teacher", required=True, help="teacher: a minillm checkpoint or a Hugging Face folder")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="the student's model preset")
    p.add_argument("--out_dir", default=None, help="where to write the student checkpoint (required)")
    p.add_argument("--max_iters", type=int, default=1000, help="training steps")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) loss, in [0, 1]")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of both distributions")
    p.add_argument("--topk", type=int, default=0, help="distil from the teacher's top-k logits only (0: all)")
    p.add_argument("--data", default=None, help="training text (default: the teacher's recorded source)")
    p.add_argument("--tokenizer", default=None, help="the student's tokenizer.json (default: the teacher's; "
                   "needed for a Hugging Face teacher)")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup_iters", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--batch_size", type=int, default=12, help="batch size")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last share of the text used as validation")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the student's weights and batches")
    p.set_defaults(func=cmd_distill)
