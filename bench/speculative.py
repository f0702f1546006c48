"""Speculative decoding against plain decoding: acceptance rate and tokens/s, greedy, batch size 1.

    python -m bench.speculative TARGET [--draft=PATH] [--new_tokens=128] [--rounds=5] [--threads=1]

TARGET (and the draft) is anything `minillm generate` loads: a checkpoint folder, a run's out_dir, a
Hugging Face folder or a GGUF file. Two prompts: a paragraph to summarize (the answer reuses its
phrases) and a function to edit (the answer copies most of it), in the model's chat template if
its tokenizer has one. Each round runs plain decoding,
prompt lookup and, with --draft, the draft model on each prompt, one after the other, so that a
shared machine's noise falls on all of them alike; the table gives medians over the rounds. Every
speculative run is checked to produce plain greedy decoding's very tokens. Models run as
`minillm generate` runs them (fused layers, flat decode steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minillm.data.chat_template import chat_prompt_for
from minillm.generate.sampling import generate_tokens
from minillm.generate.speculative import speculative_generate
from minillm.model.builtin_ops import for_inference
from minillm.weights.checkpoint import load_model

PARAGRAPH = """The garbage collector in CPython works alongside reference counting. Every object keeps a \
count of the references to it, and when the count drops to zero the object is freed at once. Reference \
counting alone cannot free a group of objects that refer to each other in a cycle, so the cyclic garbage \
collector looks for such groups from time to time. It sorts objects into three generations: new objects \
start in the youngest generation, and objects that survive a collection move to an older one, which is \
collected less often."""

FUNCTION = '''def squares_of_even(numbers):
    """Return the squares of the even numbers in numbers, in order."""
    result = []
    for n in numbers:
        if n % 2 == 0:
            result.append(n * n)
    return result'''


def prompts(tok) -> dict[str, str]:
    """The two tasks, in the model's chat template if its tokenizer has one, else as plain text to continue."""
    tasks = {"summary": f"Summarize this paragraph in two sentences.\n\n{PARAGRAPH}",
             "code": f"Rewrite this function to use a list comprehension; keep its name and docstring. Reply "
                     f"with the code only.\n\n{FUNCTION}"}
    if getattr(tok, "chat_template", None):
        return {name: chat_prompt_for(tok, [{"role": "user", "content": text}])[0] for name, text in tasks.items()}
    # a character-level model's context is short (block_size 256 for char-small): shorter prompts
    return {"summary": f"{PARAGRAPH.split('. ')[1]}.\n\nIn short: when the count of references to an object",
            "code": "def squares(numbers):\n    result = []\n    for n in numbers:\n        result.append(n * n)\n"
                    "    return result\n\ndef cubes(numbers):\n"}


def timed(run) -> tuple[list[int], float, dict]:
    stats, t0 = {}, time.perf_counter()
    ids = [int(t) for t in run(stats)]
    return ids, time.perf_counter() - t0, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block_size", type=int, default=None, help="a shorter context (smaller caches)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = {} if args.block_size is None else {"block_size": args.block_size}
    target, tok, _ = load_model(args.target, **over)
    guessers = {"lookup": "lookup"}
    if args.draft:
        guessers["draft"] = for_inference(load_model(args.draft)[0])
    for_inference(target)
    results = {}  # (prompt, method) -> [(tokens/s, acceptance)]
    for _ in range(args.rounds):
        for name, prompt in prompts(tok).items():
            idx = torch.tensor([tok.encode(prompt)])
            want, dt, _ = timed(lambda s: generate_tokens(target, idx, args.new_tokens, 0.0, flat_decode=True))
            results.setdefault((name, "plain"), []).append((len(want) / dt, None))
            for method, draft in guessers.items():
                got, dt, st = timed(lambda s: speculative_generate(target, idx, args.new_tokens, draft, args.k,
                                                                   0.0, stats=s, flat_decode=True))
                assert got == want, f"{method} changed the greedy tokens on {name}"
                rate, per_forward = st["accepted"] / max(st["drafted"], 1), st["tokens"] / max(st["rounds"], 1)
                results.setdefault((name, method), []).append((len(got) / dt, rate, per_forward))
    print(f"target {args.target}, draft {args.draft}, k={args.k}, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    for name in ("summary", "code"):
        base = statistics.median(r[0] for r in results[(name, "plain")])
        for method in ["plain", *guessers]:
            rows = results[(name, method)]
            speed = statistics.median(r[0] for r in rows)
            extra = "" if method == "plain" else (f"  acceptance {statistics.median(r[1] for r in rows):.0%}, "
                                                  f"{statistics.median(r[2] for r in rows):.2f} tokens/forward")
            print(f"{name:8s} {method:7s} {speed:8.1f} tokens/s  {speed / base:5.2f}x{extra}")
    print("sample (code, plain):", repr(tok.decode(want)[:200]))


if __name__ == "__main__":
    main()
