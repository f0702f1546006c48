"""Decoding speed against nanoGPT, side by side in one process: within the window and far past it.

    OMP_NUM_THREADS=1 python -m bench.decode                      # tiny preset, 7 rounds, ~2 min
    OMP_NUM_THREADS=1 python -m bench.decode --rounds=3 --past=200 --plot=decode.png

nanoGPT is bench/nanogpt.py: its model and `generate` rebuilt op for op (no KV cache: every token
re-runs the last block_size tokens). Before timing, a minillm model with learned positions is
copied into it and both must pick the same 100 greedy tokens, past the window included. The
timed models have the same shape and random weights (speed does not depend on what they say):

    nanoGPT            GPT.generate, as nanoGPT's sample.py calls it
    minillm readable   generate() on the model as built: written-out norms, GELU and attention
    minillm            generate(flat_decode=True) after builtin_ops.for_inference: what `minillm
                       generate` and `minillm serve` run (PyTorch's fused norms, activations and
                       attention; decode steps without the module tree, minillm/generate/flat.py)
    minillm stride=1   the same, past the window re-prefilling every token: nanoGPT's exact window
    minillm engine     the server's continuous-batching engine (BatchEngine, flat steps) running
                       one request alone, detokenizing as it goes: within the window only, since
                       a served request must fit block_size
    minillm int8/int4  "minillm" on a quantized checkpoint (int8 per channel, int4 group 32, head and
                       embedding kept float as `minillm quantize` does by default), saved and loaded
                       back as `minillm generate` loads it: load_model with default_backend(cpu),
                       i.e. the C kernel of minillm/compress/cpu_kernel.py where it compiles

Every case samples as sample.py does (temperature 0.8, top-k 200) at batch 1. Two scenarios: a
4-token prompt + 60 tokens (all inside block_size 64) and a 16-token prompt + 1,000 tokens (almost
all past it, where minillm re-prefills block_size - K + 1 tokens every K = block_size // 4). The
cases run interleaved round by round, so a neighbour's load on a shared CPU hits every case alike;
the table reports medians and the ratios to nanoGPT and to fp32 "minillm" measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.nanogpt import GPT, from_minillm
from minillm.compress.quant import default_backend, quantize_model
from minillm.data.tokenizer import CharTokenizer
from minillm.generate.batching import BatchEngine, SamplingParams
from minillm.generate.sampling import generate
from minillm.model.builtin_ops import for_inference
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.weights.checkpoint import load_model, save_model

VOCAB = 65  # shakespeare-char's alphabet
SAMPLE = dict(temperature=0.8, top_k=200)  # nanoGPT's sample.py defaults


def minillm_model(preset: str, **overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset(preset, dropout=0.0, vocab_size=VOCAB, **overrides)).eval()


def check_same_function(preset: str, new: int = 100) -> None:
    """nanoGPT's forward and minillm's (readable and fused) pick the same greedy tokens."""
    ours = minillm_model(preset, positional="learned")
    theirs = from_minillm(ours)
    idx = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    want = theirs.generate_greedy(idx, new)  # past block_size when new > block_size - 8
    assert torch.equal(generate(ours, idx, new, 0.0, window_stride=1), want), "readable minillm != nanoGPT"
    assert torch.equal(generate(for_inference(ours), idx, new, 0.0, window_stride=1, flat_decode=True), want), \
        "fused minillm != nanoGPT"


def quantized_model(preset: str, scheme: str, folder: Path) -> CausalLM:
    """`minillm quantize` then `minillm generate`'s load: a checkpoint on disk, loaded with the
    backend the CLI's --backend=auto picks (default_backend), then the fused ops."""
    save_model(folder / scheme, quantize_model(minillm_model(preset), scheme, group_size=32))
    model = load_model(folder / scheme, backend=default_backend("cpu"))[0]
    return for_inference(model)


def cases(preset: str, engine: BatchEngine, schemes: list[str], folder: Path) -> dict:
    readable = minillm_model(preset)
    fused = for_inference(minillm_model(preset))
    cfg = readable.cfg
    torch.manual_seed(0)
    nanogpt = GPT(VOCAB, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, bias=cfg.bias).eval()
    params = lambda n: SamplingParams(max_tokens=n, seed=0, **SAMPLE)  # noqa: E731
    return {
        "nanoGPT": lambda idx, n: nanogpt.generate(idx, n, **SAMPLE),
        "minillm readable": lambda idx, n: generate(readable, idx, n, **SAMPLE),
        "minillm": lambda idx, n: generate(fused, idx, n, **SAMPLE, flat_decode=True),
        "minillm stride=1": lambda idx, n: generate(fused, idx, n, **SAMPLE, window_stride=1, flat_decode=True),
        "minillm engine": lambda idx, n: engine.complete([idx[0].tolist()], params(n)),
        **{f"minillm {scheme}": (lambda m: lambda idx, n: generate(m, idx, n, **SAMPLE, flat_decode=True))(
            quantized_model(preset, scheme, folder)) for scheme in schemes},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--within", type=int, default=60, help="new tokens after a 4-token prompt (inside the window)")
    ap.add_argument("--past", type=int, default=1000, help="new tokens after a 16-token prompt (past the window)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schemes", default="int8,int4", help="quantized cases to add, comma-separated ('' for none)")
    ap.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    ap.add_argument("--plot", default=None, help="write a bar chart of tokens/s to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    check_same_function(args.preset)
    tokenizer = CharTokenizer.from_text("".join(chr(58 + i) for i in range(VOCAB)))  # 65 characters
    engine = BatchEngine(for_inference(minillm_model(args.preset)), tokenizer, max_batch_size=1,
                         flat_decode=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:  # the quantized checkpoints, loaded back at once
            run = cases(args.preset, engine, [s for s in args.schemes.split(",") if s], Path(tmp))
        print(f"quantized layers on backend {default_backend('cpu')!r}")
        times = measure(run, args)
    finally:
        engine.shutdown()
    report(run, times, args)


def measure(run: dict, args) -> dict:
    g = torch.Generator().manual_seed(0)
    scenarios = {f"4 + {args.within} (within the window)": (torch.randint(0, VOCAB, (1, 4), generator=g), args.within),
                 f"16 + {args.past} (past the window)": (torch.randint(0, VOCAB, (1, 16), generator=g), args.past)}
    for idx, n in scenarios.values():  # warm-up
        for fn in run.values():
            fn(idx, min(n, 40))
    times: dict[tuple, list[float]] = {}
    for r in range(args.rounds):  # interleaved: every case once per round
        for s, (idx, n) in scenarios.items():
            for name, fn in run.items():
                if "within" in s and name.endswith("stride=1") or "past" in s and name.endswith("engine"):
                    continue  # within the window stride=1 is the default; the engine serves within it
                torch.manual_seed(r)
                t0 = time.perf_counter()
                fn(idx, n)
                times.setdefault((s, name), []).append(time.perf_counter() - t0)
    return {"scenarios": scenarios, "times": times}


def report(run: dict, measured: dict, args) -> None:
    scenarios, times = measured["scenarios"], measured["times"]
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    print(f"{args.preset} preset, batch 1, temperature 0.8, top-k 200; median of {args.rounds} rounds; {machine}")
    print(f"{'scenario':32} {'case':18} {'tokens/s':>9} {'ms/token':>9} {'vs nanoGPT':>10} {'vs minillm':>10}")
    rows = []
    for s, (idx, n) in scenarios.items():
        base = statistics.median(times[(s, "nanoGPT")])
        fp32 = statistics.median(times[(s, "minillm")])
        for name in run:
            if (s, name) not in times:
                continue
            t = statistics.median(times[(s, name)])
            rows.append(dict(scenario=s, case=name, tokens_per_s=n / t, ms_per_token=1e3 * t / n,
                             vs_nanogpt=base / t, vs_minillm=fp32 / t, rounds=args.rounds, preset=args.preset,
                             machine=machine))
            print(f"{s:32} {name:18} {n / t:9.1f} {1e3 * t / n:9.3f} {base / t:9.2f}x {fp32 / t:9.2f}x")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if args.plot:
        plot(rows, args.plot, f"{args.preset} preset decoding, batch 1 ({machine})")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    names = list(dict.fromkeys(r["case"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(sum(r["scenario"] == s for r in rows) for s in scen)
    labelled = set()
    for j, s in enumerate(scen):
        here = [r for r in rows if r["scenario"] == s]
        for i, row in enumerate(here):  # the cases this scenario ran, side by side around x = j
            x = j + (i - (len(here) - 1) / 2) * width
            label = None if row["case"] in labelled else row["case"]  # one legend entry per case
            labelled.add(row["case"])
            ax.bar(x, row["tokens_per_s"], width, color=colors[row["case"]], label=label)
            ax.text(x, row["tokens_per_s"], f"{row['vs_nanogpt']:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(scen)), scen)
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
