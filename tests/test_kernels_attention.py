"""The Triton FlashAttention kernel equals minillm's readable attention: outputs, lse, dQ, dK, dV,
including grouped-query heads (k, v with H_kv < H heads) and sliding windows.

Without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported, and by the root conftest.py), so shapes stay small. CUDA-only tests (larger
shapes, fp16/bf16) are skipped without a GPU.
"""

import os

import torch

if not torch.cuda.is_available():  # must happen before the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
from torch.testing import assert_close  # noqa: E402

pytest.importorskip("triton", reason="Triton kernels need: pip install 'minillm[kernels]'")

from minillm.model.attention import scaled_dot_product_attention  # noqa: E402
from minillm.kernels.attention import flash_attention, flash_attention_fwd, is_interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32 = dict(atol=2e-5, rtol=1e-4)  # fp32 in, fp32 accumulation: only summation order differs


def make_inputs(B, H, Tq, Tk, D, padded=False, dtype=torch.float32, seed=0, H_kv=None):
    """q (B, H, Tq, D), k, v (B, H_kv, Tk, D) (H_kv = H unless given), dO like the output, and a
    (B, Tk) key mask or None. The mask left-pads the last batch row by a third of Tk, as a batch of
    ragged prompts would."""
    g = torch.Generator().manual_seed(seed)
    H_kv = H if H_kv is None else H_kv
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h, T in ((H, Tq), (H_kv, Tk), (H_kv, Tk)))
    do = torch.randn(B, H, Tq, D, generator=g)
    kpm = None
    if padded:
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[-1, : Tk // 3] = False
        kpm = kpm.to(DEVICE)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)] + [kpm]


def grads(fn, q, k, v, do, **kw):
    """(out, dq, dk, dv) of fn(q, k, v, **kw) with incoming gradient do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


# Not a full cross product: each length, head dim, causal/not, padding and Tq != Tk appears, with
# the block edges (the interpreter uses 64x32 tiles forward) crossed by 64, 100, 129.
CASES = [  # (Tq, Tk, causal, D, padded)
    (1, 1, False, 16, False),
    (1, 1, True, 32, False),
    (17, 17, True, 16, True),
    (64, 64, True, 64, False),
    (64, 64, False, 32, True),
    (100, 100, True, 16, True),
    (100, 100, False, 128, False),
    (129, 129, True, 32, False),
    (129, 129, False, 16, True),
    (1, 37, True, 64, True),  # decode one token against a KV cache of 37
    (17, 64, True, 16, False),  # a prefill chunk of 17 after 47 cached tokens
    (17, 64, False, 128, True),
    (40, 20, True, 16, False),  # Tq > Tk, causal: the first 20 queries see no key at all
]


@pytest.mark.parametrize("Tq,Tk,causal,D,padded", CASES)
def test_matches_reference_fp32(Tq, Tk, causal, D, padded):
    q, k, v, do, kpm = make_inputs(2, 2, Tq, Tk, D, padded)
    out, lse = flash_attention_fwd(q, k, v, causal=causal, key_padding_mask=kpm)
    ref_out, ref_lse = scaled_dot_product_attention(q, k, v, causal, kpm, return_lse=True)
    assert_close(out, ref_out, **FP32)
    assert_close(lse, ref_lse, **FP32)  # rows that see no key: -inf in both
    got = grads(flash_attention, q, k, v, do, causal=causal, key_padding_mask=kpm)
    want = grads(scaled_dot_product_attention, q, k, v, do, causal=causal, key_padding_mask=kpm)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, b, **FP32, msg=lambda m, name=name: f"{name}: {m}")


def test_queries_that_see_no_key_give_zeros_not_nan():
    q, k, v, do, _ = make_inputs(2, 2, 24, 24, 16)
    kpm = torch.ones(2, 24, dtype=torch.bool, device=DEVICE)
    kpm[1] = False  # the whole second sequence is padding
    out, lse = flash_attention_fwd(q, k, v, causal=True, key_padding_mask=kpm)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    _, dq, dk, dv = grads(flash_attention, q, k, v, do, causal=True, key_padding_mask=kpm)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


def test_scale_argument():
    q, k, v, do, _ = make_inputs(1, 2, 33, 33, 32)
    got = grads(flash_attention, q, k, v, do, causal=True, scale=0.3)
    want = grads(scaled_dot_product_attention, q, k, v, do, causal=True, scale=0.3)
    for a, b in zip(got, want):
        assert_close(a, b, **FP32)


def test_arbitrary_strides():
    """q from a (B, T, H, D) projection, k/v slices of a longer cache with a non-unit last stride,
    and a transposed incoming gradient: the kernels read every tensor through its strides."""
    B, H, Tq, Tk, D = 2, 2, 20, 45, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Tq, H, D, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, Tq, D), strided
    cache = torch.randn(2, B, H, 64, 2 * D, generator=g).to(DEVICE)
    k, v = cache[0, :, :, :Tk, ::2], cache[1, :, :, :Tk, 1::2]  # (B, H, Tk, D), last stride 2
    do = torch.randn(B, Tq, H, D, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, Tq, D), strided
    assert not (q.is_contiguous() or k.is_contiguous() or do.is_contiguous())
    got = grads(flash_attention, q, k, v, do, causal=True)
    want = grads(scaled_dot_product_attention, q, k, v, do, causal=True)
    for a, b in zip(got, want):
        assert_close(a, b, **FP32)


# --- grouped-query heads and sliding windows ---------------------------------------------------

def reference(q, k, v, causal=False, key_padding_mask=None, scale=None, window=None, return_lse=False):
    """minillm's readable attention, made to take H_kv < H heads and a sliding window.

    Grouped-query attention is multi-head attention with each K/V head repeated for the H / H_kv
    query heads that read it, so k, v are repeat-interleaved (autograd then sums dK, dV back over
    each group). The window is a per-query mask, which the readable function only takes per key:
    so each query row is one call with Tq = 1 and its own (B, Tk) mask, padding ∧ window band.
    """
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    if window is None:
        return scaled_dot_product_attention(q, k, v, causal, key_padding_mask, scale, return_lse=return_lse)
    assert causal, "a window is causal"
    (B, _, Tq, _), Tk = q.shape, k.shape[2]
    j = torch.arange(Tk, device=q.device)
    rows = []
    for i in range(Tq):
        pos = i + Tk - Tq  # query i's own key position (bottom-right aligned, as the causal mask)
        band = ((j <= pos) & (j > pos - window)).expand(B, Tk)  # the `window` keys up to pos
        mask = band if key_padding_mask is None else band & key_padding_mask.bool()  # (B, Tk)
        rows.append(scaled_dot_product_attention(q[:, :, i:i + 1], k, v, False, mask, scale, return_lse=True))
    out = torch.cat([o for o, _ in rows], dim=2)  # (B, H, Tq, D)
    lse = torch.cat([lse for _, lse in rows], dim=2)  # (B, H, Tq)
    return (out, lse) if return_lse else out


# Each H_kv (2: grouped-query, 1: multi-query, 4 = H: plain), window (1, 5, partial, ≥ Tk), Tq < Tk,
# Tq > Tk and padding appears. 129 with window 100 is the one shape where the window has
# unmasked blocks inside it (the interpreter's tiles are 64x32 and 32x64), next to masked edges.
GQA_WINDOW_CASES = [  # (H_kv, Tq, Tk, window, causal, D, padded), H = 4
    (2, 17, 17, None, False, 16, True),
    (1, 33, 33, None, True, 32, False),
    (2, 1, 1, None, True, 16, False),
    (1, 1, 37, None, True, 32, True),  # multi-query decode against a KV cache of 37
    (4, 17, 17, 1, True, 16, False),  # each query sees only itself
    (4, 33, 33, 5, True, 32, True),  # padding rows whose window holds only padding: zeros
    (4, 33, 33, 33, True, 16, False),  # window = Tk: no key hidden, the plain causal path
    (4, 17, 17, 100, True, 16, True),
    (2, 33, 33, 5, True, 16, True),
    (1, 17, 17, 1, True, 32, False),
    (2, 1, 37, 5, True, 16, True),  # grouped-query decode with a window
    (2, 17, 64, 20, True, 16, False),  # a prefill chunk after 47 cached tokens
    (2, 40, 20, 3, True, 16, False),  # Tq > Tk: the first 20 queries see no key
    (2, 129, 129, 100, True, 16, True),
]


@pytest.mark.parametrize("H_kv,Tq,Tk,window,causal,D,padded", GQA_WINDOW_CASES)
def test_grouped_query_and_window_match_reference_fp32(H_kv, Tq, Tk, window, causal, D, padded):
    q, k, v, do, kpm = make_inputs(2, 4, Tq, Tk, D, padded, H_kv=H_kv)
    kw = dict(causal=causal, key_padding_mask=kpm, window=window)
    out, lse = flash_attention_fwd(q, k, v, **kw)
    ref_out, ref_lse = reference(q, k, v, **kw, return_lse=True)
    assert_close(out, ref_out, **FP32)
    assert_close(lse, ref_lse, **FP32)
    got = grads(flash_attention, q, k, v, do, **kw)
    want = grads(reference, q, k, v, do, **kw)
    assert got[2].shape == k.shape and got[3].shape == v.shape  # dk, dv: one per kv head
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, b, **FP32, msg=lambda m, name=name: f"{name}: {m}")


def test_keys_outside_every_window_are_never_read():
    """Key blocks left of every query's window are skipped, not loaded and masked: NaN there (over
    any tile width up to 128) leaves the output and the other gradients untouched."""
    q, k, v, do, _ = make_inputs(1, 4, 1, 300, 16, H_kv=2)
    k[:, :, :128], v[:, :, :128] = float("nan"), float("nan")
    got = grads(flash_attention, q, k, v, do, causal=True, window=5)
    want = grads(reference, q, k[:, :, 128:], v[:, :, 128:], do, causal=True, window=5)
    assert_close(got[0], want[0], **FP32)
    assert_close(got[1], want[1], **FP32)
    for g, w in zip(got[2:], want[2:]):  # dk, dv: zero for the skipped keys, as they get no weight
        assert (g[:, :, :128] == 0).all()
        assert_close(g[:, :, 128:], w, **FP32)


def test_grouped_query_reads_strided_kv_in_place():
    """k, v as (B, T, H_kv, D) projections viewed as (B, H_kv, T, D): no copy is needed."""
    B, H, H_kv, T, D = 2, 4, 2, 20, 16
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, T, D), strided
    kv = torch.randn(B, T, 2, H_kv, D, generator=g).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H_kv, T, D), strided
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    assert not (k.is_contiguous() or v.is_contiguous())
    got = grads(flash_attention, q, k, v, do, causal=True, window=7)
    want = grads(reference, q, k, v, do, causal=True, window=7)
    for a, b in zip(got, want):
        assert_close(a, b, **FP32)


def assert_low_precision_close(got, want_lp, want_fp32, atol, name=""):
    """The kernel's error vs the fp32 reference is at most twice what the readable reference makes
    in the same low precision, plus a small atol (how the FlashAttention repository tests)."""
    err = (got.float() - want_fp32).abs().max().item()
    ref_err = (want_lp.float() - want_fp32).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.2e} vs torch's own {ref_err:.2e} in {got.dtype}"


def check_low_precision(B, H, Tq, Tk, D, causal, padded, dtype, atol, H_kv=None, window=None):
    q, k, v, do, kpm = make_inputs(B, H, Tq, Tk, D, padded, dtype=dtype, H_kv=H_kv)
    kw = dict(causal=causal, key_padding_mask=kpm, window=window)
    got = grads(flash_attention, q, k, v, do, **kw)
    want_lp = grads(reference, q, k, v, do, **kw)
    want_32 = grads(reference, *(t.float() for t in (q, k, v, do)), **kw)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want_lp, want_32):
        assert_low_precision_close(a, b, c, atol, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter-sized version of test_cuda_low_precision")
def test_fp16_in_interpreter():
    check_low_precision(1, 2, 100, 100, 32, causal=True, padded=True, dtype=torch.float16, atol=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter-sized version of test_cuda_gqa_window")
def test_fp16_grouped_query_window_in_interpreter():
    check_low_precision(1, 4, 70, 70, 32, True, True, torch.float16, atol=1e-3, H_kv=1, window=24)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D,causal,padded", [(256, 64, True, False), (1000, 128, True, True),
                                               (1024, 64, False, True), (777, 128, False, False)])
def test_cuda_low_precision(dtype, T, D, causal, padded):
    check_low_precision(2, 4, T, T, D, causal, padded, dtype, atol=1e-3 if dtype == torch.float16 else 8e-3)


@cuda
@pytest.mark.parametrize("Tq,Tk", [(1, 2049), (128, 1500), (333, 4096)])
def test_cuda_kv_cache_shapes_bf16(Tq, Tk):
    check_low_precision(2, 4, Tq, Tk, 128, True, True, torch.bfloat16, atol=8e-3)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H_kv,Tq,Tk,window", [(2, 1000, 1000, None), (1, 777, 777, 256), (2, 1, 2049, 512),
                                               (4, 128, 1500, 300)])
def test_cuda_gqa_window(dtype, H_kv, Tq, Tk, window):
    check_low_precision(2, 8, Tq, Tk, 128, True, True, dtype, atol=1e-3 if dtype == torch.float16 else 8e-3,
                        H_kv=H_kv, window=window)


# --- bad input gets a clear error ---------------------------------------------------------------

@pytest.mark.parametrize("change,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"\(B, H, T, D\)"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "same B and D"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, "same B and D"),
    (lambda q, k, v: (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), ValueError,
     "H=2 heads .* H_kv=3: .* multiple of H_kv"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), ValueError, "head dim D=8"),
    (lambda q, k, v: (torch.cat([q, q[..., :16]], -1), torch.cat([k, k[..., :16]], -1),
                      torch.cat([v, v[..., :16]], -1)), ValueError, "head dim D=48"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "fp32/fp16/bf16"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "empty sequence"),
])
def test_bad_inputs(change, error, match):
    q, k, v, _, _ = make_inputs(2, 2, 8, 8, 32)
    with pytest.raises(error, match=match):
        flash_attention(*change(q, k, v))


@pytest.mark.parametrize("kw,error,match", [
    (dict(causal=True, window=0), ValueError, "window=0: .* >= 1"),
    (dict(causal=True, window=-3), ValueError, ">= 1"),
    (dict(causal=False, window=4), ValueError, "needs causal=True"),
    (dict(causal=True, window=2.5), TypeError, "window must be an int"),
    (dict(causal=True, window=True), TypeError, "window must be an int"),
])
def test_bad_window(kw, error, match):
    q, k, v, _, _ = make_inputs(2, 2, 8, 8, 32)
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kw)


def test_bad_key_padding_mask():
    q, k, v, _, _ = make_inputs(2, 2, 8, 8, 32)
    with pytest.raises(ValueError, match=r"\(B, Tk\)"):
        flash_attention(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="not an additive float mask"):
        flash_attention(q, k, v, key_padding_mask=torch.zeros(2, 8, device=DEVICE))


@pytest.mark.skipif(not is_interpreted(), reason="only the interpreter lacks bf16 tl.dot")
def test_bf16_in_interpreter_is_refused():
    q, k, v, _, _ = make_inputs(1, 1, 8, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter"):
        flash_attention(q, k, v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors without the interpreter need a CPU-only box")
def test_cpu_without_interpreter_and_missing_triton_say_what_to_do():
    # fresh interpreters: the interpreter switch and the import are both fixed at first import
    script = textwrap.dedent("""
        import os, sys, torch
        os.environ["TRITON_INTERPRET"] = "0"
        from minillm.kernels.attention import flash_attention
        q = torch.randn(1, 1, 4, 16)
        try:
            flash_attention(q, q, q)
        except RuntimeError as e:
            print("RUNTIME:", e)
        for name in [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "minillm.kernels"))]:
            del sys.modules[name]
        sys.modules["triton"] = None  # what `import triton` sees when it is not installed
        try:
            import minillm.kernels.attention
        except ImportError as e:
            print("IMPORT:", e)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "RUNTIME:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr
    assert "IMPORT:" in result.stdout and "pip install 'minillm[kernels]'" in result.stdout, result.stdout
