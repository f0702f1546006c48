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


# --- grouped-query attention and sliding windows ----------------------------------------------------

def gqa_qkv(B=2, H=6, H_kv=2, Tq=9, Tk=9, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, D, generator=g), torch.randn(B, H_kv, Tk, D, generator=g),
            torch.randn(B, H_kv, Tk, D, generator=g))


def window_mask(Tq, Tk, window):
    # written independently of minillm: bottom-right causal, minus everything `window` or more back
    return bottom_right(Tq, Tk) & ~torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq - window)


@pytest.mark.parametrize("H_kv", [1, 2, 3, 6])  # multi-query, grouped, grouped, classic multi-head
@pytest.mark.parametrize("causal,Tq,Tk", [(False, 9, 9), (True, 9, 9), (True, 4, 11), (True, 1, 11)])
def test_gqa_equals_repeated_kv(H_kv, causal, Tq, Tk):
    q, k, v = gqa_qkv(H_kv=H_kv, Tq=Tq, Tk=Tk)
    kpm = torch.ones(2, Tk, dtype=torch.bool)
    kpm[1, :2] = False
    G = 6 // H_kv
    # the reference copies each K/V head G times (Hugging Face's repeat_kv), then runs torch's SDPA
    k_rep, v_rep = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    mask = kpm[:, None, None, :] & (bottom_right(Tq, Tk) if causal else True)
    ref = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)
    out, lse = scaled_dot_product_attention(q, k, v, causal=causal, key_padding_mask=kpm, return_lse=True)
    assert_close(out, ref)
    scores = (q @ k_rep.transpose(-2, -1) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    assert_close(lse, torch.logsumexp(scores, dim=-1))


def test_gqa_gradients_reach_the_shared_heads():
    q, k, v = (t.requires_grad_() for t in gqa_qkv(H_kv=2))
    scaled_dot_product_attention(q, k, v, causal=True).square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q2, k2.repeat_interleave(3, 1), v2.repeat_interleave(3, 1),
                                   is_causal=True).square().sum().backward()
    for ours, ref in ((q, q2), (k, k2), (v, v2)):  # a shared head's gradient sums over its group
        assert_close(ours.grad, ref.grad)


def test_uneven_groups_are_refused():
    q, k, v = gqa_qkv(H=6, H_kv=4)
    with pytest.raises(ValueError, match="6 query heads cannot be shared evenly by 4"):
        scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("Tq,Tk", [(12, 12), (5, 12), (1, 12)])
def test_sliding_window_is_the_causal_mask_cut_to_the_window(window, Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(Tq, Tk, window))
    assert_close(scaled_dot_product_attention(q, k, v, causal=True, window=window), ref)
    # query i sees keys j with i - window < j <= i: exactly `window` keys once far enough in
    seen = window_mask(Tq, Tk, window).sum(-1)
    assert seen[-1] == min(window, Tk)


def test_a_window_as_long_as_the_keys_changes_nothing():
    q, k, v = qkv(Tq=6, Tk=10)
    assert_close(scaled_dot_product_attention(q, k, v, causal=True, window=10),
                 scaled_dot_product_attention(q, k, v, causal=True))


@pytest.mark.parametrize("Tq,Tk", [(8, 8), (3, 8), (1, 8)])
@pytest.mark.parametrize("H_kv,window", [(3, None), (1, None), (1, 3), (3, 4)])
def test_sdpa_dispatch_equals_naive_with_gqa_and_window(Tq, Tk, H_kv, window):
    q, k, v = gqa_qkv(H=3, H_kv=H_kv, Tq=Tq, Tk=Tk)
    kpm = torch.ones(2, Tk, dtype=torch.bool)
    kpm[0, :2] = False
    for mask in (None, kpm):
        naive = attention_dispatch("naive", q, k, v, True, mask, 0.0, window)
        sdpa = attention_dispatch("sdpa", q, k, v, True, mask, 0.0, window)
        assert_close(naive, sdpa)


def test_sdpa_without_enable_gqa_falls_back_to_copies(monkeypatch):
    import minillm.model.attention as attention
    q, k, v = gqa_qkv(H=6, H_kv=2, Tq=3, Tk=8)
    monkeypatch.setattr(attention, "SDPA_GQA", False)  # as on PyTorch < 2.5
    assert_close(attention_dispatch("sdpa", q, k, v, True, None, 0.0, 4),
                 attention_dispatch("naive", q, k, v, True, None, 0.0, 4))
