"""GGUF: the reader (weights/gguf.py), the dequantizers (gguf_quants.py) and the llama loader (gguf_llama.py).

References nobody here wrote: the `gguf` package (llama.cpp's own Python library) quantizes, writes
files (GGUFWriter) and dequantizes (gguf.quants.dequantize); transformers loads the same files.
Every file is written by the tests into tmp_path, so CI never needs a real model; one test runs
the real SmolLM2 file when it is in the cache.
"""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is the reference (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from minillm.data.tokenizer_gguf import GGUFTokenizer, bytes_to_unicode
from minillm.weights.checkpoint import load_model
from minillm.weights.gguf import GGUFError, read_gguf
from minillm.weights.gguf_llama import IGNORED, REFUSED, llama_tensor_map, load_gguf
from minillm.weights.gguf_quants import GGML_TYPES, dequantize
from minillm.weights.huggingface import llama_config, llama_from_state_dict

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # byte offsets of each block's fp16 scales


def ours(raw: np.ndarray, name: str) -> np.ndarray:
    """Our dequantization of a (rows, bytes per row) uint8 array of type `name`."""
    t = GGML_TYPES[int(Q[name])]
    cols = raw.shape[1] // t.type_size * t.block_size
    return dequantize(raw.reshape(-1), int(Q[name]), (raw.shape[0], cols))


def assert_bit_exact(a: np.ndarray, b: np.ndarray):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# --- dequantization, type by type, against gguf.quants.dequantize ------------------------------------

def random_blocks(name: str, n_blocks: int, rng, scale: float = 0.05) -> np.ndarray:
    """(n_blocks, type_size) random bytes, which cover every bit of every code, with each block's
    fp16 scales set to finite values of about `scale` (F32: real floats, not NaN bit patterns)."""
    t = GGML_TYPES[int(Q[name])]
    if name == "F32":
        return rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    for at in FP16_FIELDS.get(name, []):
        raw[:, at:at + 2] = (rng.standard_normal((n_blocks, 1)) * scale).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_random_blocks_bit_exact(name):
    rows, cols = 6, 512
    raw = random_blocks(name, rows * cols // GGML_TYPES[int(Q[name])].block_size, np.random.default_rng(0))
    raw = raw.reshape(rows, -1)
    assert_bit_exact(ours(raw, name), gguf.quants.dequantize(raw, Q[name]))


@pytest.mark.parametrize("name", [n for n in TYPES if n not in ("F32", "F16", "Q4_K", "Q5_K", "Q6_K")])
def test_dequantize_what_gguf_quantizes_bit_exact(name):
    """Blocks made by gguf's own quantizer (llama.cpp's reference rounding) decode identically."""
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[name])
    y = ours(raw, name)
    assert_bit_exact(y, gguf.quants.dequantize(raw, Q[name]))
    amax = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True)  # (blocks, 1)
    assert (np.abs(y - x).reshape(-1, 32) <= amax / 7).all()  # the tensor that was quantized, to 4 bits at worst


def test_f16_is_a_plain_cast():
    x = np.random.default_rng(2).standard_normal((3, 40)).astype(np.float16)
    assert_bit_exact(ours(x.view(np.uint8), "F16"), x.astype(np.float32))


# --- metadata and versions -------------------------------------------------------------------------

METADATA = [  # (key, value, GGUF type, element type of an array)
    ("t.u8", 200, V.UINT8, None), ("t.i8", -100, V.INT8, None), ("t.u16", 60000, V.UINT16, None),
    ("t.i16", -30000, V.INT16, None), ("t.u32", 4_000_000_000, V.UINT32, None), ("t.i32", -2_000_000_000, V.INT32, None),
    ("t.f32", -1.25, V.FLOAT32, None), ("t.bool", True, V.BOOL, None), ("t.false", False, V.BOOL, None),
    ("t.str", "héllo ✓", V.STRING, None), ("t.u64", 2**63 + 5, V.UINT64, None), ("t.i64", -(2**62), V.INT64, None),
    ("t.f64", 0.1, V.FLOAT64, None), ("t.ints", [1, -2, 3], V.ARRAY, None), ("t.u64s", [2**40, 7], V.ARRAY, V.UINT64),
    ("t.strs", ["a", "", "ü"], V.ARRAY, None), ("t.floats", [0.5, -2.0], V.ARRAY, None),
    ("t.nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY, None), ("t.deeper", [[["x"], ["y", "z"]], [["w"]]], V.ARRAY, None),
]


def test_metadata_of_every_value_type_round_trips(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    for key, value, vtype, sub in METADATA:
        w.add_key_value(key, value, vtype, sub)
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("b", np.ones(5, dtype=np.float16))
    write(w)
    f = read_gguf(tmp_path / "m.gguf")
    assert f.version == 3 and f.alignment == 64 and f.data_start % 64 == 0
    assert {k: f.metadata[k] for k, *_ in METADATA} == {k: v for k, v, *_ in METADATA}
    assert f.metadata["general.architecture"] == "llama"
    assert f.tensors["a"].shape == (2, 3) and f.tensors["a"].offset % 64 == 0 and f.tensors["b"].offset % 64 == 0
    np.testing.assert_array_equal(f.tensor("a"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(f.tensor("b"), np.ones(5))
    ref = gguf.GGUFReader(tmp_path / "m.gguf")  # the tensor table agrees with llama.cpp's reader
    assert {t.name: (int(t.data_offset), int(t.n_bytes)) for t in ref.tensors} == \
        {t.name: (t.offset, t.n_bytes) for t in f.tensors.values()}


def s(text: str) -> bytes:  # a GGUF string: u64 length, then UTF-8 bytes
    return struct.pack("<Q", len(text.encode())) + text.encode()


def raw_gguf(version=3, kv=(), infos=(), data=b"", magic=b"GGUF") -> bytes:
    """A GGUF file byte by byte: kv = [(key, type id, packed value)], infos = [(name, ne, type, offset)]."""
    out = magic + struct.pack("<IQQ", version, len(infos), len(kv))
    out += b"".join(s(k) + struct.pack("<I", t) + v for k, t, v in kv)
    for name, ne, t, offset in infos:
        out += s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t, offset)
    return out + b"\0" * (-len(out) % 32) + data


@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3_read_the_same(tmp_path, version):
    x = np.arange(8, dtype=np.float32)
    path = tmp_path / "v.gguf"
    path.write_bytes(raw_gguf(version, kv=[("general.name", 8, s("v"))], infos=[("x", [4, 2], 0, 0)],
                              data=x.tobytes()))
    f = read_gguf(path)
    assert f.version == version and f.metadata == {"general.name": "v"}
    np.testing.assert_array_equal(f.tensor("x"), x.reshape(2, 4))  # ne = [4, 2] is PyTorch's (2, 4)


# --- a tiny llama, written the way llama.cpp's convert script writes one ----------------------------

def write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `permute` for q/k rows: HF's rotate-half pairs (c, c + D/2) become
    adjacent rows (2c, 2c+1), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_llama(tied=False, C=64, ffn=128, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=C, intermediate_size=ffn, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are initialised to ones; make them count
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return hf


def write_tiny_llama(path, hf, types=("F32",), arch="llama", extra_tensors=()):
    """hf's weights as a llama GGUF; 2-D weights cycle through `types` (norms stay F32)."""
    c = hf.config
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny test llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")  # byte-level BPE, the tokenizer minillm reads from GGUF metadata
    w.add_tokenizer_pre("gpt2")
    byte_chars = list(bytes_to_unicode().values())
    w.add_token_list([byte_chars[i] if i < 256 else f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_merges([])
    w.add_token_types([1] * c.vocab_size)
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(c.num_hidden_layers):
        h, g = f"model.layers.{i}.", f"blk.{i}."
        names.update({h + "input_layernorm.weight": g + "attn_norm.weight",
                      h + "post_attention_layernorm.weight": g + "ffn_norm.weight",
                      h + "self_attn.o_proj.weight": g + "attn_output.weight"})
        for x in "qkv":
            names[f"{h}self_attn.{x}_proj.weight"] = f"{g}attn_{x}.weight"
        for x in ("gate", "up", "down"):
            names[f"{h}mlp.{x}_proj.weight"] = f"{g}ffn_{x}.weight"
    k = 0
    for hf_name, name in names.items():
        t = sd[hf_name]
        if name.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, c.num_key_value_heads)
        x = t.float().numpy()
        if x.ndim == 1 or types[k % len(types)] == "F32":
            w.add_tensor(name, x)
        else:
            qt = Q[types[k % len(types)]]
            if qt.name in ("Q4_K", "Q5_K", "Q6_K"):  # gguf cannot quantize these: random blocks, small scales
                t = GGML_TYPES[int(qt)]
                raw = random_blocks(qt.name, x.size // t.block_size, np.random.default_rng(k), scale=2e-5)
                w.add_tensor(name, raw.reshape(x.shape[0], -1), raw_dtype=qt)
            else:
                w.add_tensor(name, x.astype(np.float16) if qt == Q.F16 else gguf.quants.quantize(x, qt), raw_dtype=qt)
        k += x.ndim == 2
    for name, x in extra_tensors:
        w.add_tensor(name, x)
    write(w)
    return path


def ids(n=2, T=11, V=96):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(5))


def hf_from_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_logits_equal_the_model_it_was_written_from(tmp_path, tied):
    hf = tiny_hf_llama(tied)
    ref = llama_from_state_dict(hf.state_dict(), llama_config(hf.config.to_dict())).eval()  # minillm's own
    path = write_tiny_llama(tmp_path / "tiny.gguf", hf)
    model, info = load_gguf(path)
    assert model.cfg == ref.cfg and info["gguf"]["architecture"] == "llama"
    assert info["gguf"]["metadata"]["general.name"] == "tiny test llama"
    with torch.no_grad():
        logits = model(ids())[0]
        torch.testing.assert_close(logits, ref(ids())[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, hf(ids()).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, hf_from_gguf(path)(ids()).logits, rtol=0, atol=1e-5)
    assert (model.lm_head.weight is model.transformer.tok_emb.weight) == tied


def test_tiny_llama_of_every_tensor_type_matches_transformers(tmp_path):
    """256 wide so K-quant super-blocks fit a row; the 2-D weights cycle through every type."""
    hf = tiny_hf_llama(C=256, ffn=256)
    path = write_tiny_llama(tmp_path / "mixed.gguf", hf, types=TYPES)
    model, info = load_gguf(path)
    assert set(info["gguf"]["tensor_types"]) == set(TYPES)
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], hf_from_gguf(path)(ids()).logits, rtol=0, atol=1e-5)


def test_load_model_reads_a_gguf_file(tmp_path):
    hf = tiny_hf_llama()
    path = write_tiny_llama(tmp_path / "tiny.gguf", hf)
    model, tokenizer, meta = load_model(path, block_size=32, attention="sdpa")
    assert isinstance(tokenizer, GGUFTokenizer) and tokenizer.vocab_size == model.cfg.vocab_size
    assert meta["gguf"]["version"] == 3 and model.cfg.block_size == 32
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], hf(ids()).logits, rtol=0, atol=1e-5)


def test_the_llama_mapping_is_complete():
    """Every tensor llama.cpp defines for the llama architecture is mapped, ignored or refused by
    name, and every minillm parameter has a source (load_gguf checks the latter on each load)."""
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    mapped = {src.removesuffix(".weight") for srcs in llama_tensor_map(2, tied=False).values() for src in srcs}
    for t in MODEL_TENSORS[MODEL_ARCH.LLAMA]:
        name = TENSOR_NAMES[t].replace("{bid}", "{i}")
        assert name.format(i=1) in mapped or name in IGNORED or name in REFUSED, name


def test_an_unknown_tensor_is_refused_by_name(tmp_path):
    path = write_tiny_llama(tmp_path / "moe.gguf", tiny_hf_llama(),
                            extra_tensors=[("blk.1.ffn_gate_exps.weight", np.zeros((4, 64), np.float32))])
    with pytest.raises(GGUFError, match=r"moe.gguf: tensor 'blk.1.ffn_gate_exps.weight' is mixture-of-experts"):
        load_gguf(path)


# --- bad input: one line naming the file and the problem, nothing written ----------------------------

def refused(path: Path, match: str, loader=read_gguf):
    before = sorted(path.parent.iterdir())
    with pytest.raises(ValueError, match=match) as e:
        loader(path)
    assert isinstance(e.value, GGUFError) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert sorted(path.parent.iterdir()) == before  # nothing written
    return str(e.value)


def test_a_truncated_file_is_named_wherever_it_is_cut(tmp_path):
    whole = write_tiny_llama(tmp_path / "whole.gguf", tiny_hf_llama()).read_bytes()
    f = read_gguf(tmp_path / "whole.gguf")
    for cut in (0, 3, 10, 30, 200, f.data_start - 5, f.data_start + 100, len(whole) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        refused(path, "truncated|runs past the end|not a GGUF file")
        refused(path, "truncated|runs past the end|not a GGUF file", loader=load_model)


def test_bad_headers(tmp_path):
    cases = {
        "magic": (raw_gguf(magic=b"GGML"), r"not a GGUF file \(starts with b'GGML'"),
        "v1": (raw_gguf(version=1), "GGUF version 1; minillm reads versions 2 and 3"),
        "bigendian": (raw_gguf(version=3 << 24), "big-endian"),
        "type99": (raw_gguf(infos=[("w", [32], 99, 0)], data=bytes(128)), r"tensor 'w' has ggml type 99, an unknown"),
        "q2k": (raw_gguf(infos=[("w", [256], 10, 0)], data=bytes(256)), r"type 10 \(Q2_K\), which minillm does not"),
        "past_end": (raw_gguf(infos=[("w", [8, 4], 0, 64)], data=bytes(128)), r"tensor 'w' \(128 bytes .* runs past"),
        "string2e40": (raw_gguf(kv=[("general.name", 8, struct.pack("<Q", 2**40) + b"abc")]),
                       r"metadata 'general.name' \(1,099,511,627,776-byte string\) needs"),
        "value_type": (raw_gguf(kv=[("k", 13, b"")]), "unknown value type 13"),
        "ragged_rows": (raw_gguf(infos=[("w", [33, 2], 8, 0)], data=bytes(256)), "not whole Q8_0 blocks"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        refused(tmp_path / f"{name}.gguf", match)


def test_an_architecture_minillm_cannot_run(tmp_path):
    path = write_tiny_llama(tmp_path / "gpt2.gguf", tiny_hf_llama(), arch="gpt2")
    msg = refused(path, "architecture 'gpt2' is not one minillm runs from GGUF", loader=load_gguf)
    assert "llama" in msg
    refused(path, "architecture 'gpt2'", loader=load_model)


# --- the real file, when it is in the cache ------------------------------------------------------------

def real_gguf() -> Path | None:
    from minillm.weights.pull import cached_path

    path = Path(os.environ["MINILLM_GGUF"]) if os.environ.get("MINILLM_GGUF") else cached_path("smollm2-135m-instruct")
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(real_gguf() is None, reason="SmolLM2-135M-Instruct.Q4_1.gguf is not in the cache "
                    "(run `minillm pull smollm2-135m-instruct`, or point $MINILLM_GGUF at a GGUF file)")
def test_smollm2_gguf_logits_match_transformers():
    path = real_gguf()
    model, info = load_gguf(path)
    assert info["gguf"]["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.n_head, model.cfg.kv_heads) == (30, 576, 9, 3)
    hf = hf_from_gguf(path)
    with torch.no_grad():
        for T in (1, 9, 33):
            x = ids(2, T, V=model.cfg.vocab_size)
            diff = (model(x)[0] - hf(x).logits).abs()  # |logits| up to ~35
            # fp32 rounding through 30 layers: transformers' own sdpa and eager attention differ by up
            # to 1.5e-4 on these logits, and so do we at worst (1.4e-4 here); in fp64, with RoPE in
            # fp64 too, the two models agree to 1e-10. A wrong layout or name would be off by O(1).
            assert diff.max() <= 2e-4 and diff.mean() <= 3e-5, (T, diff.max().item(), diff.mean().item())


def test_a_tokenizer_we_do_not_read_is_one_line(tmp_path):
    """load_model hands back the file's tokenizer; a SentencePiece ('llama') one is refused by name."""
    hf = tiny_hf_llama()
    path = write_tiny_llama(tmp_path / "tiny.gguf", hf)
    f = read_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for key, value in f.metadata.items():
        if key.startswith(("llama.", "general.name")):
            (w.add_uint32 if isinstance(value, int) else w.add_float32 if isinstance(value, float)
             else w.add_string)(key, value)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(hf.config.vocab_size)])
    for name in f.tensors:
        w.add_tensor(name, np.ascontiguousarray(f.tensor(name)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(tmp_path / "spm.gguf", "tokenizer model 'llama' is not one minillm reads", loader=load_model)
