"""Goals, tables and the chart of bench/real_model.py, computed from its records (plain dicts).

Every goal of issue 27 that this benchmark measures is a ratio (or a bound) taken from figures of
the same run; a goal whose rows did not run (a feature missing, an optional library absent) is
reported as unmeasured, with the reason, never dropped.
"""

from __future__ import annotations

import os
import platform

import torch


def machine(threads: int) -> dict:
    """The CPU model (from /proc/cpuinfo), core count, thread count and library versions."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)  # the last core's lines (all alike)
        cpu = info.get("model name\t", cpu).strip()
        flags = info.get("flags\t\t", "").split()
    except OSError:
        pass
    # the SIMD a CPU kernel can use: the machine has AVX2 and FMA, no AVX-512
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    out = {"kind": "machine", "cpu": cpu, "simd": simd, "cores": os.cpu_count(), "threads": threads,
           "torch": torch.__version__, "python": platform.python_version()}
    try:  # QuantLinear's "cpu" backend (issue 27 item 1): whether its C kernel compiled here, and if not why
        from minillm.compress import cpu_kernel
        out["cpu_kernel"] = "available" if cpu_kernel.available() else cpu_kernel.why_unavailable()
    except ImportError:
        out["cpu_kernel"] = "not in this checkout"
    for name, module in (("transformers", "transformers"), ("llama_cpp_python", "llama_cpp")):
        try:
            out[name] = __import__(module).__version__
        except ImportError:
            out[name] = None
    return out


def _speed(records, row, scenario, figure="decode_tok_s"):
    r = next((r for r in records if r["kind"] == "speed" and r["row"] == row and r.get("scenario") == scenario), None)
    return None if r is None else r.get(figure)


def _goal(name, measured, target, passed, must=None, note=""):
    return {"kind": "goal", "goal": name, "measured": measured, "target": target, "pass": passed, "must": must,
            "note": note}


def _ratio_goal(name, num, den, target, must=None):
    if num is None or den is None:
        return _goal(name, None, target, None, note="unmeasured: a row it needs did not run")
    ratio = num / den
    return _goal(name, round(ratio, 3), target, ratio >= target, None if must is None else ratio >= must)


def goals(records: list[dict], chat: str, long: str, chat_b8: str) -> list[dict]:
    """Issue 27's goals from this run's records. chat/long/chat_b8: the scenario names used."""
    s = lambda row, sc=chat, fig="decode_tok_s": _speed(records, row, sc, fig)  # noqa: E731
    out = [_ratio_goal("decode b1: minillm Q4_1 kept / llama.cpp >= 1.0 (must 0.6)", s("q4_1"), s("llama.cpp"), 1.0, 0.6),
           _ratio_goal("decode b1: minillm fp32 / transformers >= 1.3", s("fp32"), s("transformers"), 1.3),
           _ratio_goal("decode b1: minillm int8 / minillm fp32 >= 1.5", s("int8"), s("fp32"), 1.5),
           _ratio_goal("decode b1: minillm int4 g32 / minillm fp32 >= 2.5", s("int4"), s("fp32"), 2.5),
           _ratio_goal("decode b1: minillm Q4_1 kept / minillm fp32 >= 2.5", s("q4_1"), s("fp32"), 2.5),
           _ratio_goal("prefill: minillm fp32 / transformers >= 1.0", s("fp32", long, "prefill_tok_s"),
                       s("transformers", long, "prefill_tok_s"), 1.0)]
    measured = [k for k in ("fp32", "bf16", "int8", "int4", "q4_1") if s(k, long, "prefill_tok_s")]
    fastest = max(measured, key=lambda k: s(k, long, "prefill_tok_s"), default="fp32")
    out.append(_ratio_goal(f"prefill: minillm {fastest}{' (its fastest)' if measured else ''} / llama.cpp >= 0.5",
                           s(fastest, long, "prefill_tok_s"), s("llama.cpp", long, "prefill_tok_s"), 0.5))
    for key in ("fp32", "bf16", "int8", "int4", "q4_1"):
        if s(key) is not None:
            out.append(_ratio_goal(f"batch 8: minillm {key} aggregate / batch 1 >= 4", s(key, chat_b8), s(key), 4.0))
    rss = next((r for r in records if r["kind"] == "rss" and r["row"] == "q4_1"), None)
    out.append(_goal("RSS after loading the Q4_1 GGUF kept <= 250 MB above baseline",
                     None if rss is None else rss["above_baseline_mb"], 250,
                     None if rss is None else rss["above_baseline_mb"] <= 250,
                     note="" if rss else "unmeasured: the Q4_1-kept row did not run"))
    ppl = next((r["perplexity"] for r in records if r["kind"] == "perplexity"), {})
    for key, bound in (("q4_1", 1e-3), ("int8", 0.005), ("int4", 0.03)):
        name = (f"perplexity: {key} within {bound:g} relative of fp32" if key == "q4_1"
                else f"perplexity: {key} <= fp32 +{bound:.1%}")
        if key not in ppl or "fp32" not in ppl:
            out.append(_goal(name, None, bound, None, note="unmeasured: a row it needs did not run"))
            continue
        rel = ppl[key] / ppl["fp32"] - 1
        out.append(_goal(name, round(rel, 6), bound, abs(rel) <= bound if key == "q4_1" else rel <= bound))
    greedy = next((r for r in records if r["kind"] == "greedy" and r["row"] == "q4_1" and r["reference"] == "fp32"), None)
    if greedy is None:
        out.append(_goal("greedy: Q4_1 kept = fp32 (divergence only at near-ties)", None, None, None,
                         note="unmeasured: the Q4_1-kept row did not run"))
    else:
        real = greedy["prompts"] - greedy["identical"] - greedy["near_ties"]
        out.append(_goal("greedy: Q4_1 kept = fp32 (divergence only at near-ties)",
                         f"{greedy['identical']}/{greedy['prompts']} equal, {greedy['near_ties']} near-ties", 0,
                         real == 0))
    out.append(_goal("tiny preset: int8 and int4 decode >= 1.0x fp32", None, 1.0, None,
                     note="measured by bench/decode.py, not here"))
    return out


def _fmt(x, digits=1):
    return "—" if x is None else f"{x:,.{digits}f}"


def markdown(records: list[dict], scenario_names: list[str]) -> str:
    """The README's tables: tokens/s per row and scenario, quality, memory, goals."""
    m = next(r for r in records if r["kind"] == "machine")
    lines = [f"{m['cpu']} ({'/'.join(m['simd']) or 'no AVX2'}), {m['cores']} cores, {m['threads']} threads, torch {m['torch']}"
             f"{', transformers ' + m['transformers'] if m['transformers'] else ''}"
             f"{', llama-cpp-python ' + m['llama_cpp_python'] if m['llama_cpp_python'] else ''}", "",
             "| runtime | " + " | ".join(f"decode tok/s {s}" for s in scenario_names)
             + f" | prefill tok/s {scenario_names[-2]} |",
             "|---" * (len(scenario_names) + 2) + "|"]
    speed = [r for r in records if r["kind"] == "speed"]
    for key in dict.fromkeys(r["row"] for r in speed):
        mine = [r for r in speed if r["row"] == key]
        if all(r.get("scenario") is None for r in mine):  # the whole row was skipped
            lines.append(f"| {mine[0]['label']} | skipped: {mine[0]['skipped']} |" + " |" * len(scenario_names))
            continue
        label = next(r["label"] for r in mine if "label" in r)
        cells = [_fmt(_speed(records, key, s)) for s in scenario_names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(_speed(records, key, scenario_names[-2], 'prefill_tok_s'))} |")
    ppl = next((r for r in records if r["kind"] == "perplexity"), None)
    if ppl:
        base = ppl["perplexity"].get("fp32")
        lines += ["", f"| perplexity (python-docs val, {ppl['tokens_scored']:,} tokens, windows of {ppl['window']}) | "
                  "value | vs fp32 |", "|---|---|---|"]
        for key, v in ppl["perplexity"].items():
            lines.append(f"| {key} | {v:.4f} | {'' if base is None else f'{v / base - 1:+.4%}'} |")
    for r in records:
        if r["kind"] == "greedy" and r["reference"] == "fp32":
            lines.append(f"\ngreedy {r['row']} vs fp32, {r['new_tokens']} tokens: {r['identical']}/{r['prompts']} equal; "
                         f"first differences {[e['first_difference'] for e in r['per_prompt']]}")
    for r in records:
        if r["kind"] == "rss":
            lines.append(f"\nRSS after load_model {r['row']}: {r['above_baseline_mb']:,.0f} MB above the "
                         f"{r['baseline_mb']:,.0f} MB baseline (peak {r['peak_above_baseline_mb']:,.0f} MB), "
                         f"{r['load_s']} s")
    lines += ["", "| goal | measured | result |", "|---|---|---|"]
    for g in (r for r in records if r["kind"] == "goal"):
        result = g["note"] or ("pass" if g["pass"] else "MISS") + ("" if g["must"] is None else
                                                                  f" (must: {'pass' if g['must'] else 'MISS'})")
        lines.append(f"| {g['goal']} | {'—' if g['measured'] is None else g['measured']} | {result} |")
    return "\n".join(lines)


def chart(records: list[dict], scenario_names: list[str], path, model: str) -> None:
    """Grouped bars: decode tokens/s per scenario, one bar per runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [k for k in dict.fromkeys(r["row"] for r in records if r["kind"] == "speed")
            if any(_speed(records, k, s) for s in scenario_names)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, key in enumerate(rows):
        values = [_speed(records, key, s) or 0 for s in scenario_names]
        ax.bar([x + i * width for x in range(len(scenario_names))], values, width, label=key)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(scenario_names))], scenario_names)
    ax.set_ylabel("decode tokens/s (aggregate over the batch)")
    m = next(r for r in records if r["kind"] == "machine")
    ax.set_title(f"{model}: greedy decode, {m['cpu']}, {m['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
