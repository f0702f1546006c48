"""`minillm quantize`: int8/int4 weight-only quantization of a checkpoint, with a before/after report.

    minillm quantize out/shakespeare --scheme=int4 --group_size=64 --out=out/shakespeare-int4
    minillm generate out/shakespeare-int4 --prompt=ROMEO:       (any command loads the result)
"""

from __future__ import annotations

from pathlib import Path

from minillm.compress.quant import BACKENDS, GROUP_SIZES, SCHEMES
from minillm.compress.quantize import quantize_checkpoint
from minillm.cli.options import reject_unknown
from minillm.hardware import resolve_device


def cmd_quantize(args, overrides: list[str]) -> int:
    """Quantize a trained checkpoint's linear layers to int8 or int4 and report what it costs and gains."""
    reject_unknown(args, overrides, "quantize")
    if args.out is None:
        raise ValueError("--out=OUT_DIR is required: where to write the quantized checkpoint")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError("--out must differ from the input checkpoint (it would overwrite the float weights)")
    if args.scheme == "int4" and args.group_size not in GROUP_SIZES:
        raise ValueError(f"--group_size must be one of {GROUP_SIZES}, got {args.group_size}")
    device = resolve_device(args.device or "auto")
    r = quantize_checkpoint(args.checkpoint, args.out, args.scheme, args.group_size, args.include_embeddings,
                            args.include_head, args.backend, device, args.data, args.val_fraction,
                            args.eval_iters, args.batch_size, args.gen_tokens, args.seed)
    b, fb = r["bytes"], r["file_bytes"]
    print(f"quantized {args.checkpoint} -> {args.out}: {r['scheme']}, layers on the {'/'.join(r['backend'])} "
          f"path, {r['device']}")
    print(f"{'':22}{'before':>12}{'after':>12}{'change':>10}")
    print(f"{'weights (MB)':22}{b[0] / 1e6:12.3f}{b[1] / 1e6:12.3f}{b[1] / b[0]:9.2f}x")
    print(f"{'model.safetensors (MB)':22}{fb[0] / 1e6:12.3f}{fb[1] / 1e6:12.3f}{fb[1] / fb[0]:9.2f}x")
    if "val_ppl" in r:
        p = r["val_ppl"]
        print(f"{'val perplexity':22}{p[0]:12.4f}{p[1]:12.4f}{100 * (p[1] / p[0] - 1):+9.2f}%"
              f"   ({r['eval_batches']}, seed {r['eval_seed']})")
    else:
        print(f"perplexity: skipped ({r['val_ppl_skipped']})")
    if "tokens_per_s" in r:
        t = r["tokens_per_s"]
        print(f"{'generation tokens/s':22}{t[0]:12.1f}{t[1]:12.1f}{t[1] / t[0]:9.2f}x"
              f"   (batch 1, {args.gen_tokens} greedy tokens; same first {r['greedy_same_prefix']})")
    print(f"use it like any checkpoint: minillm generate {args.out} | minillm eval {args.out} | "
          f"minillm serve {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="int8/int4 weight-only quantization of a checkpoint, with a before/after report",
        description=cmd_quantize.__doc__ + " Linear layers become QuantLinear (minillm/compress/quant.py): "
        "int8 with one scale per output channel, or int4 with a scale and zero per group of --group_size "
        "inputs, two codes per byte. The report compares weight bytes, validation perplexity (on the "
        "checkpoint's training text, or --data) and greedy generation tokens/s before and after.",
        epilog="example: minillm quantize out/shakespeare --scheme=int4 --group_size=64 "
               "--out=out/shakespeare-int4.  The result is a checkpoint like any other: minillm generate, "
               "eval and serve load it, and so does minillm.load_model.")
    p.add_argument("checkpoint", help="a checkpoint folder written by `minillm train` (or save_model)")
    p.add_argument("--scheme", choices=SCHEMES, default="int8", help="int8 per channel, or int4 per group")
    p.add_argument("--group_size", type=int, default=64, help=f"int4 group size along K, one of {GROUP_SIZES}")
    p.add_argument("--out", default=None, help="output folder for the quantized checkpoint (required)")
    p.add_argument("--data", default=None, help="text for the perplexity check (default: the source "
                   "recorded in the checkpoint): a corpus name or a .txt file/folder")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last share of the text used as validation")
    p.add_argument("--include_embeddings", action="store_true", help="also quantize the token embedding")
    p.add_argument("--include_head", action="store_true",
                   help="also quantize the output head (with tied weights: only with --include_embeddings)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="matmul of the quantized layers (default: triton on CUDA, reference elsewhere)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--eval_iters", type=int, default=None,
                   help="validation batches per perplexity (default: the checkpoint's eval_iters, as minillm eval)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="validation batch size (default: the checkpoint's batch_size, as minillm eval)")
    p.add_argument("--gen_tokens", type=int, default=100, help="tokens generated for the speed check (0: skip)")
    p.add_argument("--seed", type=int, default=None, help="seed of the validation batches (default: the "
                   "checkpoint's seed + 1, so the perplexity is the one minillm eval prints)")
    p.set_defaults(func=cmd_quantize)
