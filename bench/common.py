"""Shared pieces of the benchmark suites: device facts, peak FLOP/s, timing that synchronizes.

Every suite records the same `extra_info` keys (device, torch, triton, ...) so that
`python -m bench.report` can line up results from different machines:

    def test_matmul(benchmark, N):
        a = torch.randn(N, N, device=device())
        benchmark(synchronized(torch.mm), a, a)
        record(benchmark, flops=2 * N**3, bytes_moved=3 * N * N * a.element_size())

`record` stores the work done per call (`flops`, `bytes`, `tokens`) and the figures derived from
the median time (`tflops`, `gbps`, `tokens_per_s`, `mfu`); the report reads those names.

Sizes: `SIZE` is "quick" (tiny shapes: CI, CPU) or "full" (a GPU run). It comes from
`pytest bench --bench-size=full` (or `--quick`, see bench/conftest.py), else the environment
variable MINILLM_BENCH_SIZE, else "full" when a GPU is present. Use `pick(quick=..., full=...)`
to choose shapes.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

from minillm.hardware import gpu_spec

# The two sizes a suite knows. bench/conftest.py may overwrite SIZE from the pytest command line
# before any suite is collected, so suites read it at collection time (or call `pick`).
SIZES = ("quick", "full")
SIZE = os.environ.get("MINILLM_BENCH_SIZE", "full" if torch.cuda.is_available() else "quick")
if SIZE not in SIZES:
    raise ValueError(f"MINILLM_BENCH_SIZE={SIZE!r}: expected one of {', '.join(SIZES)}")


def pick(quick, full):
    """The value for the current size: `pick(quick=[128], full=[1024, 4096, 16384])`."""
    return full if SIZE == "full" else quick


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """"NVIDIA H100 80GB HBM3", or "CPU x86_64 (2 cores)" — the label results are grouped by."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_tflops(name: str | None = None) -> float | None:
    """Dense bf16 datasheet peak for the current (or named) GPU, from minillm.hardware.GPU_SPECS
    (the table training's MFU uses too); None when unknown or a CPU."""
    name = name or device_name()
    spec = None if name.startswith("CPU") else gpu_spec(name)
    return spec.bf16_tflops if spec else None


def peak_bandwidth_gbs(name: str | None = None) -> float | None:
    """Datasheet memory bandwidth in GB/s for the current (or named) GPU; None when unknown or a CPU."""
    name = name or device_name()
    spec = None if name.startswith("CPU") else gpu_spec(name)
    return spec.bandwidth_tbs * 1e3 if spec else None


def run_command(parser, argv: list[str] | None = None) -> int:
    """The `python -m bench.<tool>` entry: parse, run args.func(args), turn bad input into one line.

    Bad input (a missing file, a wrong value, an optional extra not installed) prints
    `prog: error: message` and returns 2, as the `minillm` command does; an unknown option names itself.
    """
    args, rest = parser.parse_known_args(argv)
    if rest:
        print(f"{parser.prog}: error: unknown option {rest[0].split('=')[0]} (see --help)", file=sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # triton is optional (the `kernels` extra); record that it was absent
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def machine_info() -> dict:
    """What every benchmark's extra_info carries about where it ran."""
    return {"device": device_name(), **versions(), "size": SIZE}


def synchronized(fn):
    """Wrap `fn` so the timed call includes all its GPU work (kernels launch asynchronously)."""
    if not torch.cuda.is_available():
        return fn

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return call


def record(benchmark, *, flops: float | None = None, bytes_moved: float | None = None,
           tokens: float | None = None, **extra) -> dict:
    """Store where it ran and what one timed call did; derive rates from the median time.

    flops: floating-point operations of one call (for MFU, count a multiply-add as 2).
    bytes_moved: bytes one call must read and write at least (for GB/s).
    tokens: tokens one call processes (for tokens/s).
    extra: anything else worth a column (e.g. `provider="sdpa"`), stored as given.
    Call it after `benchmark(...)`. With --benchmark-disable there is no timing: only the
    per-call counts are stored, and the report derives nothing from them.
    """
    info = benchmark.extra_info
    info.update(machine_info())
    info.update(extra)
    for key, value in (("flops", flops), ("bytes", bytes_moved), ("tokens", tokens)):
        if value is not None:
            info[key] = float(value)
    stats = getattr(benchmark, "stats", None)  # None when benchmarking is disabled
    if stats is None:
        return info
    seconds = stats.stats.median  # the median resists the odd slow call (a GC pause, a clock dip)
    if flops is not None:
        info["tflops"] = flops / seconds / 1e12
        peak = peak_tflops(info["device"])
        if peak is not None:
            info["mfu"] = info["tflops"] / peak
    if bytes_moved is not None:
        info["gbps"] = bytes_moved / seconds / 1e9
    if tokens is not None:
        info["tokens_per_s"] = tokens / seconds
    return info
