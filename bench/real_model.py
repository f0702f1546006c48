"""SmolLM2-135M-Instruct from its GGUF file: minillm against transformers and llama.cpp, measured.

    minillm pull smollm2-135m-instruct
    python -m bench.real_model --out=bench/results/real-model-cpu.json     # ~5 min on 2 CPU cores

What it measures, each on the same token ids:
    load        minillm's load_model of the GGUF in a fresh process: seconds and peak RSS
    perplexity  on the python-docs validation split (minillm's split_text), in windows of --window
                tokens: minillm fp32 (the GGUF dequantized), transformers loading the same GGUF
                (also dequantized to fp32), and llama.cpp on the GGUF as it is (Q4_1 matmuls), if
                llama-cpp-python is installed (an sdist that compiles llama.cpp: ~10 min on 2 cores)
    greedy      64 greedy tokens after each of 10 prompts: minillm's ids against transformers'
    answers     the model's greedy answers to 10 fixed questions, in its own chat template

transformers and llama.cpp are references, never dependencies of minillm: the script says what is
missing and measures the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def measure_load(path: str) -> dict:
    """load_model in a fresh interpreter: wall seconds and that process's peak RSS."""
    code = ("import time, resource, sys; t=time.perf_counter();"
            "from minillm.weights.checkpoint import load_model; m, tok, meta = load_model(sys.argv[1]);"
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    seconds, rss_kb = out.stdout.split()
    return {"seconds": round(float(seconds), 2), "peak_rss_mb": round(int(rss_kb) / 1024, 1)}


def eval_ids(tokenizer, n_tokens: int) -> list[int]:
    from minillm.data.dataset import load_text, split_text

    _, val = split_text(load_text("python-docs"))
    ids = tokenizer.encode(val, allowed_special="none")
    return ids[:n_tokens]


def nll_windows(logits_fn, ids: list[int], window: int) -> tuple[float, int]:
    """Sum of -log p(token) over non-overlapping windows (each scored from its own start) and how
    many tokens were scored: the first token of each window has no context and is not scored."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = logits_fn(chunk).double()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        target = torch.tensor(chunk[1:])
        total -= logp.gather(1, target[:, None]).sum().item()
        count += len(chunk) - 1
    return total, count


def run(args) -> dict:
    from minillm.weights.checkpoint import load_model
    from minillm.weights.pull import resolve

    path = str(resolve(args.model))
    result = {"model": path, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}", "date": time.strftime("%Y-%m-%d")}
    result["load"] = measure_load(path)
    print(f"load: {result['load']}", flush=True)
    model, tok, _ = load_model(path, block_size=2048)
    model.eval()
    ids = eval_ids(tok, args.tokens)
    ppl = {}

    with torch.inference_mode():
        def ours(chunk):
            return model(torch.tensor([chunk]))[0][0]
        nll, n = nll_windows(ours, ids, args.window)
        ppl["minillm fp32"] = math.exp(nll / n)
        print(f"perplexity minillm: {ppl['minillm fp32']:.4f} over {n} tokens", flush=True)
        hf = _transformers(path)
        if hf is not None:
            nll, n = nll_windows(lambda c: hf(torch.tensor([c])).logits[0], ids, args.window)
            ppl["transformers fp32"] = math.exp(nll / n)
            print(f"perplexity transformers: {ppl['transformers fp32']:.4f}", flush=True)
    llama = _llama_cpp(path, args.window)
    if llama is not None:
        nll, n = nll_windows(llama, ids, args.window)
        ppl["llama.cpp Q4_1"] = math.exp(nll / n)
        print(f"perplexity llama.cpp: {ppl['llama.cpp Q4_1']:.4f}", flush=True)
    result["perplexity"] = {"split": "python-docs val (last 10%)", "tokens_scored": n, "window": args.window,
                            **{k: round(v, 5) for k, v in ppl.items()}}
    if hf is not None:
        result["greedy"] = _greedy_vs_transformers(model, tok, hf, args.greedy_tokens)
    result["answers"] = _answers(model, tok)
    return result


def _transformers(path: str):
    try:
        import transformers
    except ImportError:
        print("transformers not installed: its columns are skipped", file=sys.stderr)
        return None
    p = Path(path)
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                             torch_dtype=torch.float32).eval()


def _llama_cpp(path: str, window: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python not installed (pip install llama-cpp-python; it compiles llama.cpp): "
              "its column is skipped", file=sys.stderr)
        return None
    llm = Llama(model_path=path, n_ctx=window, logits_all=True, verbose=False, n_threads=torch.get_num_threads())

    def logits(chunk):
        llm.reset()
        llm.eval(chunk)
        return torch.from_numpy(llm.scores[:len(chunk)].copy())
    return logits


def _greedy_vs_transformers(model, tok, hf, n_new: int) -> dict:
    from minillm.generate import generate

    same, firsts = 0, []
    for prompt in PROMPTS:
        idx = torch.tensor([tok.encode(prompt)])
        ours = generate(model, idx, n_new, temperature=0, flat_decode=True)[0, idx.shape[1]:].tolist()
        with torch.inference_mode():  # eos_token_id=None: both run all n_new steps, through an EOS too
            # (min_new_tokens would instead forbid the EOS, and the two would part there)
            theirs = hf.generate(idx, max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, idx.shape[1]:].tolist()
        same += ours == theirs
        firsts.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None))
        print(f"greedy {prompt[:30]!r}: {'equal' if ours == theirs else 'differs at ' + str(firsts[-1])}", flush=True)
    return {"prompts": len(PROMPTS), "new_tokens": n_new, "identical": same, "first_difference": firsts}


def _answers(model, tok) -> list[dict]:
    from minillm.data.chat_template import chat_prompt_for
    from minillm.generate import generate_text

    out = []
    for q in QUESTIONS:
        text, stops = chat_prompt_for(tok, [{"role": "user", "content": q}])
        [answer] = generate_text(model, tok, [text], 64, temperature=0, stop=stops, flat_decode=True)
        out.append({"question": q, "answer": answer.strip()})
        print(f"Q: {q}\nA: {answer.strip()}\n", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a pulled model's name or a .gguf path")
    p.add_argument("--tokens", type=int, default=4096, help="validation tokens to score (default 4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
    p.add_argument("--greedy_tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps({k: result[k] for k in ("load", "perplexity")}, indent=2))


if __name__ == "__main__":
    main()
