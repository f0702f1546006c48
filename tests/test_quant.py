"""The quantization reference (minillm/compress/quant.py), quantized checkpoints and `minillm quantize`.

The kernels are tested against this reference in tests/test_kernels_quant.py.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from minillm import ModelConfig, build_model
from minillm.weights.checkpoint import load_model, save_model
from minillm.compress.quant import (GROUP_SIZES, QuantEmbedding, QuantLinear, dequantize_int4, dequantize_int8,
                                    pack_int4, quantize_int4, quantize_int8, quantize_model, set_backend,
                                    unpack_int4, weight_bytes)

SMALL = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=96)


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("tiny", **{**SMALL, **kw})).eval()


# --- packing --------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_pack_unpack_is_exact_for_every_code(group_size):
    N, K = 16, 2 * group_size
    n, k = torch.arange(N)[:, None], torch.arange(K)[None, :]
    q = ((n + k * 7) % 16).to(torch.uint8)  # every code 0..15 in every row, at even and odd k
    assert set(q[:, 0::2].unique().tolist()) == set(q[:, 1::2].unique().tolist()) == set(range(16))
    packed = pack_int4(q)
    assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


def test_pack_layout_is_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0], [0, 15, 7, 8]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x0F], [0xF0, 0x87]]


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_grid_points_round_trip_exactly(group_size):
    # a group whose values are exactly lo + c·s for every code c: quantization must be lossless
    torch.manual_seed(group_size)
    N, K = 4, 2 * group_size
    codes = torch.randint(0, 16, (N, K))
    codes[:, ::group_size] = 0  # every group spans the full grid, so s = (hi - lo)/15 is exact
    codes[:, 1::group_size] = 15
    lo, s = -0.75, 0.125  # binary fractions: no rounding anywhere
    w = lo + s * codes.float()
    packed, scales, zeros = quantize_int4(w, group_size)
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))
    assert torch.equal(dequantize_int4(packed, scales, zeros), w)


# --- round-trip error bounds ------------------------------------------------------------------

def test_int8_error_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.rand(48, 1) * 3  # rows of different ranges
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1) == 127).all()  # each row's max uses the grid's end
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_error_within_half_a_step(group_size):
    torch.manual_seed(1)
    N, K = 24, 2 * group_size
    w = torch.randn(N, K) + torch.rand(N, 1) * 4  # groups that do not straddle 0 too
    packed, scales, zeros = quantize_int4(w, group_size)
    assert scales.shape == zeros.shape == (N, K // group_size)
    err = (dequantize_int4(packed, scales, zeros) - w).abs().reshape(N, K // group_size, group_size)
    assert (err <= scales[..., None] / 2 * (1 + 1e-5) + 1e-6).all()


def test_constant_and_zero_rows_are_exact():
    w = torch.zeros(3, 64)
    w[1] = 0.37
    w[2, :32] = -2.0
    for q in (dequantize_int8(*quantize_int8(w)), dequantize_int4(*quantize_int4(w, 32))):
        torch.testing.assert_close(q, w, rtol=0, atol=1e-6)


def test_scales_follow_the_weight_dtype():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    _, s, z = quantize_int4(w, 32)
    assert s.dtype == z.dtype == torch.bfloat16
    assert quantize_int8(w)[1].dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[3, 16]]))
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(torch.ones(4, 4, dtype=torch.int32))


# --- modules --------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quant_linear_matches_dequantized_linear(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    ql = QuantLinear.from_linear(lin, scheme, group_size=32)
    assert ql.backend == "reference"  # CPU weights: the reference, chosen explicitly at construction
    x = torch.randn(2, 5, 64)  # (B, T, C)
    torch.testing.assert_close(ql(x), F.linear(x, ql.dequantized_weight(), lin.bias))
    # and close to the float layer: |y - y_float| ≤ Σ_k |x_k|·s_k/2, s_k the scale weight k used
    s = ql.scales[:, None] if scheme == "int8" else ql.scales.repeat_interleave(32, dim=1)  # (N, 1 or K)
    bound = x.abs() @ (s.expand(40, 64) / 2).T
    with torch.no_grad():
        assert ((ql(x) - lin(x)).abs() <= bound * (1 + 1e-4) + 1e-5).all()


def test_set_backend_validates():
    ql = QuantLinear.from_linear(torch.nn.Linear(32, 8), "int8")
    with pytest.raises(ValueError, match="unknown backend"):
        ql.set_backend("cuda")


def test_quantize_model_swaps_linears_but_not_head_by_default():
    model = tiny_model()
    fp = copy.deepcopy(model)
    quantize_model(model, "int4", group_size=32)
    blocks = model.transformer.blocks
    for lin in (blocks[0].attn.qkv, blocks[0].attn.proj, blocks[1].ffn.up, blocks[1].ffn.down):
        assert isinstance(lin, QuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.transformer.tok_emb.weight
    assert weight_bytes(model) < weight_bytes(fp) / 2
    idx = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref, out = fp(idx)[0], model(idx)[0]
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")


def test_tied_head_and_embedding_are_quantized_together_or_not_at_all():
    with pytest.raises(ValueError, match="share one matrix"):
        quantize_model(tiny_model(), "int8", include_head=True)
    model = quantize_model(tiny_model(), "int8", include_head=True, include_embeddings=True)
    assert isinstance(model.transformer.tok_emb, QuantEmbedding)
    assert model.lm_head is model.transformer.tok_emb.table  # one set of codes
    idx = torch.randint(0, 96, (1, 6))
    torch.testing.assert_close(model.transformer.tok_emb(idx), model.lm_head.dequantized_weight()[idx])


def test_untied_head_quantizes_alone():
    model = quantize_model(tiny_model(tie_weights=False), "int4", group_size=32, include_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.transformer.tok_emb, torch.nn.Embedding)


def test_quantized_checkpoint_round_trip_through_the_one_checkpoint_format(tmp_path):
    model = quantize_model(tiny_model(), "int4", group_size=64, include_head=True, include_embeddings=True)
    save_model(tmp_path / "q", model, note="kept")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"] == {"scheme": "int4", "group_size": 64, "include_embeddings": True,
                                    "include_head": True}
    assert meta["note"] == "kept"
    loaded, tok, _ = load_model(tmp_path / "q")
    assert tok is None and isinstance(loaded.lm_head, QuantLinear)
    idx = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_a_float_checkpoint_loads_as_a_float_model(tmp_path):
    save_model(tmp_path / "fp", tiny_model())
    model, _, meta = load_model(tmp_path / "fp")
    assert "quantization" not in meta and not any(isinstance(m, QuantLinear) for m in model.modules())


def test_set_backend_on_a_whole_model():
    model = quantize_model(tiny_model(), "int8")
    set_backend(model, "reference")
    assert {m.backend for m in model.modules() if isinstance(m, QuantLinear)} == {"reference"}


# --- the command ----------------------------------------------------------------------------

def test_quantize_command_end_to_end(tmp_path, capsys):
    from minillm.cli import main
    from minillm.data.tokenizer import CharTokenizer

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
    (tmp_path / "text.txt").write_text(text)
    tok = CharTokenizer.from_text(text)
    model = tiny_model(vocab_size=tok.vocab_size)
    save_model(tmp_path / "ckpt", model, tok, data=str(tmp_path / "text.txt"))
    rc = main(["quantize", str(tmp_path / "ckpt"), "--scheme=int4", "--group_size=32",
               f"--out={tmp_path / 'q'}", "--eval_iters=2", "--batch_size=2", "--gen_tokens=8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("weights (MB)", "val perplexity", "generation tokens/s"):
        assert row in out
    report = json.loads((tmp_path / "q" / "config.json").read_text())["quant_report"]
    assert report["bytes"][1] < report["bytes"][0] / 2
    fp_ppl, q_ppl = report["val_ppl"]
    assert 1 < fp_ppl < 2 * tok.vocab_size and abs(q_ppl / fp_ppl - 1) < 0.1
    loaded, tok2, meta = load_model(tmp_path / "q")
    assert tok2.to_dict() == tok.to_dict() and meta["data"] == str(tmp_path / "text.txt")
    assert meta["quantization"]["scheme"] == "int4"

    # what `minillm quantize` wrote is a checkpoint like any other: generate and eval take it
    assert main(["generate", str(tmp_path / "q"), "--prompt=line ", "--max_new_tokens=5", "--temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("line ")
    assert main(["eval", str(tmp_path / "q"), "--eval_iters=2", "--batch_size=2"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "q"), f"--out={tmp_path / 'qq'}"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_quantize_command_errors(tmp_path, capsys):
    from minillm.cli import main

    save_model(tmp_path / "ckpt", tiny_model())
    assert main(["quantize", str(tmp_path / "ckpt")]) == 2
    assert "--out=OUT_DIR is required" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "ckpt"), f"--out={tmp_path / 'q'}", "--group_sise=32"]) == 2
    assert "unknown option --group_sise for quantize; did you mean --group_size" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), f"--out={tmp_path / 'q'}"]) == 2
    assert "not a minillm checkpoint" in capsys.readouterr().err
