"""The CPU kernel's small-batch path (minillm/compress/csrc/quant_cpu.c, M < GEMM_MIN_M): a tile of
weight rows is unpacked once and dotted with every activation row, so a batch must give each row the
answer that row gets alone (same operations, same order), and more than 15 rows are taken in chunks.
The reference comparison itself lives in tests/test_quant_cpu.py.
"""

import pytest
import torch

from minillm.compress import cpu_kernel
from minillm.compress.quant import dequantize, quantize

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"CPU kernel: {cpu_kernel.why_unavailable()}")

# (scheme, G, K): int8 per channel with a ragged last block, int8 grouped, int4 at two group sizes
CASES = [("int8", None, 72), ("int8", 32, 96), ("int4", 32, 160), ("int4", 64, 128)]


def layer(scheme, G, K, N=42, scale_dtype=torch.float32):  # N % 4 != 0: the last 2 rows take the 1-row path
    g = torch.Generator().manual_seed(0)
    t = quantize(torch.randn(N, K, generator=g) / K ** 0.5, scheme, G, int8_groups=G is not None)
    s, z = t["scales"].to(scale_dtype), (t["zeros"].to(scale_dtype) if "zeros" in t else None)
    return cpu_kernel.CpuLayer(t["weight_q"], s, z, torch.randn(N, generator=g), scheme), t


@needs_kernel
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [2, 5, 15, 16, 33])
@pytest.mark.parametrize("scheme,G,K", CASES)
def test_a_batch_gives_each_row_its_own_answer(scheme, G, K, M, scale_dtype, monkeypatch):
    """M = 16 and 33 exceed a tile's 15 rows: the C loop takes them in chunks (reached here by raising
    GEMM_MIN_M, which otherwise sends them to the float GEMM)."""
    monkeypatch.setattr(cpu_kernel, "GEMM_MIN_M", 64)
    f, _ = layer(scheme, G, K, scale_dtype=scale_dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    y = f(x)  # (M, N)
    alone = torch.cat([f(x[m:m + 1]) for m in range(M)])  # (M, N), one row at a time
    assert torch.equal(y, alone)


@needs_kernel
@pytest.mark.parametrize("scheme,G,K", CASES)
def test_a_chunked_batch_is_near_the_reference(scheme, G, K, monkeypatch):
    """Past the chunk boundary the answer is still x @ Ŵᵀ + b within the rounding of x to 8 bits per
    block of 32 (|error| ≤ Σ_k |Ŵ'|·d/2 ≤ Σ_k |Ŵ'|·max|x|/254, Ŵ' = Ŵ without its zero term, the part
    that multiplies the rounded x): no row is skipped or written twice."""
    monkeypatch.setattr(cpu_kernel, "GEMM_MIN_M", 64)
    f, t = layer(scheme, G, K)
    x = torch.randn(20, K, generator=torch.Generator().manual_seed(2))
    W = dequantize(scheme, t["weight_q"], t["scales"], t.get("zeros"), torch.float64)  # (N, K)
    ref = x.double() @ W.T + f.bias32.double()  # (20, N)
    if scheme == "int4":  # Ŵ' = (q - 8)·s: Ŵ minus the zeros alone
        W = W - dequantize("int4", t["weight_q"], torch.zeros_like(t["scales"]), t["zeros"], torch.float64)
    bound = x.abs().amax(-1, keepdim=True).double() / 254 * W.abs().sum(-1) + 1e-5  # (20, N)
    assert ((f(x).double() - ref).abs() <= bound).all()
