"""The readable attention equals torch's fused one, with every kind of mask."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.model.attention import attention_dispatch, merge_heads, scaled_dot_product_attention, split_heads


def qkv(B=2, H=3, Tq=9, Tk=9, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, D, generator=g), torch.randn(B, H, Tk, D, generator=g),
            torch.randn(B, H, Tk, D, generator=g))


def bottom_right(Tq, Tk):
    # written independently of minillm: the lower triangle shifted right by Tk - Tq
    return torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)


@pytest.mark.parametrize("causal", [False, True])
def test_square_matches_torch(causal):
    q, k, v = qkv()
    assert_close(scaled_dot_product_attention(q, k, v, causal=causal),
                 F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("Tq,Tk", [(1, 12), (5, 12), (12, 12)])
def test_causal_with_cache_is_bottom_right(Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right(Tq, Tk))
    assert_close(scaled_dot_product_attention(q, k, v, causal=True), ref)
    # the last query sees every key, so decoding one token attends over the whole cache
    full = F.scaled_dot_product_attention(q[:, :, -1:], k, v)
    assert_close(scaled_dot_product_attention(q, k, v, causal=True)[:, :, -1:], full)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal):
    q, k, v = qkv(B=2, Tq=7, Tk=7)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, :3] = False  # row 1 is left-padded by 3
    mask = kpm[:, None, None, :]
    if causal:
        mask = mask & bottom_right(7, 7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = scaled_dot_product_attention(q, k, v, causal=causal, key_padding_mask=kpm)
    visible = mask.any(-1).expand(2, 3, 7)  # rows with at least one key (others are padding queries)
    assert_close(out[visible], ref[visible])
    assert (out[~visible] == 0).all()  # a query that sees no key outputs zeros, not NaN


def test_scale_and_lse():
    q, k, v = qkv(Tq=6, Tk=10)
    out, lse = scaled_dot_product_attention(q, k, v, scale=0.3, return_lse=True)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * 0.3, dim=-1))


def test_lse_is_stable_for_huge_scores():
    q, k, v = qkv(Tq=4, Tk=4)
    out, lse = scaled_dot_product_attention(q * 1000, k, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(lse, torch.logsumexp(q * 1000 @ k.transpose(-2, -1) / math.sqrt(16), dim=-1))


def test_split_merge_heads_round_trip():
    x = torch.randn(2, 5, 24)
    h = split_heads(x, 4)
    assert h.shape == (2, 4, 5, 6)
    assert torch.equal(h[:, 1, :, :], x[:, :, 6:12])  # head 1 owns channels 6..11
    assert torch.equal(merge_heads(h), x)


@pytest.mark.parametrize("Tq,Tk", [(8, 8), (3, 8), (1, 8)])
def test_sdpa_dispatch_equals_naive(Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    kpm = torch.ones(2, Tk, dtype=torch.bool)
    kpm[0, :2] = False
    for mask in (None, kpm):
        naive = attention_dispatch("naive", q, k, v, True, mask, 0.0)
        sdpa = attention_dispatch("sdpa", q, k, v, True, mask, 0.0)
        assert_close(naive, sdpa)
