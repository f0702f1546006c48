"""One table for every compressed form of a model: what it costs, what it loses, how fast it runs.

For each checkpoint (original, quantized, pruned, distilled, or combinations):
    params       weights the model computes with (a quantized matrix counts its N·K entries)
    nonzero      of those, how many are not exactly 0 (what unstructured pruning changes)
    disk MB      model.safetensors on disk
    val ppl      validation perplexity, on the same batches of the same held-out text for every model
    tok/s @B     greedy generation speed with B prompts decoded together (KV cache), on this machine

and a Pareto plot: perplexity against bytes and against tokens/s. A model is on the Pareto front
when no other model is at least as good on both axes and better on one; only those are worth
choosing, and which one depends on whether memory or speed is the constraint.

    minillm compress report out/dense out/int8 out/pruned out/student --plot=pareto.png
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minillm.weights.checkpoint import MODEL_FILE, check_finite_forward, find_checkpoint, load_model
from minillm.compress.quant import QuantLinear
from minillm.compress.quantize import recorded_data_source
from minillm.generate.sampling import generate
from minillm.train.fit import text_tokens, val_loss


def count_weights(model) -> tuple[int, int]:
    """(weights, non-zero weights), each tensor once; a QuantLinear counts its dequantized N·K."""
    total, nonzero = 0, 0
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]  # .modules(): a tied one once
    tensors = [p.detach() for p in model.parameters()] + [m.dequantized_weight() for m in quant]
    tensors += [m.bias for m in quant if m.bias is not None]
    for t in tensors:
        total += t.numel()
        nonzero += int((t != 0).sum())
    return total, nonzero


def kind_of(meta: dict) -> str:
    """A short description from what config.json records: pruning, distillation, quantization."""
    parts = []
    if "distillation" in meta:
        parts.append("distilled")
    if "pruning" in meta:
        p = meta["pruning"]
        parts.append(f"pruned {p['method']} {p['sparsity']:.0%}")
    if "quantization" in meta:
        parts.append(meta["quantization"]["scheme"])
    return " + ".join(parts) or "dense"


@torch.no_grad()
def decode_seconds(model, batch_size: int, n: int, start_id: int = 0, device="cpu") -> float:
    """Seconds to greedily decode n tokens for `batch_size` rows at once (KV cache)."""
    prompt = torch.full((batch_size, 1), start_id, dtype=torch.long, device=device)  # (B, 1)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompt, n, temperature=0.0)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(checkpoints, data: str | None = None, batch_sizes=(1, 16), gen_tokens: int = 64,
            eval_iters: int = 20, device="cpu", seed: int = 1337, val_fraction: float = 0.1,
            rounds: int = 3) -> list[dict]:
    """One row per checkpoint; the validation text is `data` or the first checkpoint's recorded one,
    tokenized once (every checkpoint must share the tokenizer, checked).

    Speed: `rounds` rounds, each timing every model once in turn, best time kept. Interleaving
    matters on a shared machine: a burst of other load then slows one round of every model rather
    than every round of one model, and the best round is the machine's own speed."""
    rows, models, val, tok0 = [], [], None, None
    for path in checkpoints:
        model, tok, meta = load_model(path, device=device)
        check_finite_forward(model, path)
        if tok is None:
            raise ValueError(f"{path} has no tokenizer.json: cannot encode the validation text")
        if tok0 is None:
            source = data or recorded_data_source(meta)
            if source is None:
                raise ValueError(f"{path} records no training text: pass --data=TEXT")
            tok0, val = tok, text_tokens(source, tok, val_fraction)[1]
        elif tok.to_dict() != tok0.to_dict():
            raise ValueError(f"{path} has another tokenizer than {checkpoints[0]}: perplexities would not compare")
        n, nz = count_weights(model)
        objective = "clm" if model.cfg.causal else "mlm"
        rows.append({"name": str(path), "kind": kind_of(meta), "params": n, "nonzero": nz,
                     "disk_bytes": (find_checkpoint(path) / MODEL_FILE).stat().st_size,
                     "val_ppl": val_loss(model, val, iters=eval_iters, device=device, seed=seed,
                                         objective=objective, tokenizer=tok)["ppl"]})
        models.append(model)
    start = (tok0.encode("\n")[-1:] or [0])[0]
    for b in batch_sizes:
        best = [float("inf")] * len(models)
        for m in models:  # warm-up: allocations, kernel selection
            if m.cfg.causal:
                decode_seconds(m, b, min(4, gen_tokens), start, device)
        for _ in range(rounds):
            for i, m in enumerate(models):
                if m.cfg.causal:  # (a masked LM does not generate)
                    best[i] = min(best[i], decode_seconds(m, b, gen_tokens, start, device))
        for row, m, t in zip(rows, models, best):
            if m.cfg.causal:
                row[f"tokens_per_s@{b}"] = b * gen_tokens / t
    return rows


def format_table(rows: list[dict], batch_sizes=(1, 16)) -> str:
    head = f"{'checkpoint':28} {'kind':30} {'params':>9} {'nonzero':>9} {'disk MB':>8} {'val ppl':>8}" + \
        "".join(f" {'tok/s@' + str(b):>10}" for b in batch_sizes)
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r["name"] if len(r["name"]) <= 28 else "…" + r["name"][-27:]
        lines.append(f"{name:28} {r['kind'][:30]:30} {r['params']:9,} {r['nonzero']:9,} {r['disk_bytes'] / 1e6:8.3f} "
                     f"{r['val_ppl']:8.3f}" + "".join(f" {r.get(f'tokens_per_s@{b}', float('nan')):10.1f}"
                                                    for b in batch_sizes))
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, ppl) no other point beats: lower-or-equal on both, lower on one."""
    return [i for i, (c, p) in enumerate(points)
            if not any((c2 <= c and p2 <= p) and (c2 < c or p2 < p) for c2, p2 in points)]


def plot_pareto(rows: list[dict], path: str | Path, batch_size: int = 1) -> Path:
    """Two panels, perplexity vs disk bytes and vs tokens/s at `batch_size`; Pareto fronts joined."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot global state, no display
        from matplotlib.ticker import FormatStrFormatter
    except ImportError as e:
        raise ImportError("the Pareto plot needs matplotlib: pip install matplotlib") from e
    from minillm.files import atomic_write

    fig = Figure(figsize=(13, 4.6), dpi=100, layout="constrained")
    ax_bytes, ax_speed = fig.subplots(1, 2)
    key = f"tokens_per_s@{batch_size}"
    # cost axes where lower is better: bytes, and -tokens/s (so "more speed" is "less cost")
    for ax, cost, label in ((ax_bytes, lambda r: r["disk_bytes"] / 1e6, "model.safetensors (MB, log scale)"),
                            (ax_speed, lambda r: -r.get(key, float("nan")), f"tokens/s at batch {batch_size}")):
        pts = [(cost(r), r["val_ppl"]) for r in rows]
        front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
        xs = [abs(c) for c, _ in pts]
        ax.plot([xs[i] for i in front], [pts[i][1] for i in front], color="tab:orange", lw=1, zorder=1,
                label="Pareto front")
        for i, (x, (_, p), r) in enumerate(zip(xs, pts, rows)):  # numbered points, named in the legend
            ax.scatter([x], [p], s=60 if i in front else 25, zorder=2, label=f"{i + 1}  {r.get('label') or r['kind']}")
            ax.annotate(str(i + 1), (x, p), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity (lower is better)")
        ax.grid(alpha=0.3)
    ax_bytes.set_xscale("log")
    ax_bytes.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # 0.5, 1, 2 rather than 10^x
    ax_bytes.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    handles, labels = ax_bytes.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    ax_bytes.set_title("quality vs size")
    ax_speed.set_title("quality vs speed")
    path = Path(path)
    with atomic_write(path, suffix=path.suffix or ".png") as tmp:
        fig.savefig(tmp)
    return path
