"""Speed and memory for bench/real_model.py: decode and prefill in alternating rounds, RSS after load.

Timing. Each generation is timed from the call to its last token. The first token comes out right
after the prefill (prefill + one sample), each later one after one decode step, so for B prompts of
T tokens and n new tokens:

    prefill tokens/s = B·T / t_first
    decode tokens/s  = B·(n − 1) / (t_total − t_first)      (aggregate over the batch)
    end-to-end       = B·n / t_total

Rounds alternate: round r runs every scenario, and in each scenario every row, starting the rows
at a different one each round, so a neighbour's load on a shared machine (or the CPU's clock)
lands on all rows alike. Each figure is the median over the rounds; ratios between rows are taken
between medians of the same run.

Memory. load_model in a fresh interpreter per variant: resident set size (RSS, /proc/self/statm)
after `import torch, minillm` (the baseline) and after the load, and the process's peak
(ru_maxrss). What a variant costs is its RSS above that baseline.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass

from bench.real_model_rows import Row


@dataclass
class Scenario:
    name: str  # "b1 p34"
    batch: int
    prompt: list[int]


def scenarios(chat_ids: list[int], long_ids: list[int], batches=(1, 8)) -> list[Scenario]:
    """Every batch size for the chat prompt, then for the long prompt (the same prompt in every row)."""
    return [Scenario(f"b{b} p{len(p)}", b, p) for p in (chat_ids, long_ids) for b in batches]


def _rates(batch: int, T: int, n_new: int, t_first: float, t_total: float) -> dict:
    decode_s = t_total - t_first
    return {"prefill_tok_s": batch * T / t_first,
            "decode_tok_s": batch * (n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else None,
            "e2e_tok_s": batch * n_new / t_total, "t_first_s": t_first, "t_total_s": t_total}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def time_rows(rows: list[Row], cases: list[Scenario], n_new: int, rounds: int, log=print) -> list[dict]:
    """One record per (row, scenario): medians over `rounds` alternating rounds (see the docstring)."""
    shortest = min(cases, key=lambda s: len(s.prompt))
    for row in rows:  # warm-up: first-call allocations, thread pools, lazy imports
        if row.skip is None:
            try:  # a row that cannot generate at all is reported (and left out of every later part),
                row.generate([shortest.prompt], 2)  # not allowed to stop the other rows' measurements
            except Exception as e:  # noqa: BLE001 (any error: it is printed and recorded, not hidden)
                row.skip = f"FAILED: {type(e).__name__}: {e}"
                log(f"row {row.key}: {row.skip}")
    live = [r for r in rows if r.skip is None]
    samples: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for case in cases:
            order = live[r % len(live):] + live[:r % len(live)]
            for row in order:
                if case.batch > 1 and row.no_batch:
                    continue
                tokens, t_first, t_total = row.generate([case.prompt] * case.batch, n_new)
                if len(tokens) != case.batch or any(len(t) != n_new for t in tokens):
                    raise RuntimeError(f"{row.key}: {case.name} returned {[len(t) for t in tokens]} tokens, not "
                                       f"{case.batch} x {n_new}")
                rates = _rates(case.batch, len(case.prompt), n_new, t_first, t_total)
                samples.setdefault((row.key, case.name), []).append(rates)
                log(f"round {r + 1}/{rounds} {case.name:>9} {row.key:>12}: decode {rates['decode_tok_s'] or 0:8.1f} "
                    f"tok/s, prefill {rates['prefill_tok_s']:8.1f} tok/s")
    records = []
    for row in rows:  # in the rows' order, skipped ones included
        if row.skip is not None:
            records.append({"kind": "speed", "row": row.key, "label": row.label, "skipped": row.skip})
            continue
        for case in cases:
            base = {"kind": "speed", "row": row.key, "label": row.label, "scenario": case.name, "batch": case.batch,
                    "prompt_tokens": len(case.prompt), "new_tokens": n_new, **row.info}
            got = samples.get((row.key, case.name))
            if got is None:
                records.append({**base, "skipped": row.no_batch})
                continue
            records.append({**base, "rounds": len(got),
                            **{k: _median([g[k] for g in got]) for k in ("decode_tok_s", "prefill_tok_s", "e2e_tok_s")},
                            "per_round_decode_tok_s": [g["decode_tok_s"] for g in got]})
    return records


_RSS_CODE = r"""
import gc, json, os, resource, sys, time
import torch
from minillm.weights.checkpoint import load_model

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

gc.collect()
base = rss_mb()
t = time.perf_counter()
model, tok, meta = load_model(sys.argv[1], **json.loads(sys.argv[2]))
seconds = time.perf_counter() - t
gc.collect()
print(json.dumps({"baseline_mb": base, "after_load_mb": rss_mb(), "seconds": seconds,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def rss_after_load(path: str, key: str, **load_kwargs) -> dict:
    """load_model(path, **load_kwargs) in a fresh interpreter: RSS above the torch+minillm baseline."""
    out = subprocess.run([sys.executable, "-c", _RSS_CODE, path, json.dumps(load_kwargs)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load_model({path}, {load_kwargs}) in a fresh process failed:\n{out.stderr[-2000:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"kind": "rss", "row": key, "load_kwargs": load_kwargs, "load_s": round(m["seconds"], 2),
            "baseline_mb": round(m["baseline_mb"], 1), "above_baseline_mb": round(m["after_load_mb"] - m["baseline_mb"], 1),
            "peak_above_baseline_mb": round(m["peak_mb"] - m["baseline_mb"], 1)}
