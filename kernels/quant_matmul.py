"""Weight-only quantized matmul in Triton: y = x @ dequant(W)ᵀ (+ b), dequantizing while loading W.

The reference is QuantLinear's "reference" backend (minillm/compress/quant.py): F.linear(x,
dequantize(W)) materialises the whole float matrix before multiplying. Here each program loads a tile
of int8 / packed-int4 codes, turns them into floats in registers and feeds them straight to `tl.dot`:
the float matrix never exists, so the kernel reads 1 byte (int8) or ½ byte (int4) per weight instead
of 2 (bf16). At decode time (M = 1…16 tokens) a linear layer is memory bound: fewer bytes, less time.

Math (N outputs, K inputs; codes as minillm/compress/quant_format.py stores them):
    int8, per output channel:  y[m, n] = s[n] · Σ_k x[m, k] · q[n, k]          + b[n]
          the scale does not depend on k, so it leaves the sum: one multiply per output, in the
          epilogue, and the codes go to tl.dot as exact small integers (|q| ≤ 127 is exact in bf16).
    int4, per group of G:      y[m, n] = Σ_k x[m, k] · ((q[n, k] - 8) · s[n, k // G] + z[n, k // G]) + b[n]
          the scale changes along k, so each tile is dequantized before the dot; every K-tile lies
          inside one group (BLOCK_K ≤ G, both powers of two), so a tile needs one (s, z) per row.
Packing (int4): packed[n, j] = q[n, 2j] | (q[n, 2j+1] << 4), shape (N, K/2) uint8, row-major. A
    K-tile of BLOCK_K codes is BLOCK_K/2 contiguous bytes per row (wide, coalesced loads of the one
    big operand); the low nibbles are the even k, the high nibbles the odd k. The kernel never puts
    them back in k order: it splits x the same way (two stride-2 loads of the small operand) and
    does two half-size dots, x[:, 0::2] @ Ŵ_loᵀ + x[:, 1::2] @ Ŵ_hiᵀ.

Two launch paths over one kernel body:
    decode  (M ≤ 16): one BLOCK_M=16 row of tiles; few outputs to spread over the GPU, so the K loop
            is split over SPLIT_K programs ("split-K") that add their partial sums into an fp32 output
            with atomics. Memory bound: the goal is enough programs in flight to saturate bandwidth.
    prefill (M > 16): a tiled GEMM (the Triton matmul tutorial's grouped ordering for L2 reuse).

    >>> y = quant_matmul(x, layer.weight_q, layer.scales, layer.zeros, layer.bias, scheme="int4")
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the engine never needs this file; say how to get it
    raise ImportError("minillm.kernels.quant_matmul needs triton: pip install 'minillm[kernels]' "
                      "(Linux), or use QuantLinear's backend='reference'") from e

# The format and its reference dequantize, from the one file of minillm that imports neither this
# kernel nor QuantLinear (which imports this file when its backend is set to "triton").
from minillm.compress.quant_format import GROUP_SIZES, dequantize

from .common import autotuned, bucket, check_runnable, dot_precision, is_interpreted

DECODE_MAX_M = 16


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: next power of two of M, only an autotuning key
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # --- which output tile: grouped ordering (GROUP_M row-tiles share the same W columns in L2) ---
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # which slice of K this program sums (0 when SPLIT_K == 1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) rows of W = columns of y
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # --- K loop: program pid_k takes K-tiles pid_k, pid_k + SPLIT_K, pid_k + 2·SPLIT_K, ... ---
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            q = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=mask_k[:, None] & mask_n[None, :], other=0)  # (BLOCK_K, BLOCK_N) int8 = Wᵀ tile
            acc += tl.dot(x, q.to(x.dtype), input_precision=DOT_PRECISION)  # exact codes; scale later
        else:
            # BLOCK_K codes of a row are BLOCK_K/2 contiguous bytes: byte j holds k = 2j (low nibble)
            # and k = 2j+1 (high nibble). Rather than interleave the nibbles back into k order, split
            # x the same way:  x @ Ŵᵀ = x[:, even k] @ Ŵ_loᵀ + x[:, odd k] @ Ŵ_hiᵀ.
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # (BLOCK_K/2,) byte columns
            mask_j = offs_j < K // 2
            packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_j[:, None] * stride_wk,
                             mask=mask_j[:, None] & mask_n[None, :], other=0)  # (BLOCK_K/2, BLOCK_N) uint8
            g = k0 // GROUP_SIZE  # the whole tile lies in one group (BLOCK_K ≤ GROUP_SIZE)
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
            w_lo = ((packed & 0xF).to(tl.float32) - 8.0) * s[None, :] + z[None, :]  # Ŵᵀ at even k
            w_hi = ((packed >> 4).to(tl.float32) - 8.0) * s[None, :] + z[None, :]  # Ŵᵀ at odd k
            x_mask = mask_m[:, None] & mask_j[None, :]
            x_even_ptrs = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_j[None, :]) * stride_xk
            x_even = tl.load(x_even_ptrs, mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K/2)
            x_odd = tl.load(x_even_ptrs + stride_xk, mask=x_mask, other=0.0)
            acc += tl.dot(x_even, w_lo.to(x_even.dtype), input_precision=DOT_PRECISION)
            acc += tl.dot(x_odd, w_hi.to(x_odd.dtype), input_precision=DOT_PRECISION)

    # --- epilogue: per-channel scale (int8), bias once (by the first K-slice), write ---
    if BITS == 8:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
        acc = acc * s.to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :] * (pid_k == 0).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # partial sums of the K-slices meet in an fp32 buffer (zeroed by _zero_output)
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


# Read once, through the one shared check; QuantLinear.set_backend asks it (and tests patch it) here.
INTERPRETED = is_interpreted()


def _zero_output(nargs):
    """Split-K adds into y, so y must start at zero before every launch (autotuning reruns it)."""
    nargs["y_ptr"].zero_()


def _config(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, GROUP_M=1):
    kw = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, GROUP_M=GROUP_M)
    return triton.Config(kw, num_warps=warps, num_stages=stages, pre_hook=_zero_output if SPLIT_K > 1 else None)


# Launch configurations, short on purpose: each is compiled and timed on first use of a shape
# (N, K, M bucket, bits, group size). They are starting points from the Triton matmul tutorial's
# shapes, not yet timed on a GPU. To re-tune: run `pytest bench/test_quant_matmul.py
# --benchmark-only` on the GPU with TRITON_PRINT_AUTOTUNING=1, keep the winners, drop the rest.
DECODE_CONFIGS = [  # BLOCK_M = 16: tl.dot's smallest tile; rows past M are masked
    _config(16, 32, 128, 4, warps=4, stages=4), _config(16, 64, 128, 4, warps=4, stages=4),
    _config(16, 64, 128, 2, warps=4, stages=3), _config(16, 128, 128, 1, warps=4, stages=3),
    _config(16, 64, 64, 8, warps=4, stages=4), _config(16, 128, 64, 4, warps=4, stages=4),
    _config(16, 64, 32, 8, warps=2, stages=4), _config(16, 128, 32, 4, warps=4, stages=5),
]
PREFILL_CONFIGS = [
    _config(128, 128, 64, 1, warps=8, stages=3, GROUP_M=8), _config(128, 64, 64, 1, warps=4, stages=4, GROUP_M=8),
    _config(64, 128, 64, 1, warps=4, stages=4, GROUP_M=8), _config(64, 64, 64, 1, warps=4, stages=4, GROUP_M=8),
    _config(128, 128, 32, 1, warps=8, stages=4, GROUP_M=8), _config(64, 64, 32, 1, warps=4, stages=4, GROUP_M=8),
    _config(128, 256, 64, 1, warps=8, stages=3, GROUP_M=8), _config(128, 128, 128, 1, warps=8, stages=3, GROUP_M=8),
]
# Under the interpreter: small tiles, and split-K on so that the atomic path is exercised.
DECODE_INTERPRETER_CONFIG = _config(16, 32, 32, 2, warps=4, stages=1)
PREFILL_INTERPRETER_CONFIG = _config(32, 32, 32, 1, warps=4, stages=1, GROUP_M=2)
TUNING_KEY = ["N", "K", "M_BUCKET", "BITS", "GROUP_SIZE"]  # + tensor dtypes, implicitly


def keep(config, args: dict) -> bool:
    """Drop configs that cannot run this call: an int4 K-tile must fit inside one group."""
    return args["BITS"] == 8 or config.kwargs["BLOCK_K"] <= args["GROUP_SIZE"]


def quant_matmul_fwd(x: torch.Tensor, weight_q: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     scheme: str | None = None, group_size: int | None = None) -> torch.Tensor:
    """x (..., K) float -> y (..., N) in x's dtype. Shapes and dtypes as minillm.compress.quant_format stores them:
    int8: weight_q (N, K) int8, scales (N,);   int4: weight_q (N, K/2) uint8, scales/zeros (N, K/G)."""
    scheme = scheme or ("int8" if weight_q.dtype == torch.int8 else "int4")
    _check(x, weight_q, scales, zeros, bias, scheme, group_size)
    K = x.shape[-1]
    N = weight_q.shape[0]
    x2 = x.reshape(-1, K)  # (M, K), a view when x is contiguous
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    bits = 8 if scheme == "int8" else 4
    G = K // scales.shape[1] if bits == 4 else K  # int8: one "group" spans the whole row
    decode = M <= DECODE_MAX_M
    # decode sums K-slices into fp32 with atomics; prefill writes its tiles directly in x's dtype
    y = torch.empty(M, N, device=x.device, dtype=torch.float32 if decode else x.dtype)
    if decode:
        kernel = autotuned("quant_decode", _quant_matmul_kernel, DECODE_CONFIGS, DECODE_INTERPRETER_CONFIG,
                           TUNING_KEY, keep)
    else:
        kernel = autotuned("quant_prefill", _quant_matmul_kernel, PREFILL_CONFIGS, PREFILL_INTERPRETER_CONFIG,
                           TUNING_KEY, keep)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    stride_sg = scales.stride(1) if scales.dim() == 2 else 0
    kernel[grid](
        x2, weight_q, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        M, N, K, bucket(M),
        x2.stride(0), x2.stride(1), weight_q.stride(0), weight_q.stride(1), scales.stride(0), stride_sg,
        y.stride(0), y.stride(1),
        BITS=bits, GROUP_SIZE=G, HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),  # fp32 in, fp32-exact products
    )  # BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, GROUP_M: from the autotuner
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def _check(x, weight_q, scales, zeros, bias, scheme, group_size) -> None:
    """Clear errors before launch: a wrong shape in a kernel is a silent wrong answer or a crash."""
    if scheme not in ("int8", "int4"):
        raise ValueError(f"scheme must be 'int8' or 'int4', got {scheme!r}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    want = torch.int8 if scheme == "int8" else torch.uint8
    if weight_q.dtype != want:
        raise TypeError(f"{scheme} weight_q must be {want}, got {weight_q.dtype}")
    if not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be a float tensor, got {scales.dtype}")
    tensors = {"x": x, "weight_q": weight_q, "scales": scales, "zeros": zeros, "bias": bias}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    check_runnable(x, "quant_matmul", "move the model to the GPU, or use QuantLinear's backend='reference'",
                   interpreted=INTERPRETED)
    if weight_q.dim() != 2:
        raise ValueError(f"weight_q must be 2-D (N, K or K/2), got shape {tuple(weight_q.shape)}")
    N, K = weight_q.shape[0], x.shape[-1]
    if scheme == "int8":
        if weight_q.shape[1] != K:
            raise ValueError(f"int8 weight_q is {tuple(weight_q.shape)} but x has K={K} features")
        if scales.shape != (N,):
            raise ValueError(f"int8 scales must have shape ({N},), one per output channel, got "
                             f"{tuple(scales.shape)} (grouped int8 runs on backend 'reference' or 'cpu')")
    else:
        if weight_q.shape[1] * 2 != K:
            raise ValueError(f"packed int4 weight_q must be (N, K/2) = ({N}, {K // 2}) for x with K={K} "
                             f"(two codes per byte), got {tuple(weight_q.shape)}")
        if zeros is None:
            raise ValueError("int4 needs zeros (one per group)")
        if scales.dim() != 2 or scales.shape[0] != N or zeros.shape != scales.shape:
            raise ValueError(f"int4 scales and zeros must both be (N, K/G) with N={N}, got "
                             f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
        if group_size is not None and K % group_size != 0:
            raise ValueError(f"K={K} is not divisible by group_size={group_size}")
        G = group_size or K // max(scales.shape[1], 1)
        if K % G != 0 or scales.shape[1] * G != K:
            raise ValueError(f"K={K} is not divisible into {scales.shape[1]} groups of equal size")
        if G not in GROUP_SIZES:
            raise ValueError(f"group size K/groups = {G} must be one of {GROUP_SIZES}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")


class QuantMatmulFunction(torch.autograd.Function):
    """Forward: the fused kernel. Backward (to x only; codes are not trained): dx = dy @ Ŵ, with Ŵ
    dequantized in plain PyTorch — rarely needed (e.g. training adapters on a frozen quantized model)."""

    @staticmethod
    def forward(ctx, x, weight_q, scales, zeros, bias, scheme, group_size):
        ctx.save_for_backward(weight_q, scales, zeros)
        ctx.scheme = scheme or ("int8" if weight_q.dtype == torch.int8 else "int4")
        return quant_matmul_fwd(x, weight_q, scales, zeros, bias, scheme, group_size)

    @staticmethod
    def backward(ctx, dy):
        weight_q, scales, zeros = ctx.saved_tensors
        w = dequantize(ctx.scheme, weight_q, scales, zeros, dy.dtype)  # (N, K)
        return dy @ w, None, None, None, None, None, None


def quant_matmul(x, weight_q, scales, zeros=None, bias=None, scheme=None, group_size=None):
    """y = x @ dequant(W)ᵀ (+ bias); see quant_matmul_fwd for the shapes."""
    return QuantMatmulFunction.apply(x, weight_q, scales, zeros, bias, scheme, group_size)
