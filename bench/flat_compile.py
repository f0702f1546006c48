"""Does torch.compile of the decode step pay for itself on a CPU? And what does the flat step save?

    python -m bench.flat_compile                         # SmolLM2-135M fp32 if pulled, 128 tokens
    python -m bench.flat_compile --model=toy --tokens=32 # a 30-layer GQA model of toy width (seconds
                                                         # per round; compiling still takes minutes)

One process, one model, greedy decoding after a --prompt-token prompt, four ways of running the same
decode step (minillm/generate/core.py's decode_step), rounds alternating so that a neighbour's load
on a shared CPU hits each alike:

    modules     the module tree (nn.Module.__call__ per layer)
    flat        FlatDecoder: the same ops, bit for bit, without the module tree (the CLI's default)
    compiled    FlatDecoder(compile=True): the step through torch.compile (Inductor), compiled once
                before the rounds; its compile time is reported apart

For each: ms per token (median over rounds), Python-level calls per token (cProfile's count, built-in
calls included), and for `compiled` the compile time and the break-even: how many tokens a generation
must have before compiling is paid back (compile time / ms saved per token; "never" if it saves none).
Prints a table and one JSON line; --out appends the JSON line to a file.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch

from minillm.generate.core import decode_step, prefill
from minillm.generate.flat import FlatDecoder
from minillm.model.builtin_ops import for_inference
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM

REAL = Path.home() / ".cache/minillm/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def load(which: str, n_layer: int = 30):
    """SmolLM2-135M with fp32 weights (the pulled GGUF dequantized), or a toy of its layer structure."""
    if which == "smollm2":
        from minillm.weights.checkpoint import load_model

        model = load_model(REAL)[0]  # fp32 weights (keep_quantized defaults to False in the library)
    else:  # SmolLM2's layers (30 by default), 9 query / 3 key-value heads, RMSNorm, RoPE, SwiGLU; toy width
        torch.manual_seed(0)
        model = CausalLM(ModelConfig(vocab_size=512, block_size=1024, n_layer=n_layer, n_head=9, n_kv_head=3,
                                     n_embd=72, ffn_hidden=192, positional="rotary", norm="rmsnorm",
                                     activation="swiglu", bias=False))
    return for_inference(model.eval())


@torch.inference_mode()
def run(model, flat, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per decode step over `tokens` greedy steps after the prompt."""
    cache = model.new_cache(1, prompt.shape[1] + tokens + 1)
    logits = prefill(model, prompt, cache)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decode_step(model, logits.argmax(-1)[:, None], cache, flat)
    return (time.perf_counter() - start) / max(tokens, 1)


def calls_per_token(model, flat, prompt: torch.Tensor, tokens: int = 8) -> float:
    profiler = cProfile.Profile()
    profiler.enable()
    run(model, flat, prompt, tokens)
    profiler.disable()
    prefill_only = cProfile.Profile()
    prefill_only.enable()
    run(model, flat, prompt, 0)
    prefill_only.disable()
    return (pstats.Stats(profiler).total_calls - pstats.Stats(prefill_only).total_calls) / tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "toy"), default="smollm2" if REAL.exists() else "toy")
    ap.add_argument("--prompt", type=int, default=34, help="prompt tokens (default 34: the README's chat prompt)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per round (default 128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30, help="--model=toy: its layers (default 30, SmolLM2's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled case (minutes of compiling)")
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, args.layers)
    prompt = torch.randint(0, 500, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    cases = {"modules": None, "flat": FlatDecoder.build(model)}
    result = {"model": args.model, "prompt": args.prompt, "tokens": args.tokens, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    if not args.no_compile:
        start = time.perf_counter()
        cases["compiled"] = FlatDecoder.build(model, compile=True)
        run(model, cases["compiled"], prompt, 3)  # the first steps compile (and recompile once, dynamic)
        result["compile_s"] = time.perf_counter() - start
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, flat in cases.items():
            times[name].append(run(model, flat, prompt, args.tokens))
    print(f"{'case':10} {'ms/token':>9} {'calls/token':>12}")
    for name, flat in cases.items():
        ms, calls = 1e3 * statistics.median(times[name]), calls_per_token(model, flat, prompt)
        result[name] = {"ms_per_token": ms, "calls_per_token": calls}
        print(f"{name:10} {ms:9.2f} {calls:12.0f}")
    if "compiled" in cases:
        saved_ms = result["flat"]["ms_per_token"] - result["compiled"]["ms_per_token"]
        result["break_even_tokens"] = 1e3 * result["compile_s"] / saved_ms if saved_ms > 0 else None
        even = f"{result['break_even_tokens']:.0f} tokens" if saved_ms > 0 else "never (no time saved per token)"
        print(f"compile: {result['compile_s']:.1f} s; pays back after {even}")
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
