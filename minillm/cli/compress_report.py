"""`minillm compress report`: one table (and a Pareto plot) for any set of checkpoints.

    minillm compress report out/dense out/int8 out/sparse50 out/student --plot=pareto.png
"""

from __future__ import annotations

from minillm.compress.report import format_table, measure, plot_pareto
from minillm.cli.options import reject_unknown
from minillm.hardware import resolve_device


def cmd_report(args, overrides: list[str]) -> int:
    """Parameters, bytes on disk, validation perplexity and tokens/s of each checkpoint, on this machine."""
    reject_unknown(args, overrides, "compress report")
    device = resolve_device(args.device or "auto")
    rows = measure(args.checkpoints, args.data, tuple(args.batch_sizes), args.gen_tokens, args.eval_iters, device,
                   args.seed, rounds=args.rounds)
    print(format_table(rows, tuple(args.batch_sizes)))
    print(f"(val ppl: {args.eval_iters} batches of 8, same for every row; tok/s: {args.gen_tokens} greedy tokens "
          f"per row, best of {args.rounds} interleaved rounds, on {device})")
    if args.plot:
        print(f"Pareto plot: {plot_pareto(rows, args.plot, args.batch_sizes[0])}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="compare compressed models: minillm compress report A B C ...",
                       description="Compression tools that work on several checkpoints at once.")
    inner = p.add_subparsers(dest="compress_command", metavar="SUBCOMMAND")
    r = inner.add_parser("report", help="one table: parameters, bytes, perplexity, tokens/s; a Pareto plot",
                         description=cmd_report.__doc__ + " Any checkpoints: original, quantized, pruned, "
                         "distilled. They must share a tokenizer, so the perplexities are on the same tokens.",
                         epilog="example: minillm compress report out/dense out/int8 out/sparse50 --plot=p.png")
    r.add_argument("checkpoints", nargs="+", help="checkpoint folders to compare")
    r.add_argument("--plot", default=None, help="write a Pareto plot (perplexity vs bytes and vs tokens/s) here")
    r.add_argument("--data", default=None, help="validation text (default: the first checkpoint's recorded one)")
    r.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="generation batch sizes timed")
    r.add_argument("--gen_tokens", type=int, default=64, help="greedy tokens generated per row for the speed")
    r.add_argument("--rounds", type=int, default=3, help="timing rounds over all models; the best is kept")
    r.add_argument("--eval_iters", type=int, default=20, help="validation batches per perplexity")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--seed", type=int, default=1337, help="seed of the validation batches")
    r.set_defaults(func=cmd_report)
    p.set_defaults(func=lambda args, overrides: p.print_help() or 2)  # `minillm compress` alone: its help
