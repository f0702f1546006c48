"""Scaled dot-product attention and multi-head attention, written out.

    Attention(Q, K, V) = softmax(Q Kᵀ / √D + mask) · V          ("Attention Is All You Need", §3.2)

Shapes use the field's letters: B batch, H heads, Tq query length, Tk key length, D head dim,
C = H·D model width. Queries and keys may have different lengths: when decoding with a KV cache the
Tq new queries sit at the *end* of the Tk keys, so the causal mask is aligned bottom-right — query i
may see key j iff j ≤ i + (Tk - Tq). With Tq = Tk this is the familiar lower triangle.

Masks are boolean with True = "may attend": `key_padding_mask` (B, Tk) marks real (non-pad) keys.

`MultiHeadAttention` projects x to q, k, v, splits heads, optionally rotates q/k (RoPE), appends
to a KV cache, and calls one of three implementations, chosen explicitly by `ModelConfig.attention`:
    "naive"  — `scaled_dot_product_attention` below, the one a student reads (the reference);
    "sdpa"   — PyTorch's fused F.scaled_dot_product_attention;
    "triton" — minillm's FlashAttention-2 kernel (kernels/attention.py, needs `pip install .[kernels]`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model.config import ModelConfig


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) boolean, True where query i may see key j: j ≤ i + (Tk - Tq) (bottom-right aligned)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def build_mask(Tq: int, Tk: int, causal: bool, key_padding_mask: torch.Tensor | None,
               device=None) -> torch.Tensor | None:
    """Combine the causal and key-padding masks into one boolean mask broadcastable to (B, H, Tq, Tk)."""
    mask = causal_mask(Tq, Tk, device) if causal else None  # (Tq, Tk)
    if key_padding_mask is not None:
        pad = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        mask = pad if mask is None else mask & pad  # (B, 1, Tq, Tk)
    return mask


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """softmax(q kᵀ · scale + mask) v for q: (B, H, Tq, D), k, v: (B, H, Tk, D).

    Returns the output (B, H, Tq, D) and, with `return_lse`, the log-sum-exp of each row of scores
    (B, H, Tq) — the one number per row a fused kernel saves to recompute the softmax in backward.
    A row with every key masked (a padding query) gets zeros (and lse = -inf), as PyTorch's SDPA
    and FlashAttention do, rather than NaN.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    mask = build_mask(Tq, Tk, causal, key_padding_mask, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: masked keys get no weight
    # numerically stable softmax: subtract the row max before exp (softmax is shift-invariant)
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, H, Tq, 1)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)  # all-masked row
    exp = torch.exp(scores - row_max)
    row_sum = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)  # (B, H, Tq, Tk)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = probs @ v  # (B, H, Tq, D)
    if return_lse:
        lse = (row_max + torch.log(row_sum)).squeeze(-1)  # (B, H, Tq) = log Σ_j exp(score_ij)
        return out, lse
    return out


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, D): each head gets its own D = C/H channels."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, C): concatenate the heads back along channels."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`.

    Decoding token t+1 needs k, v of tokens 0..t; recomputing them each step costs O(T²) per token.
    The cache stores them once: each layer appends its new k, v, attends over the whole prefix, and
    the model advances `length` after the last layer.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens already stored (the same for every row; left padding handles ragged prompts)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) after the cached tokens; return the full (B, H, length+T, D) k, v."""
        T = k.shape[-2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} cached + {T} new > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.length += T


def attention_dispatch(impl: str, q, k, v, causal: bool, key_padding_mask, dropout_p: float):
    """Run the chosen implementation. Each computes the same function; tests hold them equal."""
    if impl == "naive":
        return scaled_dot_product_attention(q, k, v, causal, key_padding_mask, dropout_p=dropout_p)
    if impl == "sdpa":
        Tq, Tk = q.shape[-2], k.shape[-2]
        if key_padding_mask is None and (not causal or Tq == Tk):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and Tq > 1)
        # SDPA's is_causal is top-left aligned, so pass our bottom-right mask explicitly
        mask = build_mask(Tq, Tk, causal, key_padding_mask, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl == "triton":
        if dropout_p > 0.0:
            raise ValueError("attention='triton' has no attention dropout; set attn_dropout=0 or use 'sdpa'")
        try:
            from minillm.kernels.attention import flash_attention
        except ImportError as e:
            raise ImportError(
                "attention='triton' needs Triton: pip install 'minillm[kernels]' "
                f"(or choose attention='naive' or 'sdpa'). Import failed with: {e}"
            ) from e
        return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    raise ValueError(f"unknown attention implementation {impl!r}")


class MultiHeadAttention(nn.Module):
    """x (B, T, C) -> attend over itself (and any cached prefix) with H heads -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # mixes the heads back
        self.proj.is_residual_proj = True  # scaled at init, see model.init_weights
        self.rotary = rotary  # shared RoPE tables (or None)
        self.resid_drop = nn.Dropout(cfg.rate("resid"))

    def forward(self, x, positions, key_padding_mask=None, cache: KVCache | None = None, layer: int = 0):
        q, k, v = self.qkv(x).split(self.cfg.n_embd, dim=-1)  # 3 × (B, T, C)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # 3 × (B, H, T, D)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, Tk, D) with Tk = cached + T
        dropout_p = self.cfg.rate("attn") if self.training else 0.0
        y = attention_dispatch(self.cfg.attention, q, k, v, self.cfg.causal, key_padding_mask, dropout_p)
        return self.resid_drop(self.proj(merge_heads(y)))  # (B, T, C)
