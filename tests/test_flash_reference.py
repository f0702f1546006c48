"""The tiled FlashAttention-2 in PyTorch (minillm/model/flash.py) equals the readable attention.

Output, log-sum-exp and every gradient are compared in fp32 with the function a student reads,
minillm.model.attention.scaled_dot_product_attention, over power-of-two and ragged lengths (so the
last tile is partial), Tq ≠ Tk with bottom-right causal alignment, key padding, rows that see no key,
and grouped-query heads. A float64 gradcheck shows the hand-written backward is the forward's derivative.
"""

import pytest
import torch
from torch.testing import assert_close

from minillm.model.attention import scaled_dot_product_attention
from minillm.model.flash import flash_attention, flash_attention_fwd

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: only the order of the float sums differs


def qkv(B, H, H_kv, Tq, Tk, D, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=gen, dtype=dtype)  # (B, H, Tq, D)
    k = torch.randn(B, H_kv, Tk, D, generator=gen, dtype=dtype)  # (B, H_kv, Tk, D)
    v = torch.randn(B, H_kv, Tk, D, generator=gen, dtype=dtype)  # (B, H_kv, Tk, D)
    return q, k, v


def compare(q, k, v, causal=False, key_padding_mask=None, block_m=16, block_n=16):
    """Forward, LSE and the three gradients of flash_attention against the readable attention."""
    q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attention(q1, k1, v1, causal, key_padding_mask, None, block_m, block_n)
    ref, ref_lse = scaled_dot_product_attention(q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask,
                                                return_lse=True)
    assert_close(out, ref, **TOL)
    _, lse = flash_attention_fwd(q, k, v, causal, key_padding_mask, None, block_m, block_n)
    assert_close(lse, ref_lse, **TOL)  # -inf where the reference has -inf
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # (B, H, Tq, D)
    out.backward(do)
    ref.backward(do)
    for name, a, b in (("dq", q1, q2), ("dk", k1, k2), ("dv", v1, v2)):
        assert torch.isfinite(a.grad).all(), name
        assert_close(a.grad, b.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    return out


@pytest.mark.parametrize("T", [1, 16, 17, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_any_length(T, causal):
    compare(*qkv(2, 3, 3, T, T, 8), causal=causal)


@pytest.mark.parametrize("Tq,Tk", [(5, 17), (1, 100), (17, 5), (33, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_tq_differs_from_tk(Tq, Tk, causal):
    """Causal with Tq ≠ Tk: query i sees keys j ≤ i + Tk - Tq (the KV-cache case when Tq < Tk);
    with Tq > Tk the first Tq - Tk queries see no key and output zeros."""
    out = compare(*qkv(1, 2, 2, Tq, Tk, 16, seed=2), causal=causal)
    if causal and Tq > Tk:
        assert torch.all(out[:, :, : Tq - Tk] == 0)


def test_block_sizes_do_not_change_the_answer():
    q, k, v = qkv(1, 2, 2, 37, 29, 8, seed=3)
    for bm, bn in ((1, 1), (8, 32), (64, 64), (5, 7)):
        compare(q, k, v, causal=True, block_m=bm, block_n=bn)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal):
    """Batch 0 has 6 padding keys at the end; batch 1 none. Padding keys get no weight, no gradient."""
    q, k, v = qkv(2, 2, 2, 20, 20, 8, seed=4)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, 14:] = False
    compare(q, k, v, causal=causal, key_padding_mask=kpm)
    k1 = k.clone().requires_grad_()
    flash_attention(q, k1, v, causal, kpm).sum().backward()
    assert torch.all(k1.grad[0, :, 14:] == 0) and torch.any(k1.grad[1, :, 14:] != 0)


def test_rows_with_no_visible_key_output_zeros_without_nan():
    """A batch whose keys are all padding: zeros out, LSE -inf, finite (zero) gradients, like the reference."""
    q, k, v = qkv(2, 1, 1, 9, 9, 4, seed=5)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1] = False
    out = compare(q, k, v, key_padding_mask=kpm, block_m=4, block_n=4)
    assert torch.all(out[1] == 0)


def test_grouped_query_heads():
    """4 query heads share 2 K/V heads: dK, dV sum over the heads of a group."""
    compare(*qkv(2, 4, 2, 19, 19, 8, seed=6), causal=True)


def test_scores_scaled_1000x_stay_finite():
    """The online softmax subtracts the running max, so huge scores do not overflow exp()."""
    q, k, v = qkv(1, 2, 2, 17, 17, 8, seed=7)
    out = flash_attention(q * 1000, k, v, causal=True)
    ref = scaled_dot_product_attention(q * 1000, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert_close(out, ref, **TOL)


def test_backward_is_the_derivative_of_the_forward():
    """Finite differences in float64, independent of any reference implementation."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 6, 7, 4, seed=8, dtype=torch.float64))
    kpm = torch.tensor([[True, True, True, True, True, True, False]])
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, True, kpm, None, 4, 3), (q, k, v))
