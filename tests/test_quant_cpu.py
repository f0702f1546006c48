"""Grouped int8 (GGUF's Q8_0 layout), float32 scales in a low-precision model, and the CPU kernel
(minillm/compress/cpu_kernel.py) against the reference x @ dequantize(W)ᵀ computed in float64.
"""

import copy
import json
import platform

import pytest
import torch
import torch.nn.functional as F

from minillm import ModelConfig, build_model
from minillm.compress.quant import (GROUP_SIZES, QuantEmbedding, QuantLinear, dequantize, dequantize_int8,
                                    quantize, quantize_int8, quantize_model)
from minillm.weights.checkpoint import load_model, save_model

SMALL = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=96)


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("tiny", **{**SMALL, **kw})).eval()


# --- int8 with one scale per group of G inputs --------------------------------------------------

@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_grouped_int8_is_symmetric_per_group(group_size):
    torch.manual_seed(0)
    N, K = 6, 2 * group_size
    w = torch.randn(N, K)
    w[0, :group_size] = 0  # an all-zero group gets scale 1 and codes 0
    q, s = quantize_int8(w, group_size=group_size)
    assert q.shape == (N, K) and s.shape == (N, K // group_size) and s.dtype == w.dtype
    assert s[0, 0] == 1 and (q[0, :group_size] == 0).all()
    wg = w.reshape(N, K // group_size, group_size)  # (N, K/G, G)
    torch.testing.assert_close(s[1:], wg.abs().amax(-1)[1:] / 127)
    assert q.abs().max() == 127
    w_hat = dequantize_int8(q, s)  # (N, K)
    assert ((w_hat - w).abs() <= s.repeat_interleave(group_size, dim=1) / 2 + 1e-7).all()
    # per-channel is the same code path with one group per row
    q1, s1 = quantize_int8(w)
    assert s1.shape == (N,) and torch.equal(dequantize("int8", q1, s1), dequantize_int8(q1, s1))


def test_grouped_int8_beats_per_channel_on_rows_with_outliers():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:, 3] *= 50  # one outlier input per row: a per-channel scale wastes its grid on it
    err = {g: (dequantize("int8", *quantize(w, "int8", g, int8_groups=True).values()) - w).abs().mean()
           for g in (None, 32)}
    assert err[32] < err[None] / 5


def test_int8_ignores_the_int4_group_size_unless_asked():
    w = torch.randn(8, 72)  # 72 is not a multiple of any group size: per channel must still work
    assert quantize(w, "int8", 32)["scales"].shape == (8,)
    assert QuantLinear.from_linear(torch.nn.Linear(72, 8), "int8", 32).scales.shape == (8,)
    assert QuantLinear(64, 8, False, "int8").scales.shape == (8,)
    assert QuantLinear(64, 8, False, "int8", group_size=32).scales.shape == (8, 2)  # the GGUF loader's way
    with pytest.raises(ValueError, match="not divisible"):
        QuantLinear.from_linear(torch.nn.Linear(72, 8), "int8", 32, int8_groups=True)


def test_grouped_int8_model_embedding_and_checkpoint_round_trip(tmp_path):
    model = quantize_model(tiny_model(), "int8", 32, include_head=True, include_embeddings=True, int8_groups=True)
    assert model.lm_head.scales.shape == (96, 2) and isinstance(model.transformer.tok_emb, QuantEmbedding)
    idx = torch.randint(0, 96, (2, 7))
    torch.testing.assert_close(model.transformer.tok_emb(idx), model.lm_head.dequantized_weight()[idx])
    save_model(tmp_path / "q", model)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"]["group_size"] == 32 and meta["quantization"]["int8_groups"] is True
    loaded = load_model(tmp_path / "q", backend="reference")[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_float32_scales_in_a_bfloat16_layer(scheme):
    """The GGUF-kept path stores scales (and zeros) in fp32 inside a bf16 model: the reference reads them
    in fp32, so the output equals the fp32 dequantization cast to bf16 once."""
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 24), scheme, 32).bfloat16()
    lin.scales = lin.scales.float() * 1.001  # fp32 values bf16 cannot hold
    if lin.zeros is not None:
        lin.zeros = lin.zeros.float() + 1e-4
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = dequantize(scheme, lin.weight_q, lin.scales, lin.zeros)  # fp32
    assert w.dtype == torch.float32
    torch.testing.assert_close(lin(x), F.linear(x, w.bfloat16(), lin.bias), rtol=0, atol=0)


# --- the CPU kernel against the reference -------------------------------------------------------

from minillm.compress import cpu_kernel  # noqa: E402
from minillm.compress.quant import default_backend, set_backend  # noqa: E402

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"CPU kernel: {cpu_kernel.why_unavailable()}")
QB = 32  # the kernel's activation block

# (scheme, G, K): int8 per channel (ragged and whole blocks), int8 grouped, int4 at every group size
CASES = [("int8", None, 72), ("int8", None, 96), ("int8", 32, 96), ("int8", 64, 192)] + \
        [("int4", g, 2 * g) for g in GROUP_SIZES] + [("int4", 32, 160)]


def make(scheme, G, K, N=42, scale_dtype=torch.float32, seed=0):  # N % 4 != 0: the last rows take the 1-row path
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    t = quantize(w, scheme, G, int8_groups=G is not None)
    t["scales"] = t["scales"].to(scale_dtype)
    if "zeros" in t:
        t["zeros"] = t["zeros"].to(scale_dtype)
    return t, torch.randn(N, generator=g)


def activation_rounding(x):
    """What the kernel does to x (M, K): per block of 32, d = max|x|/127 and x̂ = d·round(x/d),
    in fp32 as the C code computes it. Returns x̂ and d, both (M, K), in float64."""
    M, K = x.shape
    nb = -(-K // QB)
    xb = F.pad(x.float(), (0, nb * QB - K)).reshape(M, nb, QB)  # (M, nb, 32), zero-padded
    d = xb.abs().amax(-1, keepdim=True) / 127  # (M, nb, 1)
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    x_hat = (d.double() * torch.round(xb * inv).double()).reshape(M, -1)[:, :K]  # (M, K)
    return x_hat, d.double().expand(M, nb, QB).reshape(M, -1)[:, :K]


@needs_kernel
@pytest.mark.parametrize("x_dtype,scale_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("M", [1, 3, 8, 40])
@pytest.mark.parametrize("scheme,G,K", CASES)
def test_cpu_kernel_matches_the_reference_within_activation_rounding(scheme, G, K, M, has_bias, x_dtype,
                                                                    scale_dtype):
    """Tolerances, and why:
    * M < GEMM_MIN_M (the integer kernel): y must equal the float64 product of the *rounded*
      activations x̂ with Ŵ (plus, for int4, z·Σx with the exact x) to fp32 accumulation error,
      1e-5 of Σ|x̂||Ŵ|; and it must be within the rounding bound of the reference x @ Ŵᵀ:
      |y - ref| ≤ Σ_k |Ŵ'[n, k]|·d/2 (Ŵ' = q·s or (q-8)·s: the part that multiplies x̂).
    * M ≥ GEMM_MIN_M (W expanded to fp32, PyTorch's GEMM): the reference to fp32 error.
    bf16 inputs: the same, plus one bf16 rounding of the output (2⁻⁸ relative)."""
    t, b = make(scheme, G, K, scale_dtype=scale_dtype)
    bias = b.to(scale_dtype) if has_bias else None
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    y = cpu_kernel.quant_matmul_cpu(x, t["weight_q"], t["scales"], t.get("zeros"), bias, scheme, G)
    assert y.dtype == x_dtype and y.shape == (M, 42)
    W = dequantize(scheme, t["weight_q"], t["scales"], t.get("zeros"), torch.float64)  # (N, K)
    b64 = bias.double() if has_bias else torch.zeros(42, dtype=torch.float64)
    xd = x.double()
    ref = xd @ W.T + b64  # (M, N)
    out_tol = (ref.abs() * 2 ** -8) if x_dtype == torch.bfloat16 else 0
    if M >= cpu_kernel.GEMM_MIN_M:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5 + (2 ** -8 if x_dtype == torch.bfloat16 else 0),
                                   atol=1e-5)
        return
    x_hat, d = activation_rounding(x)
    if scheme == "int4":
        Z = dequantize("int4", t["weight_q"], torch.zeros_like(t["scales"]), t["zeros"], torch.float64)  # z only
        W_q = W - Z  # (q - 8)·s
        emulated = x_hat @ W_q.T + xd @ Z.T + b64
    else:
        W_q = W
        emulated = x_hat @ W.T + b64
    scale = x_hat.abs() @ W_q.abs().T + xd.abs() @ (W - W_q).abs().T + 1e-6  # (M, N)
    assert ((y.double() - emulated).abs() <= 1e-5 * scale + out_tol).all()
    bound = (d / 2) @ W_q.abs().T  # (M, N): the rounding of x, at worst
    assert ((y.double() - ref).abs() <= bound * (1 + 1e-4) + 1e-5 * scale + out_tol).all()
    assert (y.double() - ref).abs().max() > 0  # x really was rounded: the bound above is not vacuous


@needs_kernel
def test_cpu_backend_in_quant_linear_and_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    ql = QuantLinear.from_linear(lin, "int4", 32)
    assert ql.backend == "reference"  # construction never compiles anything
    ref = ql(torch.randn(2, 5, 64))
    ql.set_backend("cpu")
    assert ql.backend == "cpu" and "backend=cpu" in repr(ql)
    x = torch.randn(2, 5, 64)  # (B, T, C): leading dimensions kept
    with torch.no_grad():
        y, r = ql(x), F.linear(x, ql.dequantized_weight(), ql.bias)
    assert y.shape == ref.shape and (y - r).abs().max() < 0.05 * r.abs().max()
    assert default_backend("cpu") == ("cpu-exact" if cpu_kernel.exact_is_fast() else "cpu")
    model = set_backend(quantize_model(tiny_model(), "int8", include_head=True, include_embeddings=True), "cpu")
    assert {m.backend for m in model.modules() if isinstance(m, QuantLinear)} == {"cpu"}
    idx = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        fast = model(idx)[0]
        ref = set_backend(model, "reference")(idx)[0]
    assert (fast - ref).abs().max() < 0.02 * ref.abs().max()
    copied = set_backend(copy.deepcopy(model), "cpu")  # the C description is rebuilt, not copied
    with torch.no_grad():
        torch.testing.assert_close(copied(idx)[0], set_backend(model, "cpu")(idx)[0], rtol=0, atol=0)


@needs_kernel
def test_a_quantized_checkpoint_loads_on_the_cpu_backend(tmp_path):
    save_model(tmp_path / "q", quantize_model(tiny_model(), "int4", 32))
    model = load_model(tmp_path / "q")[0]
    assert {m.backend for m in model.modules() if isinstance(m, QuantLinear)} == {default_backend("cpu")}
    assert {m.backend for m in load_model(tmp_path / "q", backend="reference")[0].modules()
            if isinstance(m, QuantLinear)} == {"reference"}


def test_cpu_kernel_refuses_what_it_cannot_run():
    t, _ = make("int4", 32, 64)
    with pytest.raises(ValueError, match="both be"):
        cpu_kernel._check(torch.randn(1, 64), t["weight_q"], t["scales"], None, "int4")
    with pytest.raises(ValueError, match="scheme"):
        cpu_kernel._check(torch.randn(1, 64), t["weight_q"], t["scales"], None, "int3")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cpu_kernel._check(torch.randn(1, 64).double(), t["weight_q"], t["scales"], t["zeros"], "int4")


@needs_kernel
@pytest.mark.parametrize("scheme,G,K", [("int8", None, 72), ("int8", 32, 96), ("int4", 32, 96), ("int4", 64, 128)])
def test_the_portable_build_agrees_with_the_native_one(scheme, G, K):
    """The library built without -march=native (on x86-64: no AVX2, the scalar C loops) gives the
    native build's answer up to fp32 summation order."""
    portable = cpu_kernel._build_and_load(None, [cpu_kernel.FLAGS])
    assert portable.minillm_has_avx2() == 0 or platform.machine() not in ("x86_64", "AMD64")
    t, b = make(scheme, G, K)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    args = (t["weight_q"], t["scales"], t.get("zeros"), b, scheme)
    y_native, y_portable = cpu_kernel.CpuLayer(*args)(x), cpu_kernel.CpuLayer(*args, lib=portable)(x)
    torch.testing.assert_close(y_portable, y_native, rtol=1e-5, atol=1e-5)


# --- when there is no compiler ---------------------------------------------------------------------

def test_no_compiler_falls_back_to_the_reference_with_one_line(monkeypatch):
    assert not cpu_kernel.available(cc="/nonexistent/cc")
    why = cpu_kernel.why_unavailable(cc="/nonexistent/cc")
    assert "no C compiler" in why and "reference" in why and "\n" not in why
    monkeypatch.setenv("CC", "/nonexistent/cc")  # what the engine sees from here on
    assert default_backend("cpu") == "reference"
    ql = QuantLinear.from_linear(torch.nn.Linear(64, 8), "int8")
    with pytest.warns(UserWarning, match="no C compiler"):
        ql.set_backend("cpu")
    assert ql.backend == "reference"
    x = torch.randn(3, 64)
    torch.testing.assert_close(ql(x), F.linear(x, ql.dequantized_weight(), ql.bias))


def test_a_compiler_that_fails_is_reported_not_raised():
    import shutil

    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program to stand in for a broken compiler")
    assert not cpu_kernel.available(cc=false)
    assert "did not compile" in cpu_kernel.why_unavailable(cc=false)


# --- exact mode: float activations, Ŵ expanded value for value (backend "cpu-exact") --------------

def _has_avx2() -> bool:
    return "avx2" in cpu_kernel._cpu_flags().split() and platform.machine() in ("x86_64", "AMD64")


BUILDS = {"native": None,  # this CPU's best (AVX-512 tiles here)
          "avx2": cpu_kernel.FLAGS + ["-march=haswell", "-fopenmp"],  # AVX2 + FMA only: the 8-lane tiles
          "portable": cpu_kernel.FLAGS}  # no SIMD: the scalar loop


@needs_kernel
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("M", [1, 3, 8, 15])  # 1: whole tiles; 2-8: constant row counts; 15: the loop
@pytest.mark.parametrize("scheme,G,K", CASES)
def test_exact_mode_is_the_reference_up_to_the_order_of_sums(scheme, G, K, M, build):
    """No 8-bit rounding of x: the answer is x @ Ŵᵀ + b with the reference's Ŵ, to fp32 summation
    error (a bound ~K·2⁻²³·Σ|ŵx|, far below the 8-bit path's ~1e-2), from every build: AVX-512's
    permute tiles, AVX2's arithmetic ones, the scalar loop."""
    if build == "avx2" and not _has_avx2():
        pytest.skip("this CPU has no AVX2")
    lib = cpu_kernel._build_and_load(None, [BUILDS[build]]) if BUILDS[build] else None
    if build == "avx2":
        assert lib.minillm_exact_is_simd() == 1
    t, b = make(scheme, G, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3))
    W = dequantize(scheme, t["weight_q"], t["scales"], t.get("zeros"), torch.float32).double()  # (N, K)
    y = cpu_kernel.CpuLayer(t["weight_q"], t["scales"], t.get("zeros"), b, scheme, lib=lib, exact=True)(x)
    want = x.double() @ W.T + b.double()
    bound = K * 2.0 ** -23 * (x.double().abs() @ W.abs().T + b.double().abs())
    assert ((y.double() - want).abs() <= bound).all()
    approx = cpu_kernel.CpuLayer(t["weight_q"], t["scales"], t.get("zeros"), b, scheme, lib=lib)(x)
    assert (approx.double() - want).abs().max() > 10 * (y.double() - want).abs().max()  # 8-bit x: coarser


@needs_kernel
def test_cpu_exact_backend_in_quant_linear():
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(torch.nn.Linear(96, 40), "int4", 32)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = F.linear(x.float(), ql.dequantized_weight(), ql.bias)
        ql.set_backend("cpu-exact")
        y = ql(x)
    assert "backend=cpu-exact" in repr(ql) and y.dtype == torch.bfloat16 and y.shape == (2, 5, 40)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 output: its own rounding
    with torch.no_grad():
        torch.testing.assert_close(ql(x.float()), ref, rtol=1e-5, atol=1e-5)
