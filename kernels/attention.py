"""FlashAttention-2 in Triton: fused, tiled attention that never builds the (Tq, Tk) score matrix.

    O = softmax(Q Kᵀ · scale + mask) V            (the same function as minillm/attention.py)

FlashAttention (Dao et al., 2022, arXiv:2205.14135) computes it one tile at a time: a program
owns BLOCK_M query rows, streams the keys and values past them BLOCK_N at a time, and keeps a
running softmax ("online softmax", Milakov & Gimelshein 2018; Rabe & Staats 2021) so that the
scores only ever live in registers. FlashAttention-2 (Dao, 2023, arXiv:2307.08691) parallelises
over query blocks, rescales the output once at the end instead of every step, and saves one
number per row — the log-sum-exp — from which the backward recomputes the probabilities.

What this kernel adds to the Triton tutorial (python/tutorials/06-fused-attention.py) is what the
engine needs: any sequence length (ragged tails are masked), Tq != Tk with bottom-right causal
alignment (decode against a KV cache: query i sees key j iff j <= i + Tk - Tq), key-padding masks
(B, Tk), head dims 16/32/64/128, fp32/fp16/bf16, any scale, and any strides.

A query row that sees no key at all (a padding query, or causal with Tq > Tk) outputs zeros and
has lse = -inf, exactly as the readable reference does — log of an empty sum — and gets zero
gradients.

The backward kernels are in attention_bwd.py. On a machine without a GPU, set TRITON_INTERPRET=1
before triton is imported and the same kernels run on CPU tensors through Triton's interpreter.

    >>> from minillm.kernels.attention import flash_attention
    >>> y = flash_attention(q, k, v, causal=True)          # q, k, v: (B, H, T, D)
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the engine runs without kernels; this file cannot
    raise ImportError(
        "minillm.kernels.attention needs Triton: pip install 'minillm[kernels]' (Linux), "
        "or use ModelConfig.attention='naive' or 'sdpa'"
    ) from e

# Kernels may only read globals that are tl.constexpr; Python code reads their `.value`.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x = 2^(x · log2 e); exp2 is the GPU's native exp
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): turns a base-2 log-sum-exp back into natural units
HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs ≥ 16 along each dim, and a power of two for tl.arange
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _key_blocks(start_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which key blocks the query rows [start_m, start_m + BLOCK_M) need, in two ranges:
    [0, n_full) every key is visible to every row (no mask work), [n_full, hi) needs masking.

    Causal skipping: row i sees keys j ≤ i + Tk - Tq. The block's first row sees every key up to
    start_m + offset, so blocks ending there are unmasked; its last real row sees up to
    min(start_m + BLOCK_M, Tq) - 1 + offset, so blocks after that are never loaded at all.
    """
    n_tail = (Tk // BLOCK_N) * BLOCK_N  # blocks past this one hang over the end of the keys
    if CAUSAL:
        offset = Tk - Tq
        n_full = (tl.maximum(start_m + offset + 1, 0) // BLOCK_N) * BLOCK_N
        n_full = tl.minimum(n_full, n_tail)
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M, Tq) + offset, 0)
        hi = tl.maximum(hi, n_full)
    else:
        n_full = n_tail
        hi = Tk
    return n_full, hi


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd, stride_vt,
                    stride_vd, stride_mt, offs_m, lo, hi, Tq, Tk, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into the running softmax of one block of query rows.

    In base 2 (s = q·k · scale · log2 e, so 2^s = e^(q·k·scale)), with m the running row max,
    l the running row sum of 2^(s - m) and acc the running Σ 2^(s - m) v, each key block does

        m_new = max(m, max_j s_j)
        p_j   = 2^(s_j - m_new)              (≤ 1: no overflow, whatever the scores)
        α     = 2^(m - m_new)                (rescales what was summed under the old max)
        l     = α · l + Σ_j p_j
        acc   = α · acc + p V

    and at the end O = acc / l, lse = m + log2(l). Masked scores are -inf, so p_j = 0 for them.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offset = Tk - Tq
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # key positions of this block
        k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd  # Kᵀ: (D, BLOCK_N)
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if MASKED:  # the ragged tail: keys past Tk read as 0 and are masked below
            kT = tl.load(k_ptrs, mask=cols[None, :] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < Tk, other=0.0)
        else:
            kT = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), fp32
        if MASKED:
            visible = cols[None, :] < Tk
            if CAUSAL:  # bottom-right aligned: j ≤ i + Tk - Tq
                visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
            s = tl.where(visible, s, float("-inf"))
        if HAS_KPM:  # padding keys (False in the mask) get no weight from any query
            real = tl.load(kpm_base + cols * stride_mt, mask=cols < Tk, other=0) != 0
            s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # p goes to the matmul in the input dtype (fp16/bf16 tensor cores), accumulating in fp32
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     stride_mb, stride_mt,
                     H, Tq, Tk, qk_scale,
                     TQ_BUCKET, TK_BUCKET,  # only read by the autotuner (its cache key)
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_M query rows of one (batch, head). Grid: (cdiv(Tq, BLOCK_M), B·H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)  # int64: B·H·T·D can exceed 2^31 elements
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, D), stays in registers
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    kpm_base = kpm_ptr + off_b * stride_mb

    # m starts very negative but finite: a row whose keys are all masked so far then gets
    # α = 2^(m - m_new) = 2^0 and p = 2^(-inf) = 0, never 2^(-inf + inf) = NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full, hi = _key_blocks(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    # off-diagonal blocks: every key visible, so no mask arithmetic in the hot loop
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, stride_mt, offs_m, 0, n_full, Tq, Tk, qk_scale,
                                    False, CAUSAL, HAS_KPM, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    # the diagonal (causal) and the ragged tail: masked
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, stride_mt, offs_m, n_full, hi, Tq, Tk, qk_scale,
                                    True, CAUSAL, HAS_KPM, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    # FA2 divides once at the end. A row that saw no key has l = 0: output 0, lse = log(0) = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)  # natural log, as the reference
    o_ptrs = o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < Tq)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)  # lse: (B, H, Tq)


# ------------------------------------------------------------------------------------------------
# Launch configurations. Each row: (BLOCK_M, BLOCK_N, num_stages, num_warps). Short on purpose:
# autotuning tries every surviving config once per (dtype, D, causal, length bucket) and keeps the
# fastest. To re-tune for a new GPU: run `pytest bench/test_attention.py --benchmark-only` with
# TRITON_PRINT_AUTOTUNING=1, look at which configs win, add or drop rows here, and re-run.
# ------------------------------------------------------------------------------------------------
FWD_CONFIGS = [(128, 64, 3, 4), (128, 64, 3, 8), (128, 128, 3, 8), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 3, 4)]
BWD_DKDV_CONFIGS = [(32, 128, 3, 4), (64, 128, 3, 8), (32, 64, 3, 4), (64, 64, 2, 4)]  # keys per program: BLOCK_N
BWD_DQ_CONFIGS = [(128, 32, 3, 4), (128, 64, 3, 8), (64, 64, 3, 4), (64, 32, 2, 4)]
# Under the interpreter there is nothing to tune, and small tiles run fastest on a CPU. The
# tiles are deliberately unequal (BLOCK_M != BLOCK_N), as on the GPU, so CPU tests cover that.
INTERPRETER_CONFIGS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


def keep(conf) -> bool:
    """Drop configs not worth timing: 8 warps need a big tile, or most of them idle."""
    return not (conf.num_warps == 8 and conf.kwargs["BLOCK_M"] * conf.kwargs["BLOCK_N"] < 128 * 64)


def hardware_configs(rows):
    """The hardware-specific part, kept out of the kernels: trim pipelining depth to the GPU's
    shared memory. Hopper/A100 (sm80, sm90: 164-228 KB) take the list as is; consumer Ampere/Ada
    (sm86, sm89: ~100 KB; A10G, L4, RTX) and older get at most 2 stages."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) in ((8, 0), (9, 0)) or major >= 10:
        return rows
    return sorted({(bm, bn, min(stages, 2), warps) for bm, bn, stages, warps in rows})


_TUNED = {}  # kernel -> autotuned kernel, built on first use on the GPU (needs the device)


def launcher(kernel, name: str, rows):
    """The kernel to launch and the fixed meta-parameters to pass it: autotuned on a GPU, one small
    config under the interpreter (TRITON_INTERPRET=1, where @triton.jit returns an interpreter)."""
    if is_interpreted():
        block_m, block_n = INTERPRETER_CONFIGS[name]
        return kernel, {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if kernel not in _TUNED:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
                   for bm, bn, s, w in hardware_configs(rows)]
        key = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM"]  # + tensor dtypes, implicitly
        _TUNED[kernel] = triton.autotune(configs=[c for c in configs if keep(c)], key=key)(kernel)
    return _TUNED[kernel], {}


def is_interpreted() -> bool:
    return not isinstance(_attn_fwd_kernel, triton.runtime.jit.JITFunction)


def bucket(n: int) -> int:
    """Autotune per power-of-two length, not per length: decoding grows Tk by one every token."""
    return triton.next_power_of_2(n)


def check_inputs(q, k, v, key_padding_mask=None):
    """Clear errors for what the kernels cannot take; returns the (B, Tk) mask as uint8 or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention expects {name} of shape (B, H, T, D); got {got}")
    (B, H, Tq, D), Tk = q.shape, k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must be "
                         "(B, H, Tk, D) with the same B, H, D as q (grouped-query heads are not supported)")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the Triton kernel; use one of {HEAD_DIMS} "
                         "(or attention='sdpa' / 'naive')")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"q, k, v must share one dtype among fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.bfloat16 and is_interpreted():
        # triton-lang/triton#11584: the interpreter multiplies bf16 bit patterns in tl.dot
        raise TypeError("Triton's interpreter (TRITON_INTERPRET=1) does not support bf16 tl.dot: "
                        "use fp32 or fp16 on the CPU, or run bf16 on a GPU")
    if q.dtype == torch.bfloat16 and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 8:
        raise TypeError("bf16 tensor cores need an Ampere or newer GPU (sm80+); use fp16 on this GPU")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {q.device}): move q, k, v to the GPU, or "
                           "set TRITON_INTERPRET=1 before importing triton to run them (slowly) on the CPU")
    if Tq == 0 or Tk == 0:
        raise ValueError(f"empty sequence: Tq={Tq}, Tk={Tk}; attention needs at least one query and one key")
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (B, Tk):
        raise ValueError(f"key_padding_mask must be (B, Tk) = {(B, Tk)}; got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.is_floating_point():
        raise TypeError("key_padding_mask must be bool (True = real key), not an additive float mask")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    return (key_padding_mask != 0).to(torch.uint8)  # (B, Tk); 1 byte per key, any int/bool accepted


def flash_attention_fwd(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Forward launcher: (o, lse) with o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32 (natural log)."""
    kpm = check_inputs(q, k, v, key_padding_mask)
    (B, H, Tq, D), Tk = q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)  # (B, H, Tq, D), contiguous
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    mask_arg = kpm if kpm is not None else o  # never read when HAS_KPM is False
    mask_strides = kpm.stride() if kpm is not None else (0, 0)
    kernel, meta = launcher(_attn_fwd_kernel, "fwd", FWD_CONFIGS)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, o, lse, mask_arg, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mask_strides,
                 H, Tq, Tk, scale * LOG2E.value, bucket(Tq), bucket(Tk),
                 HEAD_DIM=D, CAUSAL=bool(causal), HAS_KPM=kpm is not None,
                 DOT_PRECISION=dot_precision(q.dtype), **meta)
    return o, lse


def dot_precision(dtype) -> str:
    """fp32 inputs get exact fp32 products ("ieee"), matching torch's default (TF32 off)."""
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, o and the per-row lse; the backward recomputes P from them (attention_bwd.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, key_padding_mask=None, scale=None):
        o, lse = flash_attention_fwd(q, k, v, causal, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.key_padding_mask, ctx.scale = causal, key_padding_mask, scale
        return o

    @staticmethod
    def backward(ctx, do):
        # imported here, not at the top: attention_bwd builds on this file's launch helpers
        from .attention_bwd import flash_attention_bwd

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.key_padding_mask, ctx.scale)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """softmax(q kᵀ · scale + mask) v for q (B, H, Tq, D), k, v (B, H, Tk, D); differentiable.

    causal: bottom-right aligned (query i sees key j iff j <= i + Tk - Tq), as with a KV cache.
    key_padding_mask: (B, Tk) bool, True for real keys. scale: default 1/sqrt(D).
    """
    return FlashAttentionFunction.apply(q, k, v, causal, key_padding_mask, scale)
