"""SmolLM2 re-exported by minillm's GGUF writer, run by llama.cpp: the same greedy tokens as minillm?

    minillm pull smollm2-135m-instruct
    python -m bench.gguf_roundtrip                     # f32 and q8_0, 4 prompts, 32 tokens each
    python -m bench.gguf_roundtrip --types=q8_0 --prompts=1

For each type: load the pulled GGUF with load_model (weights dequantized to fp32), write it back with
write_gguf, load the new file in minillm (so q8_0 runs the very weights llama.cpp runs, dequantized)
and in llama.cpp (llama-cpp-python), and greedy-decode --new_tokens tokens after each prompt in both.
A prompt whose tokens part is reported with minillm's top-2 logit gap at that step: below 0.05 it is
a near-tie that arithmetic order alone can flip (llama.cpp's q8_0 matmul also rounds the activations
to 8 bits, minillm's does not). Also reported: whether the file's tokenizer and chat template came
through unchanged, and the file sizes. Skips, saying why, when the model or llama-cpp-python is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.real_model_quality import first_difference, greedy, top2_gap

MODEL = Path("~/.cache/minillm/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is Python?<|im_end|>\n<|im_start|>assistant\n", "1, 2, 3, 5, 8,"]
NEAR_TIE = 0.05


def llama_cpp_greedy(llm, prompt: list[int], n_new: int) -> list[int]:
    """llama.cpp's greedy tokens: argmax of the last position's logits, one token at a time."""
    llm.reset()
    ids = list(prompt)
    llm.eval(ids)
    for _ in range(n_new):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(ids[-1:])
    return ids[len(prompt):]


def run(args) -> int:
    if not MODEL.exists():
        print(f"skipped: {MODEL} is absent (minillm pull smollm2-135m-instruct)")
        return 0
    try:
        from llama_cpp import Llama
    except ImportError:
        print("skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
        return 0
    from minillm.weights.checkpoint import load_model
    from minillm.weights.gguf import read_gguf
    from minillm.weights.gguf_write import write_gguf

    source = read_gguf(MODEL)
    context = source.metadata["llama.context_length"]  # kept as the file has it, not load_model's 2048 cap
    model, tok, _ = load_model(MODEL, block_size=context)
    prompts = [tok.encode(p) for p in PROMPTS[:args.prompts]]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for file_type in args.types.split(","):
            t0 = time.perf_counter()
            path = write_gguf(model, tok, Path(tmp) / f"smollm2.{file_type}.gguf", file_type=file_type)
            written = time.perf_counter() - t0
            back, tok2, _ = load_model(path)
            same_vocab = (tok2.tokens, tok2.merges, tok2.pre, tok2.chat_template) == \
                (tok.tokens, tok.merges, tok.pre, tok.chat_template)
            print(f"{file_type}: {path.stat().st_size / 2**20:.1f} MiB written in {written:.1f} s "
                  f"(source {MODEL.stat().st_size / 2**20:.1f} MiB); tokenizer and template unchanged: {same_vocab}")
            llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=args.threads)
            for text, p in zip(PROMPTS, prompts):
                want, got = greedy(back, p, args.new_tokens), llama_cpp_greedy(llm, p, args.new_tokens)
                i = first_difference(got, want)
                if i is None:
                    print(f"  {text[:30]!r:34} equal for {args.new_tokens} tokens: {tok.decode(want)[:60]!r}")
                    continue
                gap = top2_gap(back, p + want[:i])
                tie = gap < NEAR_TIE
                failures += not tie
                print(f"  {text[:30]!r:34} part at token {i}, minillm's top-2 gap {gap:.4f}"
                      f" ({'a near-tie' if tie else 'NOT a near-tie'})")
            del llm
    return 1 if failures else 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="f32,q8_0", help="comma-separated GGUF types to write (f32,f16,q8_0,q4_0,q4_1)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the fixed prompts")
    ap.add_argument("--new_tokens", type=int, default=32, help="greedy tokens after each prompt")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    sys.exit(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
