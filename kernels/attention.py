"""FlashAttention-2 in Triton: fused, tiled attention that never builds the (Tq, Tk) score matrix.

    O = softmax(Q Kᵀ · scale + mask) V            (the same function as minillm/model/attention.py)

FlashAttention (Dao et al., 2022, arXiv:2205.14135) computes it one tile at a time: a program
owns BLOCK_M query rows, streams the keys and values past them BLOCK_N at a time, and keeps a
running softmax ("online softmax", Milakov & Gimelshein 2018; the recurrence is written out in
minillm/model/flash.py) so that the scores only ever live in registers. FlashAttention-2 (Dao,
2023, arXiv:2307.08691) parallelises over query blocks, rescales the output once at the end, and
saves one number per row, the log-sum-exp, from which the backward recomputes the probabilities.

Beyond the Triton tutorial (python/tutorials/06-fused-attention.py), what the engine needs: any
sequence length (ragged tails masked); Tq != Tk with bottom-right causal alignment (decoding
against a KV cache: query i sees key j iff j <= i + Tk - Tq); key-padding masks (B, Tk); head dims
16-128, fp32/fp16/bf16, any scale and strides; grouped-query heads (Ainslie et al. 2023: query head
h reads K/V head h // (H / H_kv) in place, nothing repeated in memory); and causal sliding windows
(Mistral 7B), whose out-of-window key blocks are skipped as the causal mask skips the future.
A query row that sees no key outputs zeros with lse = -inf (the log of an empty sum), as the
readable reference does, and gets zero gradients.

This file holds the forward kernel and the autograd Function; the backward is attention_bwd.py,
what both share is common.py. Without a GPU, set TRITON_INTERPRET=1 before triton is imported.

    >>> from minillm.kernels.attention import flash_attention
    >>> y = flash_attention(q, k, v, causal=True)          # q, k, v: (B, H, T, D)
    >>> y = flash_attention(q, k, v, causal=True, window=4096)  # q: (B, 32, T, D), k, v: (B, 8, T, D)
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

from .attention_bwd import flash_attention_bwd
from .common import (ATTENTION_TUNING_KEY, FWD_CONFIGS, FWD_INTERPRETER_CONFIG, LN2, LOG2E, _key_blocks,
                     _window_key_blocks, autotuned, bucket, check_inputs, dot_precision, is_interpreted,
                     keep_attention, window_arg)

__all__ = ["flash_attention", "flash_attention_fwd", "flash_attention_bwd", "FlashAttentionFunction",
           "is_interpreted"]


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd, stride_vt,
                    stride_vd, stride_mt, offs_m, lo, hi, Tq, Tk, qk_scale, window,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_KPM: tl.constexpr,
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
            if WINDOWED:  # and the last `window` keys only: j > i + Tk - Tq - window
                visible = visible & (cols[None, :] > offs_m[:, None] + offset - window)
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
                     H, GROUP, Tq, Tk, qk_scale, window,
                     TQ_BUCKET, TK_BUCKET, WINDOW_BUCKET,  # only read by the autotuner (its cache key)
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_KPM: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_M query rows of one (batch, head). Grid: (cdiv(Tq, BLOCK_M), B·H).

    Grouped-query attention: the H query heads share H / GROUP key/value heads, GROUP consecutive
    query heads to each, so query head h reads K, V head h // GROUP, in place: no copy of K, V."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)  # int64: B·H·T·D can exceed 2^31 elements
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP  # the key/value head this query head reads
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, D), stays in registers
    k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
    kpm_base = kpm_ptr + off_b * stride_mb

    # m starts very negative but finite: a row whose keys are all masked so far then gets
    # α = 2^(m - m_new) = 2^0 and p = 2^(-inf) = 0, never 2^(-inf + inf) = NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if WINDOWED:  # sliding window: key blocks left of every row's window are skipped, its left edge masked
        lo, full_lo, n_full, hi = _window_key_blocks(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd,
                                        stride_vt, stride_vd, stride_mt, offs_m, lo, full_lo, Tq, Tk, qk_scale,
                                        window, True, CAUSAL, WINDOWED, HAS_KPM, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    else:
        full_lo = 0
        n_full, hi = _key_blocks(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    # off-diagonal blocks: every key visible, so no mask arithmetic in the hot loop
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, stride_mt, offs_m, full_lo, n_full, Tq, Tk, qk_scale,
                                    window, False, CAUSAL, WINDOWED, HAS_KPM, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    # the diagonal (causal) and the ragged tail: masked
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, stride_mt, offs_m, n_full, hi, Tq, Tk, qk_scale,
                                    window, True, CAUSAL, WINDOWED, HAS_KPM, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    # FA2 divides once at the end. A row that saw no key has l = 0: output 0, lse = log(0) = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)  # natural log, as the reference
    o_ptrs = o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < Tq)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)  # lse: (B, H, Tq)


def flash_attention_fwd(q, k, v, causal=False, key_padding_mask=None, scale=None, window=None):
    """Forward launcher: (o, lse) with o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32 (natural log)."""
    kpm = check_inputs(q, k, v, key_padding_mask, causal, window)
    (B, H, Tq, D), (H_kv, Tk) = q.shape, k.shape[1:3]
    window = window_arg(window, Tk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)  # (B, H, Tq, D), contiguous
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    mask_arg = kpm if kpm is not None else o  # never read when HAS_KPM is False
    mask_strides = kpm.stride() if kpm is not None else (0, 0)
    kernel = autotuned("attn_fwd", _attn_fwd_kernel, FWD_CONFIGS, FWD_INTERPRETER_CONFIG,
                       ATTENTION_TUNING_KEY, keep_attention)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, o, lse, mask_arg, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mask_strides,
                 H, H // H_kv, Tq, Tk, scale * LOG2E.value, window,
                 bucket(Tq), bucket(Tk), bucket(window) if window else 0,
                 HEAD_DIM=D, CAUSAL=bool(causal), WINDOWED=window > 0, HAS_KPM=kpm is not None,
                 DOT_PRECISION=dot_precision(q.dtype))  # BLOCK_M, BLOCK_N: from the autotuner
    return o, lse


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, o and the per-row lse; the backward recomputes P from them (attention_bwd.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, key_padding_mask=None, scale=None, window=None):
        o, lse = flash_attention_fwd(q, k, v, causal, key_padding_mask, scale, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.key_padding_mask, ctx.scale, ctx.window = causal, key_padding_mask, scale, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.key_padding_mask, ctx.scale,
                                         ctx.window)
        return dq, dk, dv, None, None, None, None  # dk, dv: (B, H_kv, Tk, D), like k and v


def flash_attention(q, k, v, causal=False, key_padding_mask=None, scale=None, *, window=None):
    """softmax(q kᵀ · scale + mask) v for q (B, H, Tq, D), k, v (B, H_kv, Tk, D); differentiable.

    H_kv divides H: H_kv = H is multi-head attention, 1 < H_kv < H grouped-query attention (query
    head h reads K/V head h // (H / H_kv)), H_kv = 1 multi-query attention.
    causal: bottom-right aligned (query i sees key j iff j <= i + Tk - Tq), as with a KV cache.
    key_padding_mask: (B, Tk) bool, True for real keys. scale: default 1/sqrt(D).
    window: sliding-window (local) attention, causal only: query i sees the `window` keys up to and
    including its own position, i + Tk - Tq - window < j <= i + Tk - Tq (Mistral's convention).
    """
    return FlashAttentionFunction.apply(q, k, v, causal, key_padding_mask, scale, window)
