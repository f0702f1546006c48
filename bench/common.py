"""Shared pieces of the benchmark suites: device facts, peak FLOP/s, timing that synchronizes.

Every suite records the same `extra_info` keys (device, torch, triton, ...) so that
`minillm bench report` can line up results from different machines:

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

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, the denominator of MFU. Datasheets quote
# the sparse figure first; the dense one is half of it. T4 (Turing) has no bf16: its fp16 peak.
# Matching is by substring of torch.cuda.get_device_name(), longest key first, so "H100 PCIe" wins
# over "H100", "A100" is never read as "A10", and "L40S" is never read as "L4".
# Sources (checked 2026):
#   H100 SXM 989 / PCIe 756 / NVL 835: NVIDIA H100 datasheet, "BF16 Tensor Core 1,979* | 1,513* |
#     1,671* TFLOPS, *with sparsity" — https://www.nvidia.com/en-us/data-center/h100/ (SXM/PCIe
#     table mirrored at https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html)
#   H200 SXM 989 / NVL 835: NVIDIA H200 datasheet (1,979* | 1,671* with sparsity) —
#     https://www.nvidia.com/en-us/data-center/h200/
#   A100 312 (SXM and PCIe alike): NVIDIA A100 datasheet "BF16 Tensor Core 312 | 624*" —
#     https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet.pdf
#   L4 121: NVIDIA L4 datasheet "BF16 Tensor Core 242* TFLOPS" with sparsity —
#     https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet
#   L40S 362: NVIDIA L40S datasheet "BF16 Tensor Core 362 | 733*".
#   A10 125: NVIDIA A10 datasheet "BF16 Tensor Core 125 | 250*".
#   A10G 70: AWS's variant of the A10 (G5 instances) is not on an NVIDIA datasheet; it has more SMs
#     (80, FP32 35 TFLOPS) but tensor cores at half the A10's rate: 70 TFLOP/s bf16 dense, per
#     https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/ . Using the A10's 125
#     here would understate an A10G's MFU by 1.8x.
#   T4 65: NVIDIA T4 datasheet "Mixed Precision (FP16/FP32) 65 TFLOPS" —
#     https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf
PEAK_TFLOPS_BF16 = {
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM (torch names it "NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "T4": 65.0,
}

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
    """Dense bf16 datasheet peak for the current (or named) GPU; None when unknown or a CPU
    (a CPU has no tensor-core peak worth quoting, so no MFU is reported there)."""
    name = name or device_name()
    if name.startswith("CPU"):
        return None
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_BF16[key]
    return None


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
