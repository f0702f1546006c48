"""Decoding past block_size: nanoGPT's sliding window against minillm's cached re-prefill.

    OMP_NUM_THREADS=1 python -m bench.decode_past_context            # tiny preset, 7 rounds
    OMP_NUM_THREADS=1 python -m bench.decode_past_context --rounds=3 --new=100

Once the context is full, nanoGPT re-runs the last block_size tokens for every new token; minillm
re-prefills the last block_size - K + 1 tokens once every K tokens and decodes the rest cached
(minillm/generate/sampling.py, `window_stride`). This script times, in ONE process, on one thread,
with the cases interleaved round by round (so a neighbour's load on a shared CPU hits every case
alike), and reports medians and ratios to nanoGPT:

    uncached      generate(use_cache=False, window_stride=1): the nanoGPT-style reference of
                  bench/test_generate.py, exactly nanoGPT's sliding window
    nanogpt-loop  the bare loop of nanoGPT's model.generate (crop, forward, argmax), no minillm glue
    stride=1      the KV cache until block_size, then nanoGPT's window (minillm's old behaviour)
    stride=T/4    the default cached re-prefill;   stride=T/2   a longer stride

Two scenarios: a 16-token prompt + NEW tokens (part inside the window, as a user runs it), and a
full block_size prompt + NEW tokens (every token past the window). Greedy decoding, random weights
(speed does not depend on what they say); each case first checks stride=1 against the reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from minillm.generate.sampling import generate
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM


def make_model(preset: str, attention: str) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, dropout=0.0, vocab_size=65, attention=attention)
    return CausalLM(cfg).eval()


@torch.no_grad()
def nanogpt_loop(model, idx, new):
    """nanoGPT's model.generate, greedy: crop to block_size, run it all, take the last logits."""
    T = model.cfg.block_size
    for _ in range(new):
        logits, _ = model(idx[:, -T:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T+1)
    return idx


def cases(T: int) -> dict:
    return {
        "uncached": lambda m, idx, n: generate(m, idx, n, 0.0, use_cache=False, window_stride=1),
        "nanogpt-loop": nanogpt_loop,
        "stride=1": lambda m, idx, n: generate(m, idx, n, 0.0, window_stride=1),
        f"stride={T // 4} (default)": lambda m, idx, n: generate(m, idx, n, 0.0),
        f"stride={T // 2}": lambda m, idx, n: generate(m, idx, n, 0.0, window_stride=T // 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--new", type=int, default=200, help="tokens generated per call")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    models = {a: make_model(args.preset, a) for a in ("naive", "sdpa")}
    T = models["naive"].cfg.block_size
    g = torch.Generator().manual_seed(0)
    prompts = {"prompt 16": torch.randint(0, 65, (1, 16), generator=g),
               f"prompt {T} (all past)": torch.randint(0, 65, (1, T), generator=g)}
    run = cases(T)
    for m in models.values():  # correctness once, and a warm-up
        for idx in prompts.values():
            ref = run["uncached"](m, idx, args.new)
            assert torch.equal(run["stride=1"](m, idx, args.new), ref)
            assert torch.equal(nanogpt_loop(m, idx, args.new), ref)
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):  # interleaved: every case once per round
        for a, m in models.items():
            for p, idx in prompts.items():
                for name, fn in run.items():
                    t0 = time.perf_counter()
                    fn(m, idx, args.new)
                    times.setdefault((a, p, name), []).append(time.perf_counter() - t0)

    print(f"{args.preset} (block {T}), {args.new} new tokens, batch 1, greedy; {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s); {platform.machine()} CPU, {torch.__version__}")
    print(f"{'attention':9} {'scenario':22} {'case':20} {'tokens/s':>9} {'vs uncached':>11} {'vs loop':>8}")
    for a in models:
        for p in prompts:
            base = statistics.median(times[(a, p, "uncached")])
            loop = statistics.median(times[(a, p, "nanogpt-loop")])
            for name in run:
                t = statistics.median(times[(a, p, name)])
                print(f"{a:9} {p:22} {name:20} {args.new / t:9.1f} {base / t:10.2f}x {loop / t:7.2f}x")


if __name__ == "__main__":
    main()
