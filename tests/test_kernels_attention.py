"""The Triton FlashAttention kernel equals minillm's readable attention: outputs, lse, dQ, dK, dV.

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


def make_inputs(B, H, Tq, Tk, D, padded=False, dtype=torch.float32, seed=0):
    """q (B, H, Tq, D), k, v (B, H, Tk, D), dO like the output, and a (B, Tk) key mask or None.
    The mask left-pads the last batch row by a third of Tk, as a batch of ragged prompts would."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for T in (Tq, Tk, Tk))
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


def assert_low_precision_close(got, want_lp, want_fp32, atol, name=""):
    """The kernel's error vs the fp32 reference is at most twice what the readable reference makes
    in the same low precision, plus a small atol (how the FlashAttention repository tests)."""
    err = (got.float() - want_fp32).abs().max().item()
    ref_err = (want_lp.float() - want_fp32).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.2e} vs torch's own {ref_err:.2e} in {got.dtype}"


def check_low_precision(B, H, Tq, Tk, D, causal, padded, dtype, atol):
    q, k, v, do, kpm = make_inputs(B, H, Tq, Tk, D, padded, dtype=dtype)
    got = grads(flash_attention, q, k, v, do, causal=causal, key_padding_mask=kpm)
    want_lp = grads(scaled_dot_product_attention, q, k, v, do, causal=causal, key_padding_mask=kpm)
    want_32 = grads(scaled_dot_product_attention, *(t.float() for t in (q, k, v, do)), causal=causal,
                    key_padding_mask=kpm)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want_lp, want_32):
        assert_low_precision_close(a, b, c, atol, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter-sized version of test_cuda_low_precision")
def test_fp16_in_interpreter():
    check_low_precision(1, 2, 100, 100, 32, causal=True, padded=True, dtype=torch.float16, atol=1e-3)


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


# --- bad input gets a clear error ---------------------------------------------------------------

@pytest.mark.parametrize("change,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"\(B, H, T, D\)"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), ValueError, "same B, H, D"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, "same B, H, D"),
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
