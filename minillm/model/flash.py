"""FlashAttention-2 in plain PyTorch: the tiled algorithm, block by block, with its own backward.

The step between the readable attention (attention.py: build the whole (Tq, Tk) score matrix, softmax
it, multiply by V) and the Triton kernel (kernels/attention.py, the same loops on a GPU's SRAM). It
computes the same function as `scaled_dot_product_attention`, never holding more than one
(BLOCK_M, BLOCK_N) tile of scores, which is the whole idea of FlashAttention (Dao et al., 2022;
FlashAttention-2, Dao 2023):

Forward, one block of BLOCK_M queries at a time, visiting the key blocks left to right with the
online softmax (Milakov & Gimelshein, 2018). Per query row it keeps a running max m, a running sum
ℓ = Σ exp(s - m) and an unnormalised output acc = Σ exp(s - m)·v; a new block of scores S_j gives
    m'  = max(m, rowmax(S_j))
    ℓ'  = exp(m - m')·ℓ + rowsum(exp(S_j - m'))          old terms rescaled to the new max
    acc' = exp(m - m')·acc + exp(S_j - m') V_j
and at the end O = acc / ℓ and LSE = m + log ℓ = log Σ_j exp(s_j), one number per row, saved.

Backward recomputes the probabilities P = exp(S - LSE) tile by tile instead of storing them (Tq·Tk
numbers), with D = rowsum(dO ∘ O) (= rowsum(P ∘ dP), the softmax Jacobian's correction):
    dV = Pᵀ dO        dP = dO Vᵀ        dS = P ∘ (dP - D)        dQ = dS K·scale        dK = dSᵀ Q·scale
The outer loop runs over key blocks (each owns its dK, dV); dQ is summed into across them, which the
Triton kernel does in a separate pass or with atomic adds.

Masks as in attention.py and the kernel: causal is bottom-right aligned for Tq ≠ Tk (query i sees key
j iff j ≤ i + Tk - Tq, as when decoding against a KV cache), a key-padding mask (B, Tk) with True =
real key, and a row that sees no key outputs zeros with LSE = -inf. Grouped-query attention: k, v may
have fewer heads H_kv dividing H. Here the loops are Python loops, so this is slow; it exists to be
read and tested (tests/test_flash_reference.py), and to be stepped through in a debugger.

    >>> o = flash_attention(q, k, v, causal=True)      # q: (B, H, Tq, D), k, v: (B, H_kv, Tk, D)
"""

from __future__ import annotations

import math

import torch


def _visible(i0: int, i1: int, j0: int, j1: int, Tq: int, Tk: int, causal: bool,
             key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Which (query, key) pairs of the tile rows i0:i1 × columns j0:j1 may attend; None = all of them."""
    mask = None
    if causal:
        rows = torch.arange(i0, i1, device=device)[:, None]  # (BM, 1)
        cols = torch.arange(j0, j1, device=device)[None, :]  # (1, BN)
        mask = cols <= rows + (Tk - Tq)  # (BM, BN): bottom-right aligned
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, j0:j1]  # (B, 1, 1, BN)
        mask = pad if mask is None else mask & pad  # (B, 1, BM, BN)
    return mask


def _skip(i1: int, j0: int, Tq: int, Tk: int, causal: bool) -> bool:
    """True when every key of the block starting at j0 is in the future of every query before i1."""
    # the last query row of the tile, i1 - 1, sees keys up to i1 - 1 + Tk - Tq
    return causal and j0 > i1 - 1 + (Tk - Tq)


def flash_attention_fwd(q, k, v, causal=False, key_padding_mask=None, scale=None, block_m=16, block_n=16):
    """Tiled forward: returns O (B, H, Tq, D) in q's dtype and LSE (B, H, Tq) in fp32 (fp64 for fp64)."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    if H % H_kv != 0:
        raise ValueError(f"{H} query heads cannot be shared evenly by {H_kv} key/value heads")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # statistics and accumulators in at least fp32, as the kernel keeps them in fp32 registers
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    G = H // H_kv
    # head h = g·G + r reads K/V head g (as in attention.py); repeat them to line up with the queries
    k = k.to(acc_dtype).repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    v = v.to(acc_dtype).repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    o = torch.zeros(B, H, Tq, D, dtype=acc_dtype, device=q.device)
    lse = torch.full((B, H, Tq), float("-inf"), dtype=acc_dtype, device=q.device)
    for i0 in range(0, Tq, block_m):
        i1 = min(i0 + block_m, Tq)  # the last block may be ragged
        q_i = q[:, :, i0:i1].to(acc_dtype)  # (B, H, BM, D)
        m = torch.full((B, H, i1 - i0), float("-inf"), dtype=acc_dtype, device=q.device)  # running max
        l = torch.zeros_like(m)  # running Σ exp(s - m)
        acc = torch.zeros(B, H, i1 - i0, D, dtype=acc_dtype, device=q.device)  # running Σ exp(s - m)·v
        for j0 in range(0, Tk, block_n):
            if _skip(i1, j0, Tq, Tk, causal):
                break  # this and every later key block lie in the future of the whole query tile
            j1 = min(j0 + block_n, Tk)
            s = (q_i @ k[:, :, j0:j1].transpose(-2, -1)) * scale  # (B, H, BM, BN)
            mask = _visible(i0, i1, j0, j1, Tq, Tk, causal, kpm, q.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight
            m_new = torch.maximum(m, s.amax(dim=-1))  # (B, H, BM)
            # a row that has seen only masked keys so far has m_new = -inf; use 0 there so that
            # s - m_new is -inf - 0 = -inf (weight 0), not -inf - (-inf) = NaN
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_safe)  # exp(m - m'): rescales what was summed under the old max
            p = torch.exp(s - m_safe[..., None])  # (B, H, BM, BN), every entry ≤ 1
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v[:, :, j0:j1]  # (B, H, BM, D)
            m = m_new
        # a row that saw no key at all has ℓ = 0, acc = 0 and m = -inf: dividing by 1 instead gives
        # O = 0 and LSE = -inf + log 1 = -inf, as attention.py and the kernel return
        l_safe = torch.where(l > 0, l, torch.ones_like(l))
        o[:, :, i0:i1] = acc / l_safe[..., None]  # O = acc / ℓ
        lse[:, :, i0:i1] = m + torch.log(l_safe)  # LSE = m + log ℓ = log Σ_j exp(s_ij)
    return o.to(q.dtype), lse


def flash_attention_bwd(do, q, k, v, o, lse, causal=False, key_padding_mask=None, scale=None,
                        block_m=16, block_n=16):
    """Tiled backward from the saved O and LSE: returns dq, dk, dv shaped (and typed) like q, k, v."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = lse.dtype
    q_, do_ = q.to(acc_dtype), do.to(acc_dtype)
    k_ = k.to(acc_dtype).repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    v_ = v.to(acc_dtype).repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    # D_i = Σ_d dO_id·O_id = Σ_j P_ij dP_ij: the term the softmax's Jacobian subtracts from each row
    delta = (do_ * o.to(acc_dtype)).sum(dim=-1)  # (B, H, Tq)
    # rows that saw no key have LSE = -inf and P = 0 everywhere; 0 avoids -inf - (-inf) = NaN
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros_like(q_)  # (B, H, Tq, D), summed into by every key block
    dk = torch.zeros_like(k_)  # (B, H, Tk, D)
    dv = torch.zeros_like(v_)  # (B, H, Tk, D)
    for j0 in range(0, Tk, block_n):  # FlashAttention-2: key blocks outside, each owns its dK, dV
        j1 = min(j0 + block_n, Tk)
        k_j, v_j = k_[:, :, j0:j1], v_[:, :, j0:j1]  # (B, H, BN, D)
        for i0 in range(0, Tq, block_m):
            i1 = min(i0 + block_m, Tq)
            if _skip(i1, j0, Tq, Tk, causal):
                continue  # these queries cannot see this key block: no gradient flows between them
            q_i, do_i = q_[:, :, i0:i1], do_[:, :, i0:i1]  # (B, H, BM, D)
            s = (q_i @ k_j.transpose(-2, -1)) * scale  # (B, H, BM, BN)
            mask = _visible(i0, i1, j0, j1, Tq, Tk, causal, kpm, q.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse_safe[:, :, i0:i1, None])  # (B, H, BM, BN): the forward's softmax, recomputed
            dv[:, :, j0:j1] += p.transpose(-2, -1) @ do_i  # dV = Pᵀ dO
            dp = do_i @ v_j.transpose(-2, -1)  # (B, H, BM, BN): dP = dO Vᵀ
            ds = p * (dp - delta[:, :, i0:i1, None])  # dS = P ∘ (dP - D): the softmax backward
            dq[:, :, i0:i1] += (ds @ k_j) * scale  # dQ = dS K · scale
            dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ q_i) * scale  # dK = dSᵀ Q · scale
    # a K/V head serves G query heads: its gradient is the sum over them
    dk = dk.view(B, H_kv, G, Tk, D).sum(dim=2)  # (B, H_kv, Tk, D)
    dv = dv.view(B, H_kv, G, Tk, D).sum(dim=2)  # (B, H_kv, Tk, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd glue: forward saves q, k, v, O and LSE (not P); backward recomputes P from LSE."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, key_padding_mask=None, scale=None, block_m=16, block_n=16):
        o, lse = flash_attention_fwd(q, k, v, causal, key_padding_mask, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.key_padding_mask = key_padding_mask  # a boolean input: no gradient, so not saved as one
        ctx.args = (causal, scale, block_m, block_n)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, scale, block_m, block_n = ctx.args
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, causal, ctx.key_padding_mask, scale,
                                         block_m, block_n)
        return dq, dk, dv, None, None, None, None, None  # one per forward input


def flash_attention(q, k, v, causal=False, key_padding_mask=None, scale=None, block_m=16, block_n=16):
    """softmax(q kᵀ · scale + mask) v, tiled: q (B, H, Tq, D), k, v (B, H_kv, Tk, D) -> (B, H, Tq, D)."""
    return FlashAttentionFunction.apply(q, k, v, causal, key_padding_mask, scale, block_m, block_n)
