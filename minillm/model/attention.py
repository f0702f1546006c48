"""Scaled dot-product attention and multi-head attention, written out.

    Attention(Q, K, V) = softmax(Q Kᵀ / √D + mask) · V          ("Attention Is All You Need", §3.2)

Shapes use the field's letters: B batch, H heads, Tq query length, Tk key length, D head dim,
C = H·D model width. Queries and keys may have different lengths: when decoding with a KV cache the
Tq new queries sit at the *end* of the Tk keys, so the causal mask is aligned bottom-right — query i
may see key j iff j ≤ i + (Tk - Tq). With Tq = Tk this is the familiar lower triangle.

Masks are boolean with True = "may attend": `key_padding_mask` (B, Tk) marks real (non-pad) keys.
A sliding window W (Mistral's local attention) further limits query i to the W most recent keys:
i + (Tk - Tq) - W < j ≤ i + (Tk - Tq), itself included.

Grouped-query attention (GQA, Ainslie et al. 2023; multi-query attention, Shazeer 2019, is H_kv = 1):
k and v may have fewer heads H_kv than q's H, with H = G·H_kv. Query head h reads K/V head h // G,
the grouping Hugging Face's `repeat_kv` uses. Why bother: decoding is limited by reading the KV
cache, which holds, per token,

    bytes/token = 2 (k and v) · L layers · H_kv heads · D · bytes per number

e.g. Llama-3-8B (L=32, D=128, bf16): 512 KiB/token with H_kv = H = 32, 128 KiB with H_kv = 8, so
an 8k-token context costs 1 GiB instead of 4. The attention here never copies K/V G times: the G
query heads of a group are stacked into one (G·Tq, D) matrix that multiplies its K/V head once.

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
from minillm.model.layers import dropout


def causal_mask(Tq: int, Tk: int, device=None, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean, True where query i may see key j: j ≤ i + (Tk - Tq) (bottom-right aligned),
    and, with a sliding window W, also j > i + (Tk - Tq) - W (the W most recent keys, itself included)."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    mask = j <= i + (Tk - Tq)
    if window is not None:
        mask = mask & (j > i + (Tk - Tq) - window)
    return mask


def build_mask(Tq: int, Tk: int, causal: bool, key_padding_mask: torch.Tensor | None,
               device=None, window: int | None = None) -> torch.Tensor | None:
    """Combine the causal (and window) and key-padding masks into one boolean mask broadcastable to
    (B, H, Tq, Tk), or None when nothing is hidden.

    One query after Tk - 1 cached keys (a decode step) is the last position: the causal mask lets
    it see every key, so without a window or padding there is no mask to build (saving the
    arange/compare/masked_fill work that decoding would otherwise pay for every token)."""
    hides = causal and (Tq > 1 or (window is not None and Tk > window))
    mask = causal_mask(Tq, Tk, device, window) if hides else None  # (Tq, Tk)
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
    window: int | None = None,
):
    """softmax(q kᵀ · scale + mask) v for q: (B, H, Tq, D), k, v: (B, H_kv, Tk, D), H_kv dividing H.

    Returns the output (B, H, Tq, D) and, with `return_lse`, the log-sum-exp of each row of scores
    (B, H, Tq) — the one number per row a fused kernel saves to recompute the softmax in backward.
    A row with every key masked (a padding query) gets zeros (and lse = -inf), as PyTorch's SDPA
    and FlashAttention do, rather than NaN. `window` (needs causal): see the module docstring.
    """
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[-2]
    if H % H_kv != 0:
        raise ValueError(f"{H} query heads cannot be shared evenly by {H_kv} key/value heads")
    G = H // H_kv  # query heads per K/V head (1 = plain multi-head attention)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Group the query heads: head h = g·G + r reads K/V head g. Stack each group's G heads along
    # the query axis, so one (G·Tq, D) @ (D, Tk) matmul per K/V head serves the whole group: k and v
    # are read as they are, never copied (a broadcasting 5-D matmul would expand them G times).
    q = q.reshape(B, H_kv, G * Tq, D)  # (B, H_kv, G·Tq, D): a view when G = 1
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H_kv, G·Tq, Tk)
    scores = scores.view(B, H_kv, G, Tq, Tk)  # (B, H_kv, G, Tq, Tk): each query row back in place
    mask = build_mask(Tq, Tk, causal, key_padding_mask, q.device, window)  # (Tq, Tk) or (B, 1, Tq, Tk)
    if mask is not None:
        if mask.dim() == 4:
            mask = mask[:, :, None]  # (B, 1, 1, Tq, Tk): the same for every head of every group
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: masked keys get no weight
    # numerically stable softmax: subtract the row max before exp (softmax is shift-invariant)
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, H_kv, G, Tq, 1)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)  # all-masked row
    exp = torch.exp(scores - row_max)
    row_sum = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)  # (B, H_kv, G, Tq, Tk)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = probs.view(B, H_kv, G * Tq, Tk) @ v  # (B, H_kv, G·Tq, D)
    out = out.view(B, H, Tq, D)  # (B, H_kv, G, Tq, D) -> (B, H, Tq, D): heads in order g·G + r
    if return_lse:
        lse = (row_max + torch.log(row_sum)).squeeze(-1).flatten(1, 2)  # (B, H, Tq) = log Σ_j exp(s_ij)
        return out, lse
    return out


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, H·D) -> (B, H, T, D): each head gets its own D channels."""
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
    the model advances `length` after the last layer. It holds H_kv heads, not H: with grouped-query
    attention that is the whole saving (2·L·H_kv·D numbers per token, see the module docstring).

    The verbs every decode cache speaks (minillm/generate/cache.py; nanochat's KV cache has the same
    few): `update` (a layer appends its k, v) and `advance` (the model, after the last layer),
    `length`, `rewind(n)` (forget all but the first n tokens: speculative decoding, re-prefill),
    `reorder(index)` (rows follow an index: beam search) and `positions_and_mask(T)` (each row's
    positions for T new tokens). All rows share one length; rows of different lengths are LEFT
    padded (`pad_left`): pad columns are hidden as keys and each row counts positions from its
    first real token, so a padded row computes what it would alone.

    With a sliding window W < max_len, a query never looks further back than W-1 tokens, so only
    the last W-1 tokens are kept (plus `spare` more, so that `rewind` can go back that far): memory
    stays bounded however long the text grows. `update` then returns the kept tokens followed by
    the new ones — always consecutive positions ending at the newest query, which is all the
    bottom-right window mask needs. Keys are stored already rotated (RoPE at their absolute
    positions), so dropping old ones never changes the ones kept; `length` keeps counting absolute
    positions.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32, window: int | None = None, spare: int = 0):
        # a window whose kept tokens fill max_len anyway never drops one: the plain, copy-free cache
        keep = max_len if window is None else min(window - 1 + spare, max_len)
        self.window = window if keep < max_len else None
        shape = (n_layer, batch_size, n_kv_head, keep, head_dim)
        # empty, not zeros: every column is written before it is read (update returns only the
        # columns < length + T), and zeroing SmolLM2's 2048-token cache (94 MB) cost ~5% of a
        # 512-token prefill on our 2-core CPU; untouched pages are never even mapped
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens already seen (the same for every row; left padding handles ragged prompts)
        self.held = 0  # with a window: how many of the last tokens k, v hold (oldest first)
        self.pad: torch.Tensor | None = None  # (B,) left-pad columns of each row, None = no padding
        self._neg_pad: torch.Tensor | None = None  # -pad: `-pad + n` is one C call, `n - pad` a few Python ones
        self._real: torch.Tensor | None = None  # (B, n) column c of row b is a real token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) after the cached tokens; return the (B, H_kv, Tk, D) k, v to attend
        over: all length+T tokens, or with a window the `held` kept ones + the T new."""
        T = k.shape[-2]
        if self.window is not None:
            return self._update_window(layer, k, v)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} cached + {T} new > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _update_window(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T, keep, n = k.shape[-2], self.k.shape[3], self.held  # keep = W - 1 (+ spare)
        k_all = torch.cat([self.k[layer, :, :, :n], k], dim=2)  # (B, H_kv, n + T, D), oldest first
        v_all = torch.cat([self.v[layer, :, :, :n], v], dim=2)
        m = min(n + T, keep)  # how many of them the cache keeps for the next queries
        self.k[layer, :, :, :m] = k_all[:, :, n + T - m:]  # crop: slide the window forward
        self.v[layer, :, :, :m] = v_all[:, :, n + T - m:]
        return k_all, v_all

    def advance(self, T: int) -> None:
        self.length += T
        if self.window is not None:
            self.held = min(self.held + T, self.k.shape[3])

    def rewind(self, length: int) -> None:
        """Forget every token after the first `length` (0 empties the cache, its padding too).

        The kept keys stay as they are: only the count moves back. A sliding-window cache that has
        already dropped keys the next query would need cannot go back: ValueError (build it with
        `spare` = the furthest rewind you need)."""
        back = self.length - length
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens to {length}")
        if self.window is not None and length > 0 and self.held - back < min(length, self.window - 1):
            raise ValueError(f"cannot rewind this sliding-window cache by {back} tokens: it keeps only "
                             f"the last {self.k.shape[3]}, and the keys needed were dropped (make it "
                             f"with spare>={back})")
        self.length = length
        self.held = max(self.held - back, 0) if length > 0 else 0
        if length == 0:
            self.pad = self._neg_pad = self._real = None

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search keeps the survivors' caches this way)."""
        self.k, self.v = self.k[:, index], self.v[:, index]  # (L, B', H_kv, keep, D)
        if self.pad is not None:
            self.pad, self._neg_pad, self._real = self.pad[index], self._neg_pad[index], self._real[index]

    def pad_left(self, key_padding_mask: torch.Tensor) -> None:
        """Before a prefill into the empty cache: key_padding_mask (B, T), True = real token, False
        = a row's left padding. From then on the cache hides the pad columns and numbers each row
        from its first real token (`positions_and_mask`)."""
        if self.length != 0:
            raise ValueError("pad_left describes a prompt's columns: call it on an empty cache")
        mask = key_padding_mask.bool()
        self.pad = (~mask).sum(dim=1)  # (B,) left-pad columns of each row
        self._neg_pad = -self.pad
        self._real = self._widen(mask, mask.shape[1] + self.max_len)  # (B, T + max_len)

    @staticmethod
    def _widen(real: torch.Tensor, n: int) -> torch.Tensor:
        """real (B, t) -> (B, n): every column after the prompt is a real token."""
        return torch.cat([real, real.new_ones(real.shape[0], n - real.shape[1])], dim=1)

    def positions_and_mask(self, T: int):
        """(positions, key_padding_mask) for T new tokens per row: positions (B, T) and the mask
        (B, length + T) of real keys for padded rows; (None, None) without padding, where the model
        counts positions from `length` itself and no key is hidden."""
        if self.pad is None:
            return None, None
        if self.length + T > self._real.shape[1]:  # (a sliding-window cache may run past max_len)
            self._real = self._widen(self._real, 2 * (self.length + T))
        if T == 1:  # a decode step: the cheap case, one subtraction
            return (self._neg_pad + self.length)[:, None], self._real[:, :self.length + 1]  # (B, 1), (B, Tk)
        cols = torch.arange(self.length, self.length + T, device=self.pad.device)  # (T,)
        return (cols - self.pad[:, None]).clamp_min(0), self._real[:, :self.length + T]  # pads: position 0


def _sdpa_supports_gqa() -> bool:
    """F.scaled_dot_product_attention takes enable_gqa (H_kv < H without copies) from PyTorch 2.5."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


SDPA_GQA = _sdpa_supports_gqa()


def attention_dispatch(impl: str, q, k, v, causal: bool, key_padding_mask, dropout_p: float,
                       window: int | None = None):
    """Run the chosen implementation on q (B, H, Tq, D), k, v (B, H_kv, Tk, D). Each computes the
    same function; tests hold them equal."""
    if impl == "naive":
        return scaled_dot_product_attention(q, k, v, causal, key_padding_mask, dropout_p=dropout_p,
                                            window=window)
    if impl == "sdpa":
        Tq, Tk = q.shape[-2], k.shape[-2]
        gqa = {}
        if k.shape[1] != q.shape[1]:
            if SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:  # older PyTorch: copy each K/V head G times (what enable_gqa avoids)
                G = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, Tk, D)
        if key_padding_mask is None and window is None and (not causal or Tq == Tk or Tq == 1):
            # Tq == Tk: SDPA's own causal mask; Tq == 1: a decode step sees every key, no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                  is_causal=causal and Tq > 1 and Tq == Tk, **gqa)
        # SDPA's is_causal is top-left aligned and has no window, so pass our mask explicitly
        mask = build_mask(Tq, Tk, causal, key_padding_mask, q.device, window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
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
        # k, v keep their H_kv heads: the kernel maps query head h to K/V head h // (H / H_kv)
        return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, window=window)
    raise ValueError(f"unknown attention implementation {impl!r}")


class MultiHeadAttention(nn.Module):
    """x (B, T, C) -> attend over itself (and any cached prefix) with H query heads and H_kv
    key/value heads -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.q_dim = cfg.attn_dim  # H·D channels of queries (= C unless heads were pruned)
        self.kv_dim = cfg.kv_heads * cfg.head_dim  # H_kv·D channels each for k and v (= H·D without GQA)
        # q, k, v in one matmul: H·D + 2·H_kv·D outputs (3C for classic multi-head attention)
        self.qkv = nn.Linear(cfg.n_embd, self.q_dim + 2 * self.kv_dim, bias=cfg.qkv_has_bias)
        self.proj = nn.Linear(self.q_dim, cfg.n_embd, bias=cfg.bias)  # mixes the heads back
        self.proj.is_residual_proj = True  # scaled at init, see model.init_weights
        self.rotary = rotary  # shared RoPE tables (or None)
        self.resid_drop = nn.Dropout(cfg.rate("resid"))

    def forward(self, x, positions, key_padding_mask=None, cache: KVCache | None = None, layer: int = 0):
        # the qkv output is H query heads, then H_kv key and H_kv value heads, D channels each:
        # split_heads of all of them at once, then cut along the head axis (views, no copies)
        heads = split_heads(self.qkv(x), self.n_head + 2 * self.n_kv_head)  # (B, H + 2·H_kv, T, D)
        q, k, v = heads.split_with_sizes([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, Tk, D) with Tk = cached + T
            if key_padding_mask is not None and key_padding_mask.shape[-1] > k.shape[-2]:
                # a sliding-window cache returns only the last Tk tokens: keep their columns
                key_padding_mask = key_padding_mask[:, -k.shape[-2]:]  # (B, Tk)
        dropout_p = self.cfg.rate("attn") if self.training else 0.0
        y = attention_dispatch(self.cfg.attention, q, k, v, self.cfg.causal, key_padding_mask, dropout_p,
                               self.cfg.sliding_window)
        return dropout(self.resid_drop, self.proj(merge_heads(y)))  # (B, T, C)
