"""`minillm info`: the size of a model preset — parameters, FLOPs per token, memory for the weights.

    minillm info --preset gpt2
    minillm info --preset gpt2 --n_layer=24
"""

from __future__ import annotations

import torch

from minillm.model.config import PRESETS, ModelConfig, split_overrides
from minillm.model.transformer import build_model, count_parameters, flops_per_token


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}E{unit}"


def cmd_info(args, overrides: list[str]) -> int:
    """Print the size of a preset: parameters, FLOPs per token, memory for the weights."""
    (changes,) = split_overrides(overrides, ModelConfig)
    cfg = ModelConfig.from_preset(args.preset, **changes)
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


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs per token and weight memory of a preset",
                       description=cmd_info.__doc__ + " Any ModelConfig field can be overridden "
                       "with --key=value, e.g. minillm info --preset gpt2 --n_layer=24.")
    p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="model preset (default: gpt2)")
    p.set_defaults(func=cmd_info)
