"""FlashAttention-2 backward in Triton: dQ, dK, dV without storing the (Tq, Tk) probabilities.

With S = Q Kᵀ · scale, P = softmax(S) (masked entries 0), O = P V and dO the incoming gradient,
the chain rule gives (FlashAttention-2, Dao 2023, arXiv:2307.08691, Algorithm 2):

    dV = Pᵀ dO
    dP = dO Vᵀ
    dS = P ∘ (dP - Δ)       with Δ_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O)_i   (softmax's Jacobian)
    dQ = dS K · scale
    dK = dSᵀ Q · scale

P is never saved: the forward kept one number per row, lse_i = log Σ_j exp(S_ij), and
P_ij = exp(S_ij - lse_i) recomputes any tile exactly (in base 2 here: 2^(S·log2 e - lse·log2 e)).

Grouped-query attention: the G = H / H_kv query heads of group g all read K_g, V_g, so each kv
head's gradient sums over them, dV_g = Σ_h P_hᵀ dO_h and dK_g = Σ_h dS_hᵀ Q_h · scale. The dK/dV
program of a kv head loops over its G query heads with one running sum in registers: no atomics,
no (B, H, Tk, D) buffer to reduce. A sliding window only changes which blocks are visited.

Three kernels:
  1. `_attn_bwd_preprocess_kernel`: Δ = rowsum(dO ∘ O), one fp32 per query row.
  2. `_attn_bwd_dkdv_kernel`: one program per block of *keys*, streaming the query blocks that see
     them, accumulating dK, dV in registers and writing them once.
  3. `_attn_bwd_dq_kernel`: one program per block of *queries*, streaming key blocks like the forward.
Splitting dQ from dK/dV recomputes Q Kᵀ and dO Vᵀ once more (7 matmuls instead of 5), but no program
writes where another does: deterministic, correct under the interpreter, and safe to re-run while
autotuning, where one kernel adding dQ with fp32 atomic_add would be none of these.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the engine runs without kernels; this file cannot
    raise ImportError("minillm.kernels.attention_bwd needs Triton: pip install 'minillm[kernels]' (Linux), "
                      "or use ModelConfig.attention='naive' or 'sdpa'") from e

from .common import (ATTENTION_TUNING_KEY, BWD_DKDV_CONFIGS, BWD_DKDV_INTERPRETER_CONFIG, BWD_DQ_CONFIGS,
                     BWD_DQ_INTERPRETER_CONFIG, LOG2E, _key_blocks, _window_key_blocks, autotuned, bucket,
                     check_inputs, dot_precision, keep_attention, window_arg)


@triton.jit
def _attn_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr,
                                stride_ob, stride_oh, stride_ot, stride_od,
                                stride_dob, stride_doh, stride_dot, stride_dod,
                                H, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ_i = Σ_d dO_id · O_id for BLOCK_M rows of one (batch, head); Δ: (B, H, Tq) fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot
                + offs_d[None, :] * stride_od, mask=rows, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=rows, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _load_lse2(lse_ptr, offs_m, Tq):
    """lse in base 2 for rows offs_m. Rows past Tq and rows that saw no key (lse = -inf) become
    +inf, so that P = 2^(s - lse) is exactly 0 for them instead of garbage or NaN."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < Tq, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_mb, stride_mt,
                          H, GROUP, Tq, Tk, scale, window,
                          TQ_BUCKET, TK_BUCKET, WINDOW_BUCKET,  # only read by the autotuner (its cache key)
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                          HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_N keys of one (batch, kv head), summing over the GROUP query heads that
    read them. Works transposed (keys along rows) so that dV += Pᵀ dO and dK += dSᵀ Q are plain
    matmuls. dK, dV are written contiguous (B, H_kv, Tk, D). Grid: (cdiv(Tk, BLOCK_N), B·H_kv)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    H_kv = H // GROUP
    off_b = (pid_bh // H_kv).to(tl.int64)
    off_hk = (pid_bh % H_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < Tk
    k = tl.load(k_ptr + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :] * stride_kd, mask=keys, other=0.0)  # (BLOCK_N, D)
    v = tl.load(v_ptr + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :] * stride_vd, mask=keys, other=0.0)  # (BLOCK_N, D)
    qk_scale = scale * LOG2E
    offset = Tk - Tq
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Which query blocks see these keys. Causal: query i sees key j iff i >= j - offset, so rows
    # before start_n - offset are skipped; rows from the last key - offset on see every key here.
    last_key = tl.minimum(start_n + BLOCK_N, Tk) - 1
    if CAUSAL:
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(last_key - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.maximum(tl.minimum(mid, tl.cdiv(Tq, BLOCK_M) * BLOCK_M), lo)
    else:
        lo = 0
        mid = 0
    if WINDOWED:  # and query i sees key j only while i < j - offset + window: rows from q_end on see none
        q_end = tl.minimum(tl.maximum(last_key - offset + window, 0), Tq)
        # rows before start_n - offset + window still see the first key, so (from mid) every key
        mid_end = (tl.maximum(start_n - offset + window, 0) // BLOCK_M) * BLOCK_M
        mid_end = tl.maximum(tl.minimum(mid_end, q_end), mid)
    else:
        mid_end = Tq
        q_end = Tq
    for g in range(GROUP):  # the query heads that read this kv head: dK, dV sum over them
        off_h = off_hk * GROUP + g
        q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
        do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
        lse_base = lse_ptr + (off_b * H + off_h) * Tq
        delta_base = delta_ptr + (off_b * H + off_h) * Tq
        # [lo, mid): the diagonal, masked; [mid, mid_end): every query sees every key of this block;
        # [mid_end, q_end): the window's far edge, masked (empty without a window)
        for stage in tl.static_range(3):
            start = lo if stage == 0 else (mid if stage == 1 else mid_end)
            end = mid if stage == 0 else (mid_end if stage == 1 else q_end)
            for start_m in range(start, end, BLOCK_M):
                offs_m = start_m + offs_m0
                rows = offs_m[:, None] < Tq
                qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                             mask=offs_m[None, :] < Tq, other=0.0)  # (D, BLOCK_M)
                do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                             mask=rows, other=0.0)  # (BLOCK_M, D)
                lse2 = _load_lse2(lse_base, offs_m, Tq)
                delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
                sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
                pT = tl.exp2(sT - lse2[None, :])  # Pᵀ, recomputed from the saved lse
                if stage != 1:  # bottom-right causal mask on the diagonal, and the window's edge
                    visible = offs_n[:, None] <= offs_m[None, :] + offset
                    if WINDOWED:
                        visible = visible & (offs_n[:, None] > offs_m[None, :] + offset - window)
                    pT = tl.where(visible, pT, 0.0)
                dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += Pᵀ dO
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO Vᵀ)ᵀ: (BLOCK_N, BLOCK_M)
                dsT = pT * (dpT - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ - Δ)
                dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)  # dK += dSᵀ Q

    # A padding key (or one past Tk) should have had P = 0 in every row; each key's dK, dV row
    # depends only on its own row of Pᵀ, so zeroing those rows once here equals masking P inside
    # the loop, without a mask load and select per step.
    real = offs_n < Tk
    if HAS_KPM:
        real = real & (tl.load(kpm_ptr + off_b * stride_mb + offs_n * stride_mt, mask=offs_n < Tk, other=0) != 0)
    dk = tl.where(real[:, None], dk * scale, 0.0)
    dv = tl.where(real[:, None], dv, 0.0)
    out = off_b * H_kv * Tk * HEAD_DIM + off_hk * Tk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=keys)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=keys)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_mb, stride_mt,
                        H, GROUP, Tq, Tk, scale, window,
                        TQ_BUCKET, TK_BUCKET, WINDOW_BUCKET,  # only read by the autotuner (its cache key)
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                        HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_M queries of one (batch, head), visiting key blocks as the forward does
    (same causal and window skipping; K, V of kv head h // GROUP). dQ is written contiguous (B, H, Tq, D)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=rows, other=0.0)  # (BLOCK_M, D)
    do = tl.load(do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=rows, other=0.0)  # (BLOCK_M, D)
    lse2 = _load_lse2(lse_ptr + pid_bh.to(tl.int64) * Tq, offs_m, Tq)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
    qk_scale = scale * LOG2E
    offset = Tk - Tq
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if WINDOWED:
        lo, full_lo, n_full, hi = _window_key_blocks(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N)
    else:
        lo = 0
        full_lo = 0
        n_full, hi = _key_blocks(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    # stage 0: the window's left edge [lo, full_lo), masked (empty without a window);
    # 1: unmasked blocks [full_lo, n_full); 2: the diagonal and the ragged tail [n_full, hi), masked
    for stage in tl.static_range(3):
        start = lo if stage == 0 else (full_lo if stage == 1 else n_full)
        end = full_lo if stage == 0 else (n_full if stage == 1 else hi)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n0
            k_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd  # Kᵀ: (D, BLOCK_N)
            v_ptrs = v_base + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd  # Vᵀ: (D, BLOCK_N)
            if stage == 1:  # whole blocks inside Tk: no bounds checks
                kT = tl.load(k_ptrs)
                vT = tl.load(v_ptrs)
            else:
                kT = tl.load(k_ptrs, mask=cols[None, :] < Tk, other=0.0)
                vT = tl.load(v_ptrs, mask=cols[None, :] < Tk, other=0.0)
            s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(s - lse2[:, None])
            if stage != 1:
                visible = cols[None, :] < Tk
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
                if WINDOWED:
                    visible = visible & (cols[None, :] > offs_m[:, None] + offset - window)
                p = tl.where(visible, p, 0.0)
            if HAS_KPM:  # here every key's P feeds every dQ row, so padding must be masked in the loop
                real = tl.load(kpm_ptr + off_b * stride_mb + cols * stride_mt, mask=cols < Tk, other=0) != 0
                p = tl.where(real[None, :], p, 0.0)
            dp = tl.dot(do, vT, input_precision=DOT_PRECISION)  # dP = dO Vᵀ
            ds = p * (dp - delta[:, None])  # dS = P ∘ (dP - Δ)
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)  # dQ += dS K
    out = off_b * H * Tq * HEAD_DIM + off_h * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows)


def flash_attention_bwd(do, q, k, v, o, lse, causal=False, key_padding_mask=None, scale=None, window=None):
    """Backward launcher: (dq, dk, dv), contiguous, in q's dtype, dk and dv with k's H_kv heads.
    `o`, `lse` come from the forward."""
    kpm = check_inputs(q, k, v, key_padding_mask, causal, window)
    if do.shape != o.shape:
        raise ValueError(f"grad of the output has shape {tuple(do.shape)}, expected {tuple(o.shape)}")
    (B, H, Tq, D), (H_kv, Tk) = q.shape, k.shape[1:3]
    window = window_arg(window, Tk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    do = do.to(q.dtype)  # autograd may hand us another dtype under autocast
    delta = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, 64), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Tq, HEAD_DIM=D, BLOCK_M=64)

    dq = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)  # contiguous: the kernels assume it
    dk = torch.empty((B, H_kv, Tk, D), device=q.device, dtype=q.dtype)
    dv = torch.empty((B, H_kv, Tk, D), device=q.device, dtype=q.dtype)
    mask_arg = kpm if kpm is not None else delta  # never read when HAS_KPM is False
    mask_strides = kpm.stride() if kpm is not None else (0, 0)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *mask_strides)
    sizes = (H, H // H_kv, Tq, Tk, scale, window, bucket(Tq), bucket(Tk), bucket(window) if window else 0)
    flags = dict(HEAD_DIM=D, CAUSAL=bool(causal), WINDOWED=window > 0, HAS_KPM=kpm is not None,
                 DOT_PRECISION=dot_precision(q.dtype))

    kernel = autotuned("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS, BWD_DKDV_INTERPRETER_CONFIG,
                       ATTENTION_TUNING_KEY, keep_attention)
    grid = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * H_kv)  # noqa: E731  (one program per kv head)
    kernel[grid](q, k, v, do, lse, delta, dk, dv, mask_arg, *strides, *sizes, **flags)

    kernel = autotuned("attn_bwd_dq", _attn_bwd_dq_kernel, BWD_DQ_CONFIGS, BWD_DQ_INTERPRETER_CONFIG,
                       ATTENTION_TUNING_KEY, keep_attention)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dq, mask_arg, *strides, *sizes, **flags)
    return dq, dk, dv
