"""Weight-only quantized matmul: y = x @ Wᵀ for a (K, N) layer, bf16 weights vs int8 vs packed int4.

    pytest bench/test_quant_matmul.py --benchmark-json=quant.json      timed (GPU: full sizes)
    pytest bench/test_quant_matmul.py --benchmark-disable              each case once, correctness only

Providers:
    bf16        F.linear with bf16 weights — what a user has without quantization (the baseline)
    torch-int4  PyTorch's tinygemm kernel (torch._weight_int4pack_mm), group 128; CUDA only, and
                only when this torch has it (its packing API changed across versions)
    int8, int4  minillm.kernels.quant_matmul (int4 with group 128); on CPU they run in the Triton
                interpreter, so their CPU "timings" measure the interpreter, not the kernel
    int8-ref, int4-ref   minillm.compress.quant's reference (dequantize the whole matrix, then F.linear)
Figures in extra_info: us (median µs per call), gbps (bytes of the stored weight — codes, scales,
zeros — read per second: a decode-time matmul is bound by exactly this), speedup over bf16 measured
in the same session for the same shape, plus machine_info(). Decode is M = 1…16, prefill M ≥ 128.
Sizes: "full" M ∈ {1, 16, 128, 2048} × (K, N) ∈ {(4096, 4096), (4096, 11008), (8192, 8192)}
(Llama-7B/-13B layer shapes); "quick" (CPU, CI) a 128×96 layer at M ∈ {1, 16}.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

from bench import common

CUDA = torch.cuda.is_available()
if not CUDA:  # the kernels can only run on CPU through the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from minillm.compress.quant import dequantize, quantize, unpack_int4  # noqa: E402

QUICK = common.SIZE == "quick"
MS = (1, 16) if QUICK else (1, 16, 128, 2048)
SHAPES = ((128, 96),) if QUICK else ((4096, 4096), (4096, 11008), (8192, 8192))  # (K, N)
GROUP = 32 if QUICK else 128
PROVIDERS = ("bf16", "torch-int4", "int8", "int4", "int8-ref", "int4-ref")
_BF16_SECONDS: dict[tuple, float] = {}  # (M, K, N) -> median of the bf16 case, for speedups


@functools.lru_cache(maxsize=None)
def layer(K: int, N: int) -> dict:
    """One random layer in every format (cached: quantizing 8192² weights is not what we time)."""
    g = torch.Generator().manual_seed(K * 7 + N)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(common.device())  # (N, K) fp32
    out = {"w": w, "bf16": w.bfloat16()}
    out["int8"] = quantize(w.bfloat16(), "int8")
    out["int4"] = quantize(w.bfloat16(), "int4", GROUP)
    return out


def tinygemm_weights(int4: dict):
    """Our int4 codes repacked for torch._weight_int4pack_mm, or a string saying why not.

    tinygemm uses our dequantization formula, Ŵ = (q - 8)·s + z, with scales_and_zeros (K/G, N, 2).
    Its packing input changed: torch ≥ 2.5 takes uint8 (N, K/2) with the EVEN code in the HIGH
    nibble (the reverse of ours); older versions take int32 codes (N, K).
    """
    if not CUDA:
        return "tinygemm is a CUDA kernel"
    if not (hasattr(torch, "_convert_weight_to_int4pack") and hasattr(torch, "_weight_int4pack_mm")):
        return f"torch {torch.__version__} has no _weight_int4pack_mm"
    q = unpack_int4(int4["weight_q"])  # (N, K) codes
    errors = []
    for packed_in in ((q[:, 0::2] << 4) | q[:, 1::2], q.to(torch.int32)):
        try:
            packed = torch._convert_weight_to_int4pack(packed_in.contiguous(), 8)  # inner_k_tiles=8
        except (RuntimeError, TypeError) as e:
            errors.append(str(e).splitlines()[0])
            continue
        sz = torch.stack([int4["scales"].T, int4["zeros"].T], dim=-1).bfloat16().contiguous()  # (K/G, N, 2)
        return packed, sz
    return "torch._convert_weight_to_int4pack rejected both packings: " + " | ".join(errors)


def make_fn(provider: str, K: int, N: int, x: torch.Tensor):
    L = layer(K, N)
    if provider == "bf16":
        return lambda: F.linear(x, L["bf16"])
    if provider == "torch-int4":
        tg = tinygemm_weights(L["int4"])
        if isinstance(tg, str):
            pytest.skip(tg)
        packed, sz = tg
        return lambda: torch._weight_int4pack_mm(x, packed, GROUP, sz)
    scheme = provider.split("-")[0]
    t = L[scheme]
    if provider.endswith("-ref"):
        return lambda: F.linear(x, dequantize(scheme, t["weight_q"], t["scales"], t.get("zeros"), x.dtype))
    triton = pytest.importorskip("triton")  # noqa: F841
    from minillm.kernels.quant_matmul import quant_matmul

    if not CUDA and x.dtype == torch.bfloat16:
        x = x.float()  # the interpreter has no bf16 dot (see kernels/quant_matmul.py)
    return lambda: quant_matmul(x, t["weight_q"], t["scales"], t.get("zeros"), None, scheme)


def weight_bytes(provider: str, K: int, N: int) -> int:
    L = layer(K, N)
    if provider == "bf16":
        return L["bf16"].numel() * 2
    t = L["int8" if provider.startswith("int8") else "int4"]
    return sum(v.numel() * v.element_size() for v in t.values())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
def test_quant_matmul(benchmark, provider, M, K, N):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(common.device(), torch.bfloat16)
    fn = make_fn(provider, K, N, x)
    # correctness once: against fp32 x @ Ŵᵀ for the quantized weights Ŵ (W itself for bf16),
    # allowing twice the error bf16 F.linear makes on the same product
    L = layer(K, N)
    if provider == "bf16":
        w = L["bf16"].float()
    else:
        t = L["int8" if provider.startswith("int8") else "int4"]
        w = dequantize(provider[:4], t["weight_q"], t["scales"], t.get("zeros"))
    ref = x.float() @ w.T  # (M, N)
    bf16_err = (F.linear(x, w.bfloat16()).float() - ref).abs().max().item()
    err = (fn().float() - ref).abs().max().item()
    assert err <= 2 * bf16_err + 1e-2, f"{provider}: max error {err:.3g} vs bf16 F.linear's {bf16_err:.3g}"

    benchmark(common.synchronized(fn))
    info = common.record(benchmark, flops=2 * M * N * K, bytes_moved=weight_bytes(provider, K, N),
                         provider=provider, M=M, K=K, N=N, group_size=GROUP if "int4" in provider else None)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        info["us"] = seconds * 1e6
        if provider == "bf16":
            _BF16_SECONDS[(M, K, N)] = seconds
        elif (M, K, N) in _BF16_SECONDS:
            info["speedup"] = _BF16_SECONDS[(M, K, N)] / seconds
