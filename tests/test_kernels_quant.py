"""Triton quantized matmul (kernels/quant_matmul.py) against the reference x @ dequantize(W)ᵀ.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before triton
is imported; tests/conftest.py does the same for the whole session). Shapes are small there: the
interpreter executes every program in Python. CUDA tests at realistic sizes skip without a GPU.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from minillm import ModelConfig, build_model  # noqa: E402
from minillm.kernels import quant_matmul as qm  # noqa: E402
from minillm.compress.quant import QuantLinear, dequantize, quantize, quantize_model, set_backend  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not qm.INTERPRETED:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, so the kernels cannot run "
                "on CPU in this process", allow_module_level=True)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def make(scheme, N, K, group_size=32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    t = quantize(w.to(device), scheme, group_size)
    return t["weight_q"], t["scales"], t.get("zeros"), b.to(device)


def check(y, x, weight_q, scales, zeros, bias, scheme):
    """Kernel output vs the fp32 reference: within 2x the error PyTorch itself makes in x's dtype."""
    w = dequantize(scheme, weight_q, scales, zeros)  # (N, K) fp32
    ref = x.float() @ w.T + (bias.float() if bias is not None else 0)  # (M, N) fp32
    assert y.dtype == x.dtype and y.shape == ref.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        return
    b = bias.to(x.dtype) if bias is not None else None
    torch_err = (F.linear(x, w.to(x.dtype), b).float() - ref).abs().max().item()
    kernel_err = (y.float() - ref).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-3, (kernel_err, torch_err)


# --- against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16, 64])  # 1..16 take the split-K decode path, 64 the GEMM path
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_matches_reference(scheme, M, dtype):
    N, K = 40, (72 if scheme == "int8" else 96)  # ragged: N and (int8) K are not multiples of a tile
    weight_q, scales, zeros, bias = make(scheme, N, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, dtype)
    y = qm.quant_matmul(x, weight_q, scales, zeros, bias, scheme)
    check(y, x, weight_q, scales, zeros, bias, scheme)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_every_group_size(group_size):
    N, K = 36, 2 * group_size
    weight_q, scales, zeros, bias = make("int4", N, K, group_size)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = qm.quant_matmul(x, weight_q, scales, zeros, bias, "int4", group_size)
    check(y, x, weight_q, scales, zeros, bias, "int4")


def test_batched_strided_input_without_bias():
    weight_q, scales, zeros, _ = make("int4", 40, 64)
    x = torch.randn(2, 64, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE).transpose(1, 2)
    y = qm.quant_matmul(x, weight_q, scales, zeros)  # (B, T, K) with stride 1 along T, no bias
    assert y.shape == (2, 5, 40)
    check(y.reshape(10, 40), x.reshape(10, 64), weight_q, scales, zeros, None, "int4")


def test_gradient_to_x_matches_reference():
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 24).to(DEVICE), "int4", group_size=32)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    lin(x).square().sum().backward()  # reference path
    ref = x.grad.clone()
    x.grad = None
    lin.set_backend("triton")
    lin(x).square().sum().backward()
    torch.testing.assert_close(x.grad, ref, rtol=1e-4, atol=1e-4)


# --- a whole model --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_generates_the_same_greedy_tokens(scheme):
    from minillm.generate.sampling import generate

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=64)
    model = quantize_model(build_model(cfg).to(DEVICE).eval(), scheme, group_size=32, backend="reference")
    prompt = torch.randint(0, 64, (1, 5), device=DEVICE)
    with torch.no_grad():
        ref_logits = model(prompt)[0]
    ref = generate(model, prompt, 4, temperature=0.0)
    set_backend(model, "triton")
    assert all(m.backend == "triton" for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        torch.testing.assert_close(model(prompt)[0], ref_logits, rtol=1e-4, atol=1e-4)
    out = generate(model, prompt, 4, temperature=0.0)
    assert torch.equal(out, ref)


# --- clear errors ---------------------------------------------------------------------------

def test_errors_name_the_problem(monkeypatch):
    weight_q, scales, zeros, bias = make("int4", 8, 128, group_size=64)
    x = torch.randn(2, 128, device=DEVICE)
    with pytest.raises(ValueError, match="not divisible by group_size=48"):
        qm.quant_matmul(x, weight_q, scales, zeros, bias, "int4", group_size=48)
    with pytest.raises(ValueError, match=r"packed int4 weight_q must be \(N, K/2\)"):
        qm.quant_matmul(x, weight_q.repeat(1, 2), scales, zeros, bias, "int4")
    with pytest.raises(TypeError, match="int8 weight_q must be torch.int8"):
        qm.quant_matmul(x, weight_q, scales, zeros, bias, "int8")
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        qm.quant_matmul(x.long(), weight_q, scales, zeros, bias, "int4")
    with pytest.raises(ValueError, match="one device"):
        qm.quant_matmul(x, weight_q, scales.to("meta"), zeros, bias, "int4")
    with pytest.raises(ValueError, match="int4 needs zeros"):
        qm.quant_matmul(x, weight_q, scales, None, bias, "int4")
    with pytest.raises(ValueError, match="bias must have shape"):
        qm.quant_matmul(x, weight_q, scales, zeros, bias[:4], "int4")
    q8, s8, _, _ = make("int8", 8, 128)
    with pytest.raises(ValueError, match=r"int8 scales must have shape \(8,\)"):
        qm.quant_matmul(x, q8, s8[:4], None, None, "int8")
    if not CUDA:
        with pytest.raises(TypeError, match="interpreter .* cannot run bf16"):
            qm.quant_matmul(x.bfloat16(), q8, s8, None, None, "int8")
        monkeypatch.setattr(qm, "INTERPRETED", False)  # as if triton had been imported without it
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            qm.quant_matmul(x, q8, s8, None, None, "int8")
        with pytest.raises(ValueError, match="move the model to the GPU first"):
            QuantLinear.from_linear(torch.nn.Linear(64, 8), "int8").set_backend("triton")


# --- CUDA at realistic sizes ----------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("scheme,group_size", [("int8", 128), ("int4", 128), ("int4", 64)])
def test_cuda_realistic_sizes(scheme, group_size, M, dtype):
    N, K = 4096, 4096
    weight_q, scales, zeros, bias = make(scheme, N, K, group_size, device="cuda")
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    y = qm.quant_matmul(x, weight_q, scales.to(dtype), zeros.to(dtype) if zeros is not None else None,
                        bias.to(dtype), scheme)
    check(y, x, weight_q, scales.to(dtype), zeros.to(dtype) if zeros is not None else None, bias.to(dtype),
          scheme)


@needs_cuda
def test_cuda_default_backend_is_triton():
    lin = QuantLinear.from_linear(torch.nn.Linear(256, 128, device="cuda"), "int4", group_size=64)
    assert lin.backend == "triton"
