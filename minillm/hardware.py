"""Where a run happens: choosing the device and dtype, and what the GPU can do at best.

One device resolver and one dtype resolver, shared by training, evaluation, generation, serving and
quantization, so `--device=auto` means the same everywhere: CUDA if PyTorch sees a GPU, else CPU.

`GPU_SPECS` is the one table of datasheet peaks, used both by training's MFU (model FLOPs
utilization, PaLM appendix B: achieved model FLOP/s ÷ peak) and by the benchmarks' MFU and
bandwidth figures. Peaks are dense bf16 tensor-core TFLOP/s (datasheets quote the 2:4-sparse figure
first; the dense one is half) and HBM bandwidth in TB/s. T4 (Turing) has no bf16: its fp16 peak.
Matching is by substring of `torch.cuda.get_device_name()`, longest key first, so "H100 PCIe" wins
over "H100", "A100" is never read as "A10", and "L40S" is never read as "L4".
Sources (checked 2026):
  H100 SXM 989 / PCIe 756 / NVL 835 TFLOP/s, 3.35 / 2.0 / 3.9 TB/s: NVIDIA H100 datasheet
    ("BF16 Tensor Core 1,979* | 1,513* | 1,671* TFLOPS, *with sparsity"), nvidia.com/en-us/data-center/h100/
  H200 SXM 989 / NVL 835, 4.8 TB/s both: NVIDIA H200 datasheet, nvidia.com/en-us/data-center/h200/
  A100 312 (SXM and PCIe alike); 2.039 TB/s (80GB SXM), 1.555 (40GB): NVIDIA A100 datasheet
  L4 121, 0.3 TB/s; L40S 362, 0.864 TB/s; A10 125, 0.6 TB/s; T4 65, 0.32 TB/s: NVIDIA datasheets
  A10G 70, 0.6 TB/s: AWS's variant of the A10 (G5 instances) is on no NVIDIA datasheet; its tensor
    cores run at half the A10's rate (baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/).
A CPU has no tensor-core peak worth quoting (it depends on clocks, vector width and core count), so
no MFU is reported there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GPUSpec:
    bf16_tflops: float  # dense bf16 tensor-core peak, TFLOP/s
    bandwidth_tbs: float  # HBM/GDDR bandwidth, TB/s


GPU_SPECS: dict[str, GPUSpec] = {
    "H200 NVL": GPUSpec(835.0, 4.8),
    "H200": GPUSpec(989.0, 4.8),
    "H100 NVL": GPUSpec(835.0, 3.9),
    "H100 PCIe": GPUSpec(756.0, 2.0),
    "H100": GPUSpec(989.0, 3.35),  # SXM (torch names it "NVIDIA H100 80GB HBM3")
    "A100-SXM4-40GB": GPUSpec(312.0, 1.555),
    "A100": GPUSpec(312.0, 2.039),
    "L40S": GPUSpec(362.0, 0.864),
    "L4": GPUSpec(121.0, 0.3),
    "A10G": GPUSpec(70.0, 0.6),
    "A10": GPUSpec(125.0, 0.6),
    "T4": GPUSpec(65.0, 0.32),
}


def gpu_spec(name: str) -> GPUSpec | None:
    """The datasheet figures of a GPU named like torch.cuda.get_device_name(), or None if unknown."""
    for key in sorted(GPU_SPECS, key=len, reverse=True):
        if key in name:
            return GPU_SPECS[key]
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device if we know it, else None (CPU, unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec.bf16_tflops * 1e12 if spec else None


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda if PyTorch sees a GPU, else cpu; "cuda" under torchrun -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device PyTorch knows; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but PyTorch sees no GPU; use --device=cpu (or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device, allow_cpu_half: bool = False) -> torch.dtype:
    """"auto" -> bf16 on GPUs that have it, else fp16; fp32 on CPU (CPU bf16 is slower on most CPUs).

    Training refuses half precision on a CPU; generation may ask for it (allow_cpu_half=True).
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    if device.type == "cpu" and name != "float32" and not allow_cpu_half:
        raise ValueError(f"dtype={name} is for GPUs; minillm runs in float32 on CPU")
    return DTYPES[name]
