"""Grouped int8 (GGUF's Q8_0 layout), float32 scales in a low-precision model, and the CPU kernel
(minillm/compress/cpu_kernel.py) against the reference x @ dequantize(W)ᵀ computed in float64.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from minillm import ModelConfig, build_model
from minillm.compress.quant import (GROUP_SIZES, QuantEmbedding, QuantLinear, dequantize, dequantize_int8,
                                    quantize, quantize_int8, quantize_model)
from minillm.weights.checkpoint import load_model, save_model

SMALL = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=96)


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("tiny", **{**SMALL, **kw})).eval()


# --- int8 with one scale per group of G inputs --------------------------------------------------

@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_grouped_int8_is_symmetric_per_group(group_size):
    torch.manual_seed(0)
    N, K = 6, 2 * group_size
    w = torch.randn(N, K)
    w[0, :group_size] = 0  # an all-zero group gets scale 1 and codes 0
    q, s = quantize_int8(w, group_size=group_size)
    assert q.shape == (N, K) and s.shape == (N, K // group_size) and s.dtype == w.dtype
    assert s[0, 0] == 1 and (q[0, :group_size] == 0).all()
    wg = w.reshape(N, K // group_size, group_size)  # (N, K/G, G)
    torch.testing.assert_close(s[1:], wg.abs().amax(-1)[1:] / 127)
    assert q.abs().max() == 127
    w_hat = dequantize_int8(q, s)  # (N, K)
    assert ((w_hat - w).abs() <= s.repeat_interleave(group_size, dim=1) / 2 + 1e-7).all()
    # per-channel is the same code path with one group per row
    q1, s1 = quantize_int8(w)
    assert s1.shape == (N,) and torch.equal(dequantize("int8", q1, s1), dequantize_int8(q1, s1))


def test_grouped_int8_beats_per_channel_on_rows_with_outliers():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:, 3] *= 50  # one outlier input per row: a per-channel scale wastes its grid on it
    err = {g: (dequantize("int8", *quantize(w, "int8", g, int8_groups=True).values()) - w).abs().mean()
           for g in (None, 32)}
    assert err[32] < err[None] / 5


def test_int8_ignores_the_int4_group_size_unless_asked():
    w = torch.randn(8, 72)  # 72 is not a multiple of any group size: per channel must still work
    assert quantize(w, "int8", 32)["scales"].shape == (8,)
    assert QuantLinear.from_linear(torch.nn.Linear(72, 8), "int8", 32).scales.shape == (8,)
    assert QuantLinear(64, 8, False, "int8").scales.shape == (8,)
    assert QuantLinear(64, 8, False, "int8", group_size=32).scales.shape == (8, 2)  # the GGUF loader's way
    with pytest.raises(ValueError, match="not divisible"):
        QuantLinear.from_linear(torch.nn.Linear(72, 8), "int8", 32, int8_groups=True)


def test_grouped_int8_model_embedding_and_checkpoint_round_trip(tmp_path):
    model = quantize_model(tiny_model(), "int8", 32, include_head=True, include_embeddings=True, int8_groups=True)
    assert model.lm_head.scales.shape == (96, 2) and isinstance(model.transformer.tok_emb, QuantEmbedding)
    idx = torch.randint(0, 96, (2, 7))
    torch.testing.assert_close(model.transformer.tok_emb(idx), model.lm_head.dequantized_weight()[idx])
    save_model(tmp_path / "q", model)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"]["group_size"] == 32 and meta["quantization"]["int8_groups"] is True
    loaded = load_model(tmp_path / "q")[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_float32_scales_in_a_bfloat16_layer(scheme):
    """The GGUF-kept path stores scales (and zeros) in fp32 inside a bf16 model: the reference reads them
    in fp32, so the output equals the fp32 dequantization cast to bf16 once."""
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 24), scheme, 32).bfloat16()
    lin.scales = lin.scales.float() * 1.001  # fp32 values bf16 cannot hold
    if lin.zeros is not None:
        lin.zeros = lin.zeros.float() + 1e-4
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = dequantize(scheme, lin.weight_q, lin.scales, lin.zeros)  # fp32
    assert w.dtype == torch.float32
    torch.testing.assert_close(lin(x), F.linear(x, w.bfloat16(), lin.bias), rtol=0, atol=0)
