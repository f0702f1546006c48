"""Positional encodings: the sinusoid formula, and RoPE against the complex-number form."""

import math

import torch
from torch.testing import assert_close

from minillm.model.config import ModelConfig
from minillm.model.positional import Rotary, sinusoidal_table


def test_sinusoid_formula():
    table = sinusoidal_table(50, 16)
    pos, i = 13, 3
    assert math.isclose(table[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / 16)), rel_tol=1e-5)
    assert math.isclose(table[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / 16)), rel_tol=1e-5)


def test_sinusoid_offset_is_a_rotation():
    # PE[p + k] = R_k · PE[p] for a block-diagonal rotation R_k that does not depend on p
    table, k, dim = sinusoidal_table(64, 8), 5, 8
    freqs = 10000 ** (-torch.arange(0, dim, 2) / dim)
    for p in (0, 7, 30):
        sin, cos = table[p, 0::2], table[p, 1::2]
        a = k * freqs
        assert_close(table[p + k, 0::2], sin * torch.cos(a) + cos * torch.sin(a), atol=1e-5, rtol=1e-5)
        assert_close(table[p + k, 1::2], cos * torch.cos(a) - sin * torch.sin(a), atol=1e-5, rtol=1e-5)


def test_rope_matches_complex_multiplication():
    cfg = ModelConfig(n_embd=32, n_head=2, block_size=20, positional="rotary")
    rope = Rotary(cfg)
    x = torch.randn(2, 2, 20, 16)
    pos = torch.arange(20)
    # Llama's reference form: pairs (x0, x1) as complex numbers times e^{i·pos·θ}
    theta = 10000.0 ** (-torch.arange(0, 16, 2).float() / 16)
    rot = torch.polar(torch.ones(20, 8), pos[:, None].float() * theta)  # (T, D/2)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    assert_close(rope(x, pos), ref)


def test_rope_scores_depend_on_relative_offset():
    cfg = ModelConfig(n_embd=16, n_head=1, block_size=64, positional="rotary")
    rope = Rotary(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()

    assert_close(score(10, 4), score(40, 34))
    assert not torch.allclose(score(10, 4), score(10, 5))


def test_rope_per_row_positions():
    cfg = ModelConfig(n_embd=16, n_head=2, block_size=32, positional="rotary")
    rope = Rotary(cfg)
    x = torch.randn(2, 2, 4, 8)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = rope(x, pos)
    assert_close(out[1:], rope(x[1:], torch.arange(5, 9)))
    assert_close(out[:1], rope(x[:1], torch.arange(4)))
