"""Benchmark report: pytest-benchmark JSON from any number of machines → markdown table + plots.

    pytest bench --benchmark-json=h100.json            (on each machine)
    python -m bench.report h100.json l4.json results/ --out report/

Each benchmark in the JSON is one timed case, e.g. `test_attention.py::test_forward[sdpa-64-1024]`.
Cases are grouped by suite (test function), provider (the `provider` parameter: naive, sdpa,
triton, ...), shape (the other parameters) and device (`extra_info["device"]`, else the file's
`machine_info`). For each we print the median time and whatever figures the suite recorded
(TFLOP/s, GB/s, tokens/s, MFU; see bench/common.py `record`), plus the speedup over a baseline
provider measured on the same device for the same shape.

Plots (PNG, written to --out): for suites with a length-like parameter (N, seq_len, T, ...), the
throughput against it per provider with one line per device; and speedup bars over the baseline.
The median is used throughout: one slow call (a GC pause, a clock dip) should not move a result.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Parameters that name the implementation under test; the first one present is "the provider".
PROVIDER_KEYS = ("provider", "impl", "backend", "method", "kernel", "attention")
# Length-like parameters a throughput plot can use as its x axis, in order of preference.
X_KEYS = ("N", "seq_len", "seqlen", "T", "n_ctx", "context", "prompt_len", "n_tokens", "M", "K")
# Providers that serve as the baseline of a speedup when --baseline is not given: what a user
# would pick instead of minillm's own code (PyTorch's fused attention, plain bf16 F.linear, ...).
# SDPA's flash backend first: it is what the speed targets (docs/guides/benchmarks-cloud.md) measure kernels against.
BASELINES = ("sdpa_flash", "sdpa", "bf16", "torch", "eager", "reference", "sdpa_math", "naive")
# Figures a suite may record in extra_info, under any of these names, and the column they fill.
METRICS = {
    "TFLOP/s": ("tflops", "TFLOP/s", "tflop_s", "tflops_per_s"),
    "GB/s": ("gbps", "GB/s", "gb_s", "bandwidth_gbps"),
    "tokens/s": ("tokens_per_s", "tokens/s", "tok_per_s", "tokens_per_sec", "tok/s"),
    "MB/s": ("mb_per_s", "MB/s"),
    "MFU": ("mfu", "MFU"),
    "speedup": ("speedup",),
}
THROUGHPUT = ("TFLOP/s", "GB/s", "tokens/s", "MB/s")  # what a scaling plot puts on its y axis


@dataclass
class Result:
    """One timed case on one machine."""
    suite: str  # "test_attention::test_forward", plus " (group)" when the suite set a group
    provider: str  # "" when the case has no provider parameter
    shape: dict  # the remaining parameters, e.g. {"D": 64, "N": 1024, "causal": True}
    device: str  # "NVIDIA H100 80GB HBM3", "CPU x86_64 (2 cores)", ...
    median_s: float
    metrics: dict = field(default_factory=dict)  # column name -> value
    source: str = ""  # the JSON file it came from

    @property
    def shape_key(self) -> tuple:
        return tuple((k, str(v)) for k, v in self.shape.items())


# ---- reading ------------------------------------------------------------------------------------

def _device_of(machine_info: dict) -> str:
    """The device a whole file ran on: bench/conftest.py's "device", else pytest-benchmark's CPU."""
    if machine_info.get("device"):
        return machine_info["device"]
    cpu = (machine_info.get("cpu") or {}).get("brand_raw")
    return f"CPU {cpu}" if cpu else machine_info.get("node") or "unknown device"


def _metrics(extra: dict, median_s: float, peak_tflops: float | None) -> dict:
    out = {}
    for column, names in METRICS.items():
        for name in names:
            if isinstance(extra.get(name), (int, float)) and not isinstance(extra[name], bool):
                out[column] = float(extra[name])
                break
    # A suite that stored only the work of one call (flops, bytes, tokens) still gets its rates.
    for column, name, unit in (("TFLOP/s", "flops", 1e12), ("GB/s", "bytes", 1e9),
                               ("tokens/s", "tokens", 1.0)):
        if column not in out and isinstance(extra.get(name), (int, float)) and median_s > 0:
            out[column] = extra[name] / median_s / unit
    if "MFU" not in out and "TFLOP/s" in out and peak_tflops:
        out["MFU"] = out["TFLOP/s"] / peak_tflops
    return out


def _expand(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such results file or folder: {p}")
    return files


def load_results(paths) -> list[Result]:
    """Read pytest-benchmark JSON files (or folders of them) into a flat list of Results."""
    results = []
    for path in _expand(paths):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue  # some other JSON in a results folder (e.g. a config): not ours to read
        machine = data.get("machine_info") or {}
        file_device = _device_of(machine)
        for b in data["benchmarks"]:
            extra = b.get("extra_info") or {}
            params = dict(b.get("params") or {})
            provider = ""
            for key in PROVIDER_KEYS:
                if key in params:
                    provider = str(params.pop(key))
                    break
            else:
                provider = str(extra.get("provider", ""))
            # "bench/test_attention.py::test_forward[sdpa-64]" -> "test_attention::test_forward"
            module, _, func = b["fullname"].split("[")[0].partition("::")
            suite = f"{Path(module).stem}::{func}" + (f" ({b['group']})" if b.get("group") else "")
            device = extra.get("device") or file_device
            peak = machine.get("peak_tflops_bf16") if device == file_device else None
            median = float(b["stats"]["median"])
            results.append(Result(suite, provider, params, device, median,
                                  _metrics(extra, median, peak), str(path)))
    if not results:
        raise ValueError("no benchmarks found in " + ", ".join(map(str, paths))
                         + " (was the JSON written by pytest --benchmark-json with benchmarks enabled?)")
    return results


def add_speedups(results: list[Result], baseline: str | None = None) -> dict[str, str]:
    """Set metrics["vs baseline"] = baseline median / this median, per suite, shape and device.

    Returns {suite: baseline provider}. Without `baseline`, each suite uses the first of BASELINES
    among its providers; a suite with none of them (or a single provider) gets no speedups.
    """
    chosen = {}
    for suite in dict.fromkeys(r.suite for r in results):
        providers = {r.provider for r in results if r.suite == suite}
        if baseline is not None:
            pick = baseline if baseline in providers else None
        else:
            pick = next((p for p in BASELINES if p in providers), None)
        if pick is None or len(providers) < 2:
            continue
        chosen[suite] = pick
        base = {(r.shape_key, r.device): r.median_s for r in results
                if r.suite == suite and r.provider == pick}
        for r in results:
            ref = base.get((r.shape_key, r.device))
            if r.suite == suite and ref:
                r.metrics["vs baseline"] = ref / r.median_s
    return chosen


# ---- the table ----------------------------------------------------------------------------------

def _time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _num(column: str, v: float) -> str:
    if column == "MFU":
        return f"{100 * v:.1f}%"
    if column in ("speedup", "vs baseline"):
        return f"{v:.2f}×"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def _natural(shape: dict) -> tuple:
    """Sort key that puts N=64 before N=128 (numbers as numbers, everything else as text)."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in shape.values())


def markdown_table(results: list[Result], baselines: dict[str, str] | None = None) -> str:
    """One markdown table per suite: shape columns, provider, device, median, recorded figures."""
    baselines = baselines or {}
    out = []
    for suite in dict.fromkeys(r.suite for r in results):
        rows = [r for r in results if r.suite == suite]
        shape_cols = list(dict.fromkeys(k for r in rows for k in r.shape))
        metric_cols = [c for c in (*METRICS, "vs baseline") if any(c in r.metrics for r in rows)]
        head = [*shape_cols, *(["provider"] if any(r.provider for r in rows) else []),
                "device", "median", *metric_cols]
        out.append(f"### {suite}\n")
        if suite in baselines:
            out.append(f"Speedup is against `{baselines[suite]}` on the same device and shape.\n")
        out.append("| " + " | ".join(c if c != "vs baseline" else f"vs {baselines.get(suite)}"
                                     for c in head) + " |")
        out.append("|" + "---|" * len(head))
        rows.sort(key=lambda r: (_natural(r.shape), r.provider, r.device))
        for r in rows:
            cells = [str(r.shape.get(k, "")) for k in shape_cols]
            cells += [r.provider] if "provider" in head else []
            cells += [r.device, _time(r.median_s)]
            cells += [_num(c, r.metrics[c]) if c in r.metrics else "" for c in metric_cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ---- the plots ----------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _x_key(rows: list[Result]) -> str | None:
    """The length-like parameter that gives the longest lines: for a quantized matmul swept over
    (K, N) pairs and M, that is M (N takes one value per (M, K) line); for attention, N."""
    best, best_points = None, 1.0
    for key in X_KEYS:
        values = [r.shape.get(key) for r in rows]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        lines: dict = {}
        for r, v in zip(rows, values):
            lines.setdefault((r.provider, r.device, _others(r, key)), set()).add(v)
        points = sum(map(len, lines.values())) / len(lines)  # mean points per line
        if points > best_points:
            best, best_points = key, points
    return best


def _others(r: Result, x_key: str) -> tuple:
    return tuple(kv for kv in r.shape_key if kv[0] != x_key)


def plot_scaling(results: list[Result], out_dir: Path) -> list[Path]:
    """Per suite: throughput vs N, a column of panels per provider, a row per other shape, a line
    per device. Suites without a length-like parameter or a throughput figure get no plot."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

    written = []
    for suite in dict.fromkeys(r.suite for r in results):
        rows = [r for r in results if r.suite == suite]
        x_key = _x_key(rows)
        y_col = next((c for c in THROUGHPUT if any(c in r.metrics for r in rows)), None)
        if x_key is None or y_col is None:
            continue
        providers = list(dict.fromkeys(r.provider for r in rows))
        others = list(dict.fromkeys(_others(r, x_key) for r in rows))
        devices = list(dict.fromkeys(r.device for r in rows))
        fig = Figure(figsize=(4 * len(providers), 3 * len(others)), layout="constrained")
        axes = fig.subplots(len(others), len(providers), squeeze=False, sharex=True, sharey=True)
        for i, other in enumerate(others):
            for j, provider in enumerate(providers):
                ax = axes[i][j]
                for device in devices:
                    pts = sorted((r.shape[x_key], r.metrics[y_col]) for r in rows
                                 if r.provider == provider and r.device == device
                                 and _others(r, x_key) == other
                                 and y_col in r.metrics)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=device)
                ax.set_xscale("log", base=2)
                title = ", ".join(f"{k}={v}" for k, v in other)
                ax.set_title(f"{provider or suite}" + (f"\n{title}" if title else ""), fontsize=9)
                ax.set_xlabel(x_key)
                ax.set_ylabel(y_col)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{suite}: {y_col} vs {x_key}")
        path = out_dir / f"{_slug(suite)}__scaling.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def plot_speedups(results: list[Result], baselines: dict[str, str], out_dir: Path) -> list[Path]:
    """Per suite with a baseline: bars of speedup for each shape, one panel per device."""
    from matplotlib.figure import Figure

    written = []
    for suite, base in baselines.items():
        rows = [r for r in results if r.suite == suite and r.provider != base
                and "vs baseline" in r.metrics]
        if not rows:
            continue
        devices = list(dict.fromkeys(r.device for r in rows))
        providers = list(dict.fromkeys(r.provider for r in rows))
        shapes = list(dict.fromkeys(r.shape_key for r in rows))
        fig = Figure(figsize=(max(6.0, 0.6 * len(shapes) * len(providers)), 3.2 * len(devices)),
                     layout="constrained")
        axes = fig.subplots(len(devices), 1, squeeze=False)[:, 0]
        width = 0.8 / len(providers)
        for ax, device in zip(axes, devices):
            for j, provider in enumerate(providers):
                by_shape = {r.shape_key: r.metrics["vs baseline"] for r in rows
                            if r.device == device and r.provider == provider}
                xs = [i + j * width for i, s in enumerate(shapes) if s in by_shape]
                ax.bar(xs, [by_shape[s] for s in shapes if s in by_shape], width, label=provider)
            ax.axhline(1.0, color="black", linewidth=0.8)  # parity with the baseline
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels([" ".join(f"{k}={v}" for k, v in s) or "-" for s in shapes],
                               rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(f"speedup vs {base}")
            ax.set_title(device, fontsize=9)
            ax.legend(fontsize=8)
        fig.suptitle(f"{suite}: speedup over {base} (higher is better)")
        path = out_dir / f"{_slug(suite)}__speedup.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def build_report(paths, out_dir=None, baseline: str | None = None) -> tuple[str, list[Path]]:
    """Read results, return the markdown report; with `out_dir`, also write report.md and PNGs."""
    results = load_results(paths)
    baselines = add_speedups(results, baseline)
    devices = sorted({r.device for r in results})
    text = (f"# Benchmark report\n\n{len(results)} results from {len(devices)} device(s): "
            + "; ".join(devices) + "\n\n" + markdown_table(results, baselines))
    pngs: list[Path] = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        pngs = plot_scaling(results, out_dir) + plot_speedups(results, baselines, out_dir)
        images = "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
        (out_dir / "report.md").write_text(text + ("\n## Plots\n\n" + images if images else ""))
    return text, pngs


# ---- command line -------------------------------------------------------------------------------

def cmd_report(args) -> int:
    """Turn pytest-benchmark JSON files (from one machine or many) into a markdown table and plots."""
    text, pngs = build_report(args.results, args.out, args.baseline)
    print(text)
    if args.out is None:
        print("(pass --out DIR to write report.md and the PNG plots)")
    else:
        print(f"wrote {Path(args.out) / 'report.md'} and {len(pngs)} plot(s) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(
        prog="python -m bench.report",
        description=cmd_report.__doc__ + " Results are grouped by suite, provider, shape and "
        "device; the table shows the median time, the TFLOP/s, GB/s, tokens/s and MFU the suite "
        "recorded, and the speedup over a baseline provider on the same device. Plots: "
        "throughput vs sequence length (one line per device) and speedup bars. Run the suites "
        "with: pytest bench --benchmark-json=results.json (add --bench-size=full on a GPU).",
        epilog="example: python -m bench.report bench/results/ --out /tmp/report")
    r.add_argument("results", nargs="+", metavar="RESULTS",
                   help="pytest-benchmark JSON files, or folders searched for *.json")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="folder for report.md and the PNG plots (default: print the table only)")
    r.add_argument("--baseline", default=None, metavar="PROVIDER",
                   help="provider that speedups are measured against (default: the first of "
                        + ", ".join(BASELINES) + " present in each suite)")
    r.set_defaults(func=cmd_report)
    return r


def main(argv: list[str] | None = None) -> int:
    from bench.common import run_command

    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
