"""SmolLM2-135M-Instruct from its GGUF file: every minillm variant against transformers and llama.cpp.

    minillm pull smollm2-135m-instruct
    python -m bench.real_model                      # the full run, ~30-45 min on a quiet 2-core CPU (estimated)
    python -m bench.real_model --quick              # tiny sizes: proves every row runs (a few min when quiet)
    python -m bench.real_model --only=fp32,q4_1,llama.cpp --parts=speed

Rows (bench/real_model_rows.py): minillm fp32 (the GGUF dequantized), bf16, minillm's own int8
(per channel) and int4 (groups of 32) of those fp32 weights, the GGUF kept quantized (Q4_1/Q8_0
blocks as they are, load_model(keep_quantized=True)), each the way `minillm generate` runs it
(for_inference, flat decode steps, the default quantized backend unless --backend); transformers'
fp32 `generate` on the same GGUF; llama.cpp through llama-cpp-python on the file as it is. A row
whose feature is missing in this checkout, or whose library is not installed, prints why it is
skipped; the rest are measured.

Parts (--parts):
    rss         load_model in a fresh process per variant: RSS above the torch+minillm baseline
    speed       greedy decode tokens/s at batch 1 and --batch, after the chat prompt (34 tokens) and
                after --long_prompt tokens of held-out text (prefill tokens/s of that one too),
                --new_tokens new tokens, --rounds alternating rounds (bench/real_model_speed.py)
    perplexity  every variant on the python-docs validation split (bench/real_model_quality.py)
    greedy      --greedy_tokens greedy tokens after each prompt: every variant against fp32 (where
                Q4_1-kept parts from fp32, the top-2 logit gap), fp32 against transformers
    answers     the fp32 model's greedy answers to fixed questions, in its own chat template

Goals (issue 27) are computed as ratios of this run's figures and printed pass/fail with the
measured value. Results: JSON lines (--out) and a bar chart beside it (.png); a markdown table
ready for the README is printed last, the machine named. transformers and llama.cpp are
references, never dependencies of minillm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.real_model_quality import (eval_ids, greedy_against_fp32, greedy_against_transformers,
                                      perplexities)
from bench.real_model_report import chart, goals, machine, markdown
from bench.real_model_rows import (KEYS, LLAMA_MISSING, MINILLM_KEYS, has_keep_quantized, llama_cpp_logits,
                                   llama_cpp_row, minillm_rows, transformers_model, transformers_row)
from bench.real_model_speed import rss_after_load, scenarios, time_rows

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "import numpy as np\n",
           "The three laws of thermodynamics", "Python is a programming language that",
           "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", "1, 2, 3, 5, 8,",
           "The quick brown fox", "SELECT name FROM users WHERE"]
QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "What is 12 + 7?",
             "What is 9 times 8?", "Write a Python one-liner that reverses a string s.",
             "Summarize in one sentence: The mitochondria is the organelle that produces most of the "
             "chemical energy a cell needs, in the form of ATP.",
             "What color is the sky on a clear day?", "Name a prime number greater than 10.",
             "Translate 'thank you' into French.", "Who wrote Romeo and Juliet?"]
CHAT_QUESTION = "What is Python?"  # in SmolLM2's template (its default system turn): a 34-token prompt
PARTS = ("rss", "speed", "perplexity", "greedy", "answers")
# (full, --quick) defaults of the size options
SIZES = {"rounds": (3, 1), "new_tokens": (128, 8), "long_prompt": (512, 32), "tokens": (4096, 128),
         "window": (512, 64), "greedy_tokens": (64, 8), "prompts": (10, 2), "questions": (10, 2)}


def chat_ids(tok) -> list[int]:
    """CHAT_QUESTION as a user turn in the model's chat template (the plain text if it has none)."""
    from minillm.data.chat_template import chat_prompt_for

    rendered = chat_prompt_for(tok, [{"role": "user", "content": CHAT_QUESTION}])
    return tok.encode(rendered[0] if rendered else CHAT_QUESTION)


def answers(model, tok, questions: list[str], n_new: int, log=print) -> dict:
    from minillm.data.chat_template import chat_prompt_for
    from minillm.generate import generate_text

    out = []
    for q in questions:
        rendered = chat_prompt_for(tok, [{"role": "user", "content": q}])
        text, stops = rendered if rendered else (q, [])
        [answer] = generate_text(model, tok, [text], n_new, temperature=0, stop=stops, flat_decode=True)
        out.append({"question": q, "answer": answer.strip()})
        log(f"Q: {q}\nA: {answer.strip()}\n")
    return {"kind": "answers", "row": "fp32", "answers": out}


def run(args) -> list[dict]:
    from minillm.weights.pull import resolve

    log = lambda *a: print(*a, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    path = str(resolve(args.model))
    keys = [k for k in KEYS if k in args.only]
    records = [machine(args.threads) | {"model": path, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}]
    if "rss" in args.parts:
        for key, kw in (("fp32", {}), ("q4_1", {"keep_quantized": True})):
            if key not in keys:
                continue
            if key == "q4_1" and not has_keep_quantized():
                log("rss q4_1: skipped, load_model has no keep_quantized=True in this checkout")
                continue
            records.append(rss_after_load(path, key, **kw))
            log(f"rss {key}: {records[-1]}")

    rows, tok = minillm_rows(path, [k for k in keys if k in MINILLM_KEYS], quant_head=args.quant_head,
                             backend=args.backend)
    hf = transformers_model(path) if "transformers" in keys else None
    if "transformers" in keys:
        rows["transformers"] = transformers_row(path, hf)
    chat, long = chat_ids(tok), eval_ids(tok, args.long_prompt)
    if "llama.cpp" in keys and "speed" in args.parts:
        rows["llama.cpp"] = llama_cpp_row(path, args.threads, n_ctx=max(len(chat), len(long)) + args.new_tokens + 8)
    for row in rows.values():
        log(f"row {row.key:>12}: {row.label}" + (f"  -- SKIPPED: {row.skip}" if row.skip else ""))
    cases = scenarios(chat, long, batches=(1, args.batch))

    if "speed" in args.parts:
        records += time_rows(list(rows.values()), cases, args.new_tokens, args.rounds, log)
    if "perplexity" in args.parts:
        ids = eval_ids(tok, args.tokens)
        fns = {k: r.logits for k, r in rows.items() if r.logits is not None and r.skip is None}
        if "llama.cpp" in keys:
            fn = llama_cpp_logits(path, args.window, args.threads)
            if fn is None:
                log(f"perplexity llama.cpp: skipped, {LLAMA_MISSING}")
            else:
                fns["llama.cpp"] = fn
        records.append(perplexities(fns, ids, args.window, log))
    if "greedy" in args.parts and "fp32" in rows:
        prompts = [tok.encode(p) for p in PROMPTS[:args.prompts]]
        records += greedy_against_fp32({k: r for k, r in rows.items() if k in MINILLM_KEYS and r.skip is None},
                                       prompts, args.greedy_tokens, log)
        if hf is not None:
            records.append(greedy_against_transformers(rows["fp32"].model, hf, prompts, args.greedy_tokens, log))
    if "answers" in args.parts and "fp32" in rows:
        records.append(answers(rows["fp32"].model, tok, QUESTIONS[:args.questions], 64 if not args.quick else 8, log))
    records += goals(records, cases[0].name, cases[-2].name, cases[1].name)
    records.append({"kind": "table", "markdown": markdown(records, [c.name for c in cases])})
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a pulled model's name or a llama .gguf path")
    p.add_argument("--quick", action="store_true", help="tiny sizes (1 round, 8 new tokens, 32-token long prompt, "
                   "128 tokens of perplexity, 2 prompts): proves every row runs, measures nothing worth quoting")
    p.add_argument("--only", default=",".join(KEYS), help=f"comma-separated rows to run (default all: {','.join(KEYS)})")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch and llama.cpp threads (default torch's: {torch.get_num_threads()} here)")
    p.add_argument("--batch", type=int, default=8, help="the batched scenario's batch size (default 8)")
    p.add_argument("--quant_head", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                   help="int8/int4 rows quantize the tied head+embedding too (default false: it stays fp32, "
                        "as quantize_model's default)")
    p.add_argument("--backend", default=None, help="matmul of every quantized row's layers (default: load_model's)")
    for name, (full, quick) in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {full} ({quick} with --quick)")
    p.add_argument("--out", default=None, help="JSON lines file (default bench/results/real-model-cpu-DATE.jsonl); "
                   "the chart goes beside it as .png")
    args = p.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    args.parts = [k.strip() for k in args.parts.split(",") if k.strip()]
    for what, given, known in (("--only", args.only, KEYS), ("--parts", args.parts, PARTS)):
        unknown = [k for k in given if k not in known]
        if unknown:
            p.error(f"{what}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.threads < 1 or args.batch < 1:
        p.error("--threads and --batch must be at least 1")
    from minillm.compress.quant import BACKENDS

    if args.backend is not None and args.backend not in BACKENDS:
        p.error(f"--backend={args.backend}: choose from {', '.join(BACKENDS)}")
    return args


def check_model(name: str) -> None:
    """A one-line exit, before minutes of loading, when --model names no file."""
    from minillm.weights.pull import resolve

    try:
        if not resolve(name).is_file():
            raise FileNotFoundError(f"--model={name}: no such file, and not a model `minillm pull` knows")
    except FileNotFoundError as e:  # (a known model not pulled yet: resolve's message says how)
        raise SystemExit(f"python -m bench.real_model: error: {e}") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    check_model(args.model)
    records = run(args)
    out = Path(args.out or f"bench/results/real-model-cpu-{time.strftime('%Y-%m-%d')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    names = [r["scenario"] for r in records if r["kind"] == "speed" and "scenario" in r]
    if names:
        chart(records, list(dict.fromkeys(names)), out.with_suffix(".png"), Path(records[0]["model"]).name)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out}")
    print(records[-1]["markdown"])


if __name__ == "__main__":
    main()
