"""GGUF weights kept quantized (weights/gguf_keep.py): Q4_0/Q4_1/Q4_K -> int4 g32, Q8_0/Q5_0 -> int8 g32.

The reference nobody here wrote is the `gguf` package: it quantizes (gguf.quants.quantize) and
dequantizes (gguf.quants.dequantize) llama.cpp's blocks. A kept QuantLinear's dequantized_weight()
must EQUAL those values (torch.equal), not be close to them: the matmul sees exactly the file's weights.
Files are written into tmp_path; the real SmolLM2 file is used only when it is in the cache.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is the reference (pip install -e '.[dev]')")
pytest.importorskip("transformers")  # tests/test_gguf.py's tiny llama writer starts from a HF model

from gguf import GGMLQuantizationType as Q

from minillm.compress.quant import QuantEmbedding, QuantLinear
from minillm.compress.quant_format import pack_int4
from minillm.generate.sampling import generate
from minillm.weights.checkpoint import load_model
from minillm.weights.gguf import GGUFError, read_gguf
from minillm.weights.gguf_keep import _quant_linear, keep_tensor, pack_nibbles
from minillm.weights.gguf_llama import load_gguf
from minillm.weights.gguf_quants import GGML_TYPES
from tests.test_gguf import ids, random_blocks, real_gguf, tiny_hf_llama, write, write_tiny_llama

EXACT = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8", "Q5_0": "int8"}
REQUANTIZED = ["Q5_1", "Q5_K", "Q6_K"]


def one_tensor_file(path: Path, type_name: str, raw: np.ndarray | None = None, shape=(8, 512), seed=0):
    """A GGUF holding one (N, K) tensor "w": `raw` blocks if given, else random weights quantized by the
    gguf package (K-quants, which it cannot quantize: random blocks with every code and small scales)."""
    t = GGML_TYPES[int(Q[type_name])]
    rng = np.random.default_rng(seed)
    if raw is None and type_name in ("Q4_K", "Q5_K", "Q6_K"):
        raw = random_blocks(type_name, shape[0] * shape[1] // t.block_size, rng, scale=2e-3)
    if raw is None:
        x = rng.standard_normal(shape).astype(np.float32) * 0.05
        raw = x.astype(np.float16) if type_name == "F16" else gguf.quants.quantize(x, Q[type_name])
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", raw.reshape(shape[0], -1), raw_dtype=Q[type_name])
    write(w)
    return read_gguf(path)


def reference(f, name="w") -> torch.Tensor:
    """The gguf package's dequantization of the tensor's bytes, as an (N, K) float32 tensor."""
    t = f.tensors[name]
    raw = np.asarray(f._data[t.offset:t.offset + t.n_bytes]).reshape(t.shape[0], -1)
    return torch.from_numpy(gguf.quants.dequantize(raw, Q(t.type_id)).reshape(t.shape))


# --- tensor by tensor ------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", list(EXACT))
@pytest.mark.parametrize("source", ["quantized by gguf", "random bytes"])
def test_exact_types_equal_the_gguf_dequantization(tmp_path, type_name, source):
    """Random bytes cover every code of every nibble; the fp16 scales/minimums are finite (~0.05)."""
    raw = None
    if source == "random bytes":
        t = GGML_TYPES[int(Q[type_name])]
        raw = random_blocks(type_name, 8 * 512 // t.block_size, np.random.default_rng(1))
    f = one_tensor_file(tmp_path / "w.gguf", type_name, raw)
    kept, report = keep_tensor(f, "w", EXACT[type_name])
    assert kept.exact and report["exact"] and kept.inexact == report["inexact_groups"]
    mod = _quant_linear([kept])
    assert isinstance(mod, QuantLinear) and (mod.scheme, mod.scales.shape) == (EXACT[type_name], (8, 512 // 32))
    w, want = mod.dequantized_weight(), reference(f)
    if type_name != "Q4_K":  # Q4_1's z = m + 8·d of two fp16 values always fits float32 here
        assert kept.inexact == 0
        assert torch.equal(w, want), (w - want).abs().max()
        assert torch.equal(w, torch.from_numpy(f.tensor("w")))  # and gguf_quants.py's own decoder
    else:  # z = 8·d·sc - dmin·m of two 17-bit products may not: such groups are counted
        differ = (w - want).reshape(8, 16, 32).abs().amax(-1)  # (N, groups) largest difference
        assert int((differ > 0).sum()) <= kept.inexact < 16 * 8 // 4
        assert differ.max() <= 2 ** -22 * want.abs().max()  # one float32 rounding of z, no more


def test_q4_0_is_exact_as_int8_too(tmp_path):
    """Q4_0 is d·(q - 8): int8 codes q - 8 with s = d, for a matrix stacked with Q8_0 rows."""
    f = one_tensor_file(tmp_path / "w.gguf", "Q4_0")
    kept, _ = keep_tensor(f, "w", "int8")
    assert kept.exact and kept.codes.dtype == np.int8 and kept.codes.min() >= -8 and kept.codes.max() <= 7
    assert torch.equal(_quant_linear([kept]).dequantized_weight(), reference(f))


def test_nibbles_are_repacked_in_minillm_order():
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_nibbles(codes), pack_int4(codes))


def test_a_q4_1_zero_that_float32_cannot_hold_is_counted(tmp_path):
    """z = m + 8·d is rounded when m is ~2^24 times d (a nearly constant block): counted, not hidden."""
    t = GGML_TYPES[int(Q["Q4_1"])]
    raw = random_blocks("Q4_1", 8 * 512 // t.block_size, np.random.default_rng(2))
    raw[0, 0:2] = np.array([6e-8], dtype=np.float16).view(np.uint8)  # d: the smallest fp16 subnormal
    raw[0, 2:4] = np.array([1000.0], dtype=np.float16).view(np.uint8)  # m
    f = one_tensor_file(tmp_path / "w.gguf", "Q4_1", raw)
    kept, report = keep_tensor(f, "w", "int4")
    assert kept.inexact == report["inexact_groups"] == 1
    diff = (_quant_linear([kept]).dequantized_weight() - reference(f)).abs()
    assert diff[0, 32:].max() == 0  # every other group is still exact
    assert diff[0, :32].max() <= 2 ** -14  # the one rounding of z (float32's ulp at 1000 is 2^-14)


@pytest.mark.parametrize("type_name", REQUANTIZED + ["F16"])
def test_other_types_are_requantized_to_int8_g32_within_half_a_step(tmp_path, type_name):
    f = one_tensor_file(tmp_path / "w.gguf", type_name)
    kept, report = keep_tensor(f, "w", "int8")
    assert not kept.exact and not report["exact"] and report["seconds"] >= 0
    x = reference(f) if type_name != "F16" else torch.from_numpy(f.tensor("w"))
    w = _quant_linear([kept]).dequantized_weight()
    step = x.reshape(8, 16, 32).abs().amax(-1, keepdim=True) / 127  # int8 g32: s = amax / 127 per group
    err = (w - x).reshape(8, 16, 32).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert report["max_abs_error"] == pytest.approx(err.max().item())


# --- whole models ----------------------------------------------------------------------------------------

def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("tied", [True, False])
def test_a_q4_1_model_with_a_q8_0_table_is_kept_bit_for_bit(tmp_path, tied):
    """SmolLM2's mix: Q8_0 token table (tied head), Q4_1 everything else, F32 norms."""
    hf = tiny_hf_llama(tied)
    types = ["Q8_0"] + ["Q4_1"] * 40  # the first 2-D tensor is token_embd
    path = write_tiny_llama(tmp_path / "tiny.gguf", hf, types=types)
    ref, _ = load_gguf(path)  # every weight dequantized to fp32
    model, info = load_gguf(path, keep_quantized=True)
    kept = info["gguf"]["kept"]
    assert kept["requantized"] == kept["inexact_groups"] == 0 and kept["exact"] == 15 + (not tied)
    assert isinstance(model.transformer.tok_emb, QuantEmbedding)
    assert (model.lm_head is model.transformer.tok_emb.table) == tied
    assert model.quant_config["source"] == "gguf" and model.quant_config["include_embeddings"]
    ref_params = dict(ref.named_parameters())
    for name, mod in linears(model).items():
        want = ref_params[name.replace("tok_emb.table", "tok_emb") + ".weight"]  # (N, K) fp32
        assert torch.equal(mod.dequantized_weight(), want), name
    assert model.transformer.tok_emb.table.scheme == "int8"
    assert {m.scheme for n, m in linears(model).items() if "tok_emb" not in n} == {"int4"}
    for n, p in model.named_parameters():  # what is left as a parameter: the norms, equal too
        assert "norm" in n and torch.equal(p, ref_params[n])
    with torch.no_grad():
        x = ids()
        # same weights, same ops (reference backend: dequantize, then F.linear): the same logits
        assert torch.equal(model(x)[0], ref(x)[0])


def test_mixed_types_in_one_matrix_become_int8(tmp_path):
    """q, k, v of different types stack into one qkv: Q8_0 and Q4_0 rows stay exact in int8, Q4_1
    rows are re-quantized (int8 is the more precise of the two schemes)."""
    hf = tiny_hf_llama()
    path = write_tiny_llama(tmp_path / "mixed.gguf", hf, types=["Q4_1", "Q8_0", "Q4_0"])
    ref, _ = load_gguf(path)
    model, info = load_gguf(path, keep_quantized=True)
    tensors = info["gguf"]["kept"]["tensors"]
    qkv = [tensors[f"blk.0.attn_{x}.weight"] for x in "qkv"]
    assert {r["scheme"] for r in qkv} == {"int8"} and model.transformer.blocks[0].attn.qkv.scheme == "int8"
    for r in qkv:
        assert r["exact"] == (r["type"] in ("Q8_0", "Q4_0"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], ref(ids())[0], rtol=0, atol=0.05)


def test_every_type_loads_and_k_quants_map_or_requantize(tmp_path):
    """256 wide so K-quant super-blocks fit; the 2-D weights cycle through every type gguf_quants reads."""
    hf = tiny_hf_llama(C=256, ffn=256)
    types = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
    path = write_tiny_llama(tmp_path / "all.gguf", hf, types=types)
    ref, _ = load_gguf(path)
    model, info = load_gguf(path, keep_quantized=True)
    for name, r in info["gguf"]["kept"]["tensors"].items():
        assert r["exact"] or r["type"] in REQUANTIZED + ["F32", "F16", "BF16", "Q4_1", "Q4_K"], (name, r)
    with torch.no_grad():
        logits, want = model(ids())[0], ref(ids())[0]
    assert (logits - want).abs().max() <= 0.02 * want.abs().max()


def test_load_model_keeps_and_generates(tmp_path):
    hf = tiny_hf_llama(tied=True)
    path = write_tiny_llama(tmp_path / "tiny.gguf", hf, types=["Q8_0"] + ["Q4_1"] * 40)
    ref, _, _ = load_model(path)
    model, tokenizer, meta = load_model(path, keep_quantized=True, backend="reference")
    assert tokenizer.vocab_size == model.cfg.vocab_size and meta["gguf"]["kept"]["exact"] == 15
    assert {m.backend for m in linears(model).values()} == {"reference"}
    prompt = ids(1, 5)
    with torch.no_grad():  # greedy, with the KV cache: the same tokens as the dequantized model
        want = generate(ref, prompt, 8, temperature=0)
        assert torch.equal(generate(model, prompt, 8, temperature=0), want)
        # the flat decode step (generate/flat.py) looks rows up through the QuantEmbedding too
        assert torch.equal(generate(model, prompt, 8, temperature=0, flat_decode=True), want)


def test_bad_input_is_one_line(tmp_path):
    hf = tiny_hf_llama()
    path = write_tiny_llama(tmp_path / "tiny.gguf", hf, types=["Q4_1"])
    with pytest.raises(GGUFError, match="do not make transformer.blocks.0.attn.qkv.weight"):
        load_gguf(path, keep_quantized=True, n_kv_head=4)  # the metadata's shape, not the tensors'
    f = one_tensor_file(tmp_path / "w.gguf", "Q4_1")
    with pytest.raises(GGUFError, match="a kept linear weight is 2-D"):
        f.tensors["w"].shape = (8 * 512,)
        keep_tensor(f, "w", "int4")


# --- the real file, when it is in the cache ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(real_gguf() is None, reason="SmolLM2-135M-Instruct.Q4_1.gguf is not in the cache "
                    "(run `minillm pull smollm2-135m-instruct`, or point $MINILLM_GGUF at a GGUF file)")
def test_smollm2_kept_weights_are_the_files():
    path = real_gguf()
    f = read_gguf(path)
    model, info = load_gguf(path, keep_quantized=True)
    kept = info["gguf"]["kept"]
    assert (kept["exact"], kept["requantized"], kept["inexact_groups"]) == (211, 0, 0)
    mods = linears(model)
    assert len(mods) == 30 * 5 + 1 and mods["transformer.tok_emb.table"].scheme == "int8"
    assert torch.equal(mods["transformer.tok_emb.table"].dequantized_weight(),
                       torch.from_numpy(f.tensor("token_embd.weight")))
    for i in (0, 29):
        b = f"transformer.blocks.{i}."
        qkv = np.concatenate([f.tensor(f"blk.{i}.attn_{x}.weight") for x in "qkv"])
        assert torch.equal(mods[b + "attn.qkv"].dequantized_weight(), torch.from_numpy(qkv))
        for ours, theirs in (("attn.proj", "attn_output"), ("ffn.gate", "ffn_gate"), ("ffn.down", "ffn_down")):
            assert torch.equal(mods[b + ours].dequantized_weight(), torch.from_numpy(f.tensor(f"blk.{i}.{theirs}.weight")))
