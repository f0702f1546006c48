"""Shared pieces of the benchmark suites: device facts, peak FLOP/s, timing that synchronizes.

Every suite records the same `extra_info` keys (device, torch, triton, ...) so that
`minillm bench report` can line up results from different machines.
"""

from __future__ import annotations

import os
import platform

import torch

# Dense bf16 tensor-core peak, TFLOP/s, from each vendor datasheet (no sparsity). Used for MFU.
# T4 has no bf16: its fp16 peak is listed. Matching is by substring of torch.cuda.get_device_name().
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L4": 121.0,
    "A10G": 70.0,  # the datasheet's "A10" figure is 125; AWS's A10G runs lower clocks
    "T4": 65.0,
}

# Benchmarks pick their sizes from this: "quick" (CI, CPU: tiny shapes) or "full" (a GPU run).
SIZE = os.environ.get("MINILLM_BENCH_SIZE", "full" if torch.cuda.is_available() else "quick")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_tflops(name: str | None = None) -> float | None:
    """Datasheet peak for the current (or named) GPU; None when unknown (CPU: no meaningful peak)."""
    name = name or device_name()
    if name.startswith("CPU"):
        return None
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return 756.0
            return tflops
    return None


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
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
