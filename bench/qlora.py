"""QLoRA against LoRA on the real SmolLM2-135M-Instruct: peak memory, time per step, the loss curves.

    minillm pull smollm2-135m-instruct
    python -m bench.qlora                        # 30 steps, batch 4, alpaca-1100 in template "chat", lr 5e-4
    python -m bench.qlora --quick                # 3 steps at tiny sizes: proves both rows run

The same short instruction-tuning run twice, each in a fresh Python process so that its peak resident
memory (getrusage's ru_maxrss, the high-water mark of the whole process) is its own:

    lora-fp32   the GGUF dequantized to fp32 (load_model), LoRA adapters (rank 8 on qkv, proj)
    qlora-int4  the GGUF's Q4_1 blocks kept as int4 g32 (load_model(keep_quantized=True)) and its Q8_0
                embedding/tied head as int8 g32; the same adapters over the frozen quantized layers
                (finetune/qlora.py); where this checkout lacks keep_quantized, the fp32 model is quantized
                with quantize_model("int4", 32) instead (and its peak then includes the fp32 load: said)

Both take the same batches (one seed), the same adapters' initialisation and constant learning rate,
so the curves differ only by the base: Ŵ (4-bit) instead of W. Reported per row: RSS after loading,
peak RSS, ms/step (the first step left out: it allocates), the losses, and for QLoRA the share of the
merged update (α/r)·B·A smaller than half a quantization step of its group (what re-quantizing a merged
model would round away; finetune/qlora.py). Results: JSON lines and a PNG of the two loss curves in
bench/results/. A missing model file is a skipped run with its reason.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

MODEL = Path.home() / ".cache" / "minillm" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = ("lora-fp32", "qlora-int4")


def rss_mb() -> float:
    """Current resident memory (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_variant(variant: str, block_size: int):
    """(model, tokenizer, how it was built) for one row."""
    import inspect

    from minillm.weights.checkpoint import load_model

    if variant == "lora-fp32":
        lm, tok, _ = load_model(MODEL, "cpu", block_size=block_size)
        return lm, tok, "GGUF dequantized to fp32"
    if "keep_quantized" in inspect.signature(load_model).parameters:
        lm, tok, _ = load_model(MODEL, "cpu", keep_quantized=True, block_size=block_size)
        return lm, tok, "GGUF Q4_1 kept as int4 g32 (Q8_0 table as int8 g32), backend " + \
            next(m.backend for m in lm.modules() if hasattr(m, "backend"))
    from minillm.finetune.qlora import load_quantized_base  # falls back to quantize_model int4 g32

    lm, tok, _ = load_quantized_base(MODEL, "int4", "cpu")
    return lm, tok, "fp32 quantized with quantize_model int4 g32 (peak includes the fp32 load)"


def below_half_step(model) -> float:
    """The share of ΔW = (α/r)·B·A entries whose size is under half the int4 step s of their group."""
    import torch

    from minillm.finetune.lora import LoRALinear

    small = total = 0
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.base is not None and m.base.scheme == "int4":
            with torch.no_grad():
                dw = m.delta_weight()  # (N, K)
                s = m.base.scales.repeat_interleave(m.base.group_size, dim=1)  # (N, K): the step of each weight
                small += int((dw.abs() < s / 2).sum())
                total += dw.numel()
    return small / total if total else float("nan")


def worker(args) -> dict:
    """One row, in this (fresh) process."""
    import torch

    from minillm.data.tasks import instruction_records, split_records
    from minillm.finetune.classify import pad_id
    from minillm.finetune.instruct import encode_records, make_batch
    from minillm.finetune.lora import apply_lora, lora_parameters
    from minillm.finetune.qlora import is_quantized
    from minillm.train.fit import fit_step

    torch.set_num_threads(args.threads)
    base_rss = rss_mb()
    lm, tok, how = load_variant(args.worker, args.max_len)
    loaded_rss, load_peak = rss_mb(), peak_rss_mb()
    records = instruction_records("alpaca-1100", seed=1337)
    train, _ = split_records(records, 0.1, 1337, "alpaca-1100")
    rows, cut = encode_records(train, tok, args.max_len, "chat", "training")
    torch.manual_seed(0)  # A's initialisation: the same in both rows
    apply_lora(lm, rank=8, alpha=16.0, targets=("qkv", "proj"), quantized=is_quantized(lm))
    params = lora_parameters(lm)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen, pad = torch.Generator().manual_seed(1), pad_id(tok)
    lm.train()
    losses, times = [], []
    for step in range(args.steps):
        pick = torch.randint(len(rows), (args.batch,), generator=gen).tolist()
        batch = make_batch([rows[i] for i in pick], pad, "cpu")
        t0 = time.perf_counter()
        loss = fit_step(lm, optimizer, batch, step, args.lr, grad_clip=1.0)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        print(f"{args.worker} step {step}: loss {losses[-1]:.4f} ({times[-1]:.1f} s)", file=sys.stderr, flush=True)
    timed = times[1:] or times
    return {"variant": args.worker, "base": how, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
            "lr": args.lr, "rank": 8, "targets": ["qkv", "proj"], "cut_examples": cut,
            "trainable": sum(p.numel() for p in params),
            "rss_start_mb": round(base_rss, 1), "rss_loaded_mb": round(loaded_rss, 1),
            "peak_rss_load_mb": round(load_peak, 1), "peak_rss_mb": round(peak_rss_mb(), 1), "ms_per_step": round(1000 * sum(timed) / len(timed), 1),
            "losses": [round(x, 5) for x in losses],
            "update_below_half_step": round(below_half_step(lm), 4) if is_quantized(lm) else None,
            "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}", "date": date.today().isoformat()}


def chart(rows: list[dict], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".",
                label=f"{r['variant']}: peak RSS {r['peak_rss_mb']:.0f} MiB, {r['ms_per_step']:.0f} ms/step")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    if len(rows) == 2:  # the fp32 base is the Q4_1 file dequantized: Ŵ = W, so the curves should coincide
        gap = max(abs(a - b) for a, b in zip(rows[0]["losses"], rows[1]["losses"]))
        note += f"; largest loss difference {gap:.1e} (fp32 = the Q4_1 file dequantized, the same Ŵ)"
    ax.set_title(f"SmolLM2-135M-Instruct, LoRA r=8 vs QLoRA, alpaca-1100 (chat)\n{note}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_len", type=int, default=256, help="block_size: longer examples are cut")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="3 steps, batch 2, 64 tokens: proves both rows run")
    p.add_argument("--out", default=None, help="JSON lines (default bench/results/qlora-cpu-DATE[-quick].jsonl)")
    p.add_argument("--note", default="", help="said on the chart and in each row, e.g. 'loaded machine'")
    p.add_argument("--parallel", action="store_true", help="run the rows at the same time (each its own "
                   "process and peak RSS; both slowed alike, so ms/step compares within the run only)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.max_len = 3, 2, 64
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not MODEL.is_file():
        print(f"skipped: {MODEL} is absent (run `minillm pull smollm2-135m-instruct` first)")
        return 0
    out = Path(args.out or f"bench/results/qlora-cpu-{date.today().isoformat()}{'-quick' if args.quick else ''}.jsonl")
    rows, procs = [], {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, "-m", "bench.qlora", f"--worker={variant}", f"--steps={args.steps}",
               f"--batch={args.batch}", f"--max_len={args.max_len}", f"--lr={args.lr}", f"--threads={args.threads}"]
        procs[variant] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # stderr: the steps, as they go
        if not args.parallel:
            procs[variant].wait()
    for variant, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            print(f"{variant}: failed (exit {proc.returncode})")
            return 1
        row = {**json.loads(stdout.strip().splitlines()[-1]), "note": args.note, "parallel": args.parallel}
        rows.append(row)
        print(f"{variant:11s} {row['base']}: RSS loaded {row['rss_loaded_mb']:.0f} MiB (peak while loading "
              f"{row['peak_rss_load_mb']:.0f}), peak {row['peak_rss_mb']:.0f} MiB, {row['ms_per_step']:.0f} ms/step, loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chart(rows, out.with_suffix(".png"), args.note or f"{args.steps} steps, batch {args.batch}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
