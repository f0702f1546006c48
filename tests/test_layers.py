"""Each written-out layer equals its PyTorch built-in twin in fp32."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.model.config import ModelConfig
from minillm.model.layers import FeedForward, LayerNorm, RMSNorm, gelu, gelu_tanh, relu, silu


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(eps, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 48) * 5 + 2
    ours, ref = LayerNorm(48, eps=eps, bias=bias), nn.LayerNorm(48, eps=eps, bias=bias)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.normal_()
            ref.bias.copy_(ours.bias)
    assert_close(ours(x), ref(x))


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) * 3
    ours = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
    assert_close(ours(x), F.rms_norm(x, (32,), ours.weight, eps=1e-6))


def test_activations_match_torch():
    x = torch.linspace(-8, 8, 1001)
    assert_close(relu(x), F.relu(x))
    assert_close(gelu(x), F.gelu(x))
    assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert_close(silu(x), F.silu(x))


def test_swiglu_ffn_is_gated():
    torch.manual_seed(0)
    cfg = ModelConfig(n_embd=64, n_head=4, activation="swiglu", bias=False)
    ffn = FeedForward(cfg)
    x = torch.randn(2, 3, 64)
    expected = ffn.down(F.silu(ffn.gate(x)) * ffn.up(x))
    assert_close(ffn(x), expected)
    assert ffn.up.weight.shape == (cfg.ffn_dim, 64) and cfg.ffn_dim % 64 == 0


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "swiglu"])
def test_an_ffn_swaps_its_activation_for_the_fused_twin_and_computes_the_same(activation):
    from minillm.model.layers import FUSED_ACTIVATIONS, make_ffn

    torch.manual_seed(0)
    ffn = make_ffn(ModelConfig(n_embd=32, n_head=4, activation=activation))
    x = torch.randn(2, 5, 32)
    readable, weights = ffn(x), {k: v.clone() for k, v in ffn.state_dict().items()}
    written_out = ffn.act
    ffn.use_fused_activation()
    assert ffn.act is FUSED_ACTIVATIONS[written_out] and ffn.act.__module__ != "minillm.model.layers"
    ffn.use_fused_activation()  # a second swap changes nothing
    assert ffn.act is FUSED_ACTIVATIONS[written_out]
    assert all(torch.equal(weights[k], v) for k, v in ffn.state_dict().items())
    assert_close(ffn(x), readable)
    for fn, fused in FUSED_ACTIVATIONS.items():  # each twin is the same function
        z = torch.linspace(-8, 8, 1001)
        assert_close(fused(z), fn(z))
