"""Attention forward and backward throughput: minillm's readable and Triton attention vs PyTorch SDPA.

    pytest bench/test_attention.py                                   timed; sizes from bench.common.SIZE
    pytest bench/test_attention.py --bench-size=full --benchmark-json=attn.json   a GPU run, saved
    python -m bench.report attn.json --baseline sdpa_flash            the table and plots

Shapes follow the FlashAttention papers: B·N = 16k tokens and H·D = 2048, N from 512 to 16384,
D ∈ {64, 128}, causal or not, bf16 on a GPU. FLOPs per call: 4·B·H·N²·D forward (two matmuls of
2·N²·D per head), half of that when causal, and 2.5× the forward for the backward (five matmuls
to the forward's two); recorded as `tflops` in extra_info with the device and library versions.

Providers: `naive` (minillm/model/attention.py, the readable reference), `sdpa` (PyTorch's own choice
of backend), `sdpa_flash`, `sdpa_cudnn`, `sdpa_efficient`, `sdpa_math` (one backend forced with
torch.nn.attention.sdpa_kernel; skipped where that backend cannot run the case) and `triton`
(kernels/attention.py). Each case first checks its result against SDPA once, then is timed.

`test_attention_gqa` times the decoder case of current models on its own: causal, grouped-query
(H_kv = H / 4, as Llama 3) with and without a sliding window of N / 4 (as Mistral), `sdpa` (with
enable_gqa, the window as an explicit mask) against `triton`; FLOPs count the visible pairs only.

On a CPU ("quick") the shapes are tiny and only naive, sdpa_math and triton (through the Triton
interpreter, at the smallest shape) run, so CI exercises the suite; those times say nothing
about a GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the Triton provider runs through the interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench import common  # noqa: E402
from minillm.model.attention import scaled_dot_product_attention  # noqa: E402

GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if GPU else torch.float32  # the interpreter has no bf16 matmul
BACKENDS = {  # provider -> SDPA backend it forces
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
PROVIDERS = common.pick(quick=["naive", "sdpa_math", "triton"],
                        full=["naive", "sdpa", *BACKENDS, "triton"])
TOKENS, WIDTH = common.pick(quick=(256, 64), full=(16384, 2048))  # B·N and H·D
NS = common.pick(quick=[64, 128], full=[512, 1024, 2048, 4096, 8192, 16384])
DS = common.pick(quick=[32], full=[64, 128])
TRITON_MAX_N_INTERPRETED = 64  # the interpreter runs a kernel at ~1 s per 10⁸ FLOPs: keep it tiny


def attention_fn(provider: str, causal: bool):
    """q, k, v -> output, for one provider."""
    if provider == "naive":
        return lambda q, k, v: scaled_dot_product_attention(q, k, v, causal=causal)
    if provider == "triton":
        from minillm.kernels.attention import flash_attention  # needs pip install 'minillm[kernels]'
        return lambda q, k, v: flash_attention(q, k, v, causal=causal)
    if provider == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    backend = BACKENDS[provider]

    def forced(q, k, v):
        with sdpa_kernel(backend):  # the backward runs whichever kernel the forward chose
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return forced


def score_matrix_bytes(B, H, N, direction) -> int:
    """Memory the unfused providers need: a few (B, H, N, N) tensors (scores, exp, probs, mask;
    the backward keeps them and makes as many gradients)."""
    copies = 4 if direction == "fwd" else 8
    return B * H * N * N * torch.finfo(DTYPE).bits // 8 * copies


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, provider, N, D, causal, direction):
    B, H = TOKENS // N, WIDTH // D
    dev = common.device()
    if provider in ("naive", "sdpa_math") and GPU:
        need, have = score_matrix_bytes(B, H, N, direction), torch.cuda.get_device_properties(0).total_memory
        if need > 0.6 * have:
            pytest.skip(f"{provider} materialises (B, H, N, N) scores: ~{need / 2**30:.0f} GiB > 60% of the GPU")
    if provider == "triton":
        pytest.importorskip("triton", reason="pip install 'minillm[kernels]'")
        if not GPU and N > TRITON_MAX_N_INTERPRETED:
            pytest.skip(f"Triton interpreter on a CPU: only N <= {TRITON_MAX_N_INTERPRETED}")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=DTYPE, generator=g) for _ in range(4))
    fn = attention_fn(provider, causal)

    # correctness once, against SDPA (its default choice; on a CPU that is fp32 and exact enough)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    leaves = [t.clone().requires_grad_(direction == "bwd") for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_(direction == "bwd") for t in (q, k, v)]
    try:
        out = fn(*leaves)
    except RuntimeError as e:  # a forced SDPA backend that cannot take this device/dtype/shape
        if provider in BACKENDS:
            pytest.skip(f"{provider} unavailable here: {str(e).splitlines()[0]}")
        raise
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=causal)
    assert relative_error(out, ref) < tol, f"{provider} output differs from SDPA"
    if direction == "bwd":
        got = torch.autograd.grad(out, leaves, do, retain_graph=True)  # the timed calls reuse the graph
        want = torch.autograd.grad(ref, ref_leaves, do)
        for name, a, b in zip("qkv", got, want):
            assert relative_error(a, b) < tol, f"{provider} d{name} differs from SDPA"
    del ref, ref_leaves

    flops = 4 * B * H * N * N * D // (2 if causal else 1)
    if direction == "fwd":
        with torch.no_grad():
            benchmark(common.synchronized(fn), q, k, v)
    else:
        flops = int(flops * 2.5)
        grad = common.synchronized(torch.autograd.grad)
        benchmark(lambda: grad(out, leaves, do, retain_graph=True))  # the backward alone
    common.record(benchmark, flops=flops, provider=provider, B=B, H=H, dtype=str(DTYPE).removeprefix("torch."))


def window_mask(N: int, window: int | None, device) -> torch.Tensor | None:
    """(N, N) bool, True where query i sees key j: i - window < j <= i (None: no window)."""
    if window is None:
        return None
    i, j = torch.arange(N, device=device)[:, None], torch.arange(N, device=device)[None, :]
    return (j <= i) & (j > i - window)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("provider", ["sdpa", "triton"])
def test_attention_gqa(benchmark, provider, N, windowed, direction):
    D = DS[-1]
    B, H = TOKENS // N, WIDTH // D
    H_kv, window = max(H // 4, 1), (N // 4 if windowed else None)
    dev = common.device()
    if provider == "triton":
        pytest.importorskip("triton", reason="pip install 'minillm[kernels]'")
        if not GPU and N > TRITON_MAX_N_INTERPRETED:
            pytest.skip(f"Triton interpreter on a CPU: only N <= {TRITON_MAX_N_INTERPRETED}")
        from minillm.kernels.attention import flash_attention
        fn = lambda q, k, v: flash_attention(q, k, v, causal=True, window=window)  # noqa: E731
    else:
        if windowed and GPU:  # a mask with enable_gqa may leave SDPA only its math backend: (B, H, N, N) scores
            need, have = score_matrix_bytes(B, H, N, direction), torch.cuda.get_device_properties(0).total_memory
            if need > 0.6 * have:
                pytest.skip(f"sdpa with a window mask may materialise ~{need / 2**30:.0f} GiB of scores")
        mask = window_mask(N, window, dev)
        fn = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    g = torch.Generator(device=dev).manual_seed(0)
    q, do = (torch.randn(B, H, N, D, device=dev, dtype=DTYPE, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H_kv, N, D, device=dev, dtype=DTYPE, generator=g) for _ in range(2))

    # correctness once, against SDPA on K/V repeated for every query head (fp32 math on a CPU)
    leaves = [t.clone().requires_grad_(direction == "bwd") for t in (q, k, v)]
    out = fn(*leaves)
    ref_leaves = [t.clone().requires_grad_(direction == "bwd") for t in (q, k, v)]
    G = H // H_kv
    mask = window_mask(N, window, dev)
    ref = F.scaled_dot_product_attention(ref_leaves[0], *(t.repeat_interleave(G, 1) for t in ref_leaves[1:]),
                                         attn_mask=mask, is_causal=mask is None)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    assert relative_error(out, ref) < tol, f"{provider} output differs from SDPA"
    if direction == "bwd":
        got = torch.autograd.grad(out, leaves, do, retain_graph=True)  # the timed calls reuse the graph
        want = torch.autograd.grad(ref, ref_leaves, do)
        for name, a, b in zip("qkv", got, want):
            assert a.shape == b.shape and relative_error(a, b) < tol, f"{provider} d{name} differs from SDPA"
    del ref, ref_leaves

    pairs = N * N / 2 if window is None else N * window - window * window / 2  # visible (query, key) pairs
    flops = 4 * B * H * pairs * D
    if direction == "fwd":
        with torch.no_grad():
            benchmark(common.synchronized(fn), q, k, v)
    else:
        flops = flops * 2.5
        grad = common.synchronized(torch.autograd.grad)
        benchmark(lambda: grad(out, leaves, do, retain_graph=True))  # the backward alone
    common.record(benchmark, flops=int(flops), provider=provider, B=B, H=H, H_kv=H_kv, window=window,
                  dtype=str(DTYPE).removeprefix("torch."))
