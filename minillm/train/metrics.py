"""What a training run reports: metrics.jsonl, a loss-curve PNG, and model FLOPs utilization.

metrics.jsonl has one JSON object per line, appended as the run goes (a crash loses nothing before
it, and `tail -f` follows it):
    {"step": 120, "loss": 2.31, "lr": 0.00098, "ms_per_iter": 54.1, "tokens_per_s": 14190, ...}
    {"step": 250, "train_loss": 2.05, "val_loss": 2.11, "val_ppl": 8.25, ...}          (evaluations)
    {"step": 250, ..., "val_bleu": 41.3}                      (evaluations of a translation model)
A train record's step is the optimizer step whose loss it reports (0-based); an eval record's step
is the number of optimizer steps done before it.

MFU (model FLOPs utilization, PaLM appendix B) = achieved model FLOP/s ÷ the hardware's peak:
    achieved = flops_per_token(train) × tokens/s        (6N + 12·L·T·C per token)
It only means something against a known peak, so it is shown for the GPUs in
minillm.hardware.GPU_SPECS and not on CPUs (whose peak depends on clocks, vector width and cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from minillm.files import atomic_write

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"

class MetricsLog:
    """Append-only JSONL of a run's metrics, and the loss-curve plot drawn from it."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None):
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None:
            # keep what the checkpoint had seen: train records of steps < resume_step and evals at
            # ≤ resume_step; anything later came from the interrupted part and will be redone
            kept = [r for r in self.records()
                    if ("loss" in r and r["step"] < resume_step) or ("val_loss" in r and r["step"] <= resume_step)]
        with atomic_write(self.path) as tmp:  # a fresh run starts a fresh log
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict]:
        """Every record; a line that does not parse (the torn last line of a killed run) is skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        return out

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, title: str = "") -> Path:
        return plot_losses(self.records(), self.path.with_name(PLOT_FILE), title)


def plot_losses(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss (every logged step) and train/val loss at each evaluation, on one axis; a
    translation run's evaluations also carry val_bleu, drawn on a second y axis (BLEU, 0-100) on the right."""
    try:
        # a bare Figure draws straight to a file: no pyplot, so no global backend switch that would
        # stop a notebook's own figures from showing, and no display needed (servers, CI)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the loss plot needs matplotlib: pip install matplotlib") from e
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)  # fixed: tight_layout costs a draw
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, color="tab:blue", label="train loss (batch)")
    if evals:
        steps = [r["step"] for r in evals]
        if all("train_loss" in r for r in evals):
            ax.plot(steps, [r["train_loss"] for r in evals], "o-", ms=3, color="tab:blue", label="train loss (eval)")
        ax.plot(steps, [r["val_loss"] for r in evals], "o-", ms=3, color="tab:orange", label="val loss")
        best = min(evals, key=lambda r: r["val_loss"])
        ax.annotate(f"{best['val_loss']:.3f}", (best["step"], best["val_loss"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8, color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "minillm training")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    bleu = [(r["step"], r["val_bleu"]) for r in evals if "val_bleu" in r]
    if bleu:  # loss falls while BLEU rises, on another scale: its own axis, one legend for both
        fig.subplots_adjust(right=0.9)
        ax2 = ax.twinx()
        ax2.plot(*zip(*bleu), "s-", ms=3, color="tab:green", label="val BLEU (greedy)")
        ax2.set_ylabel("BLEU")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels)
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
        fig.savefig(tmp)
    return path
