"""The `minillm` command line.

    minillm info --preset gpt2            parameters, FLOPs per token, weight memory
    minillm <command> --help              what each command does and takes

Options that configure the model or the run are `--key=value`, checked against the config
dataclasses' fields and types; an unknown key is an error suggesting the closest names.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import PRESETS, ModelConfig, split_overrides

# Modules that define further commands. Each has `add_parser(sub)`, which adds its subparser and
# sets `func(args, overrides) -> exit code`; the code of a command lives beside what it runs.
COMMAND_MODULES: list[str] = [
    "minillm.data",
    "minillm.train_cli",
    "minillm.generate",
    "minillm.quant_io",
    "minillm.export",
    "minillm.serve",
    "minillm.report",
    "minillm.cloud",
]


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}E{unit}"


def cmd_info(args, overrides: list[str]) -> int:
    """Print the size of a preset: parameters, FLOPs per token, memory for the weights."""
    from .model import build_model, count_parameters, flops_per_token

    (changes,) = split_overrides(overrides, ModelConfig)
    cfg = ModelConfig.from_preset(args.preset, **changes)
    import torch

    with torch.device("meta"):  # shapes only: a 7B config would not fit in memory, and needs none
        model = build_model(cfg)
    n = count_parameters(model)
    n_non_emb = count_parameters(model, non_embedding=True)
    flops = flops_per_token(cfg, n_non_emb)
    kind = "causal LM (GPT-style)" if cfg.causal else "masked LM (BERT-style)"
    print(f"preset       {args.preset}: {kind}")
    print(f"shape        {cfg.n_layer} layers × {cfg.n_head} heads × {cfg.n_embd} wide, "
          f"block {cfg.block_size}, vocab {cfg.vocab_size}")
    print(f"layers       {cfg.positional} positions, {cfg.activation} FFN ({cfg.ffn_dim}), {cfg.norm}, "
          f"{'pre' if cfg.prenorm else 'post'}-norm, bias={cfg.bias}, tied={cfg.tie_weights}")
    print(f"parameters   {n:,} ({_human(n)}); {n_non_emb:,} without position embeddings")
    print(f"FLOPs/token  forward {_human(flops['forward'])}, training step {_human(flops['train'])} "
          f"(at T={cfg.block_size})")
    mem = "  ".join(f"{name} {_human(n * b, 'B')}" for name, b in
                    (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5)))
    print(f"weights      {mem}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm",
        description="minillm: a readable Transformer engine. Train, evaluate, generate, inspect.",
        epilog="Model and training options are --key=value (e.g. --n_layer=4). "
               "Run 'minillm COMMAND --help' for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="parameters, FLOPs per token and weight memory of a preset",
                       description=cmd_info.__doc__ + " Any ModelConfig field can be overridden "
                       "with --key=value, e.g. minillm info --preset gpt2 --n_layer=24.")
    p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="model preset (default: gpt2)")
    p.set_defaults(func=cmd_info)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = [r for r in rest if r.startswith("--") and "=" in r]
    stray = [r for r in rest if r not in overrides]
    if stray:
        parser.error(f"unrecognised arguments: {' '.join(stray)} (options are --key=value)")
    try:
        return args.func(args, overrides) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        # bad input, a missing file, or an optional extra not installed: the message says what to do
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
