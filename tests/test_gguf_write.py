"""The GGUF writer (minillm/weights/gguf_write.py, gguf_blocks.py, gguf_vocab.py) against readers nobody here wrote.

- block quantizers: bytes equal to the `gguf` package's gguf.quants.quantize (ggml's reference in numpy)
- minillm's reader reads the file back: F32 tensors equal to the model's, quantized ones equal to
  quantize -> dequantize, the same config, and a tokenizer that encodes as the original
- the `gguf` package's GGUFReader reads it; transformers' GGUF loader runs an f32 export to 1e-4
- llama.cpp (llama-cpp-python, skipped when absent) greedy-decodes the tokens minillm does, f32 and q8_0
- what GGUF cannot hold is refused in one line
Models and tokenizers are built here, tiny; nothing needs the pulled SmolLM2 (bench/gguf_roundtrip.py does).
"""

import numpy as np
import pytest
import torch

from minillm.data.tokenizer import BPETokenizer, CharTokenizer, GGUFTokenizer, load_hf_tokenizer
from minillm.model.config import ModelConfig
from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig
from minillm.model.transformer import CausalLM, MaskedLM
from minillm.weights import gguf_blocks
from minillm.weights.checkpoint import load_model
from minillm.weights.gguf import read_gguf
from minillm.weights.gguf_llama import llama_config
from minillm.weights.gguf_quants import dequantize
from minillm.weights.gguf_write import FILE_TYPES, write_gguf
from tests.helpers import SMOLLM2_TEMPLATE, write_bpe_tokenizer_json

TEXT = ("the quick brown fox jumps over the lazy dog. " * 8 + "hello world, 123 and 4567! " * 4
        + "a café in the rain; naïve résumé. " * 4)
LLAMA = dict(positional="rotary", activation="swiglu", norm="rmsnorm", bias=False)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(TEXT, vocab_size=300, special_tokens=("<|endoftext|>",))


def tiny_llama(seed=0, **kw) -> CausalLM:
    """2 layers, grouped-query attention (4 query heads, 2 K/V heads), vocab padded past the tokenizer's."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=96,
               rope_base=10000.0, norm_eps=1e-6, **LLAMA)
    return CausalLM(ModelConfig(**{**cfg, **kw})).eval()


# --- block quantizers ---------------------------------------------------------------------------

GGUF_TYPES = {"F32": gguf_blocks.F32, "F16": gguf_blocks.F16, "Q8_0": gguf_blocks.Q8_0,
              "Q4_0": gguf_blocks.Q4_0, "Q4_1": gguf_blocks.Q4_1}


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_block_quantizers_equal_the_gguf_package(name):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 128)) * rng.uniform(1e-3, 5, (16, 1))).astype(np.float32)  # 4 blocks a row
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    x[1, :32] = 0.75  # a constant block (Q4_1: max == min)
    x[2, 3], x[2, 7] = -4.0, 4.0  # Q4_0: two values of the same magnitude, the first one sets the sign
    x[3, :32] = np.arange(32, dtype=np.float32) / 31 * 127 / 2  # halves: roundf rounds them away from zero
    ours = gguf_blocks.encode(x, GGUF_TYPES[name])
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name]).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("type_id", [gguf_blocks.Q8_0, gguf_blocks.Q4_0, gguf_blocks.Q4_1])
def test_quantize_then_dequantize_is_close(type_id):
    """Each block's error is at most half a step (Q4_0: one step at its edge), judged with the decoder."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).numpy()
    back = dequantize(gguf_blocks.encode(x, type_id), type_id, x.shape)
    levels = {gguf_blocks.Q8_0: 254, gguf_blocks.Q4_0: 15, gguf_blocks.Q4_1: 15}[type_id]
    span = np.ptp(x.reshape(-1, 32), axis=1) if type_id == gguf_blocks.Q4_1 else 2 * np.abs(x.reshape(-1, 32)).max(1)
    assert (np.abs(back - x).reshape(-1, 32).max(1) <= span / levels * 1.01).all()


def test_roundf_rounds_halves_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997], dtype=np.float32)
    np.testing.assert_array_equal(gguf_blocks.roundf(x), [1, 2, 3, -1, -3, 0, 0])


# --- minillm's reader -----------------------------------------------------------------------------

@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_minillm_reads_it_back(tmp_path, tok, file_type):
    model = tiny_llama()
    path = write_gguf(model, tok, tmp_path / "m.gguf", file_type=file_type, chat_template=SMOLLM2_TEMPLATE)
    f = read_gguf(path)
    assert f.architecture == "llama" and f.version == 3 and f.metadata["general.alignment"] == 32
    # the same model shape from the llama.* keys
    cfg = llama_config(f)
    for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "norm_eps",
                  "rope_base", "tie_weights"):
        assert getattr(cfg, field) == getattr(model.cfg, field), field
    # each tensor: F32 equal to the weight, the others equal to quantize -> dequantize of it
    qkv = model.transformer.blocks[1].attn.qkv.weight.detach().numpy()  # rows q (64), k (32), v (32)
    expected = {"token_embd.weight": model.transformer.tok_emb.weight, "output_norm.weight":
                model.transformer.final_norm.weight, "blk.1.attn_q.weight": qkv[:64], "blk.1.attn_k.weight": qkv[64:96],
                "blk.1.attn_v.weight": qkv[96:], "blk.1.ffn_down.weight": model.transformer.blocks[1].ffn.down.weight}
    for name, w in expected.items():
        w = np.asarray(w.detach() if torch.is_tensor(w) else w, dtype=np.float32)
        t = f.tensors[name]
        assert t.shape == w.shape
        np.testing.assert_array_equal(f.tensor(name), dequantize(gguf_blocks.encode(w, t.type_id), t.type_id, w.shape))
    assert {t.type_name for n, t in f.tensors.items() if n.endswith("norm.weight")} == {"F32"}
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}[file_type]
    assert f.tensors["blk.0.ffn_up.weight"].type_name == want
    assert f.tensors["token_embd.weight"].type_name == ("Q8_0" if file_type.startswith("q4") else want)
    # and load_model runs it, with the tokenizer and template from the metadata
    back, tok2, _ = load_model(path)
    assert isinstance(tok2, GGUFTokenizer) and tok2.chat_template == SMOLLM2_TEMPLATE
    for text in (TEXT[:90], "naïve 2024<|endoftext|>x", " \n\n  spaces"):
        assert tok2.encode(text) == tok.encode(text)
        assert tok2.decode(tok.encode(text)) == text
    if file_type == "f32":
        x = torch.randint(0, 300, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(back(x)[0], model(x)[0], rtol=0, atol=0)


def test_untied_head_gqa_and_alignment(tmp_path, tok):
    model = tiny_llama(seed=3, tie_weights=False, n_kv_head=1, rope_scaling="linear", rope_factor=2.0)
    path = write_gguf(model, tok, tmp_path / "m.gguf", alignment=64)
    f = read_gguf(path)
    assert f.alignment == 64 and f.data_start % 64 == 0 and all(t.offset % 64 == 0 for t in f.tensors.values())
    assert "output.weight" in f.tensors and f.metadata["llama.rope.scaling.type"] == "linear"
    back, _, _ = load_model(path)
    assert back.cfg.rope_scaling == "linear" and back.cfg.rope_factor == 2.0 and back.cfg.n_kv_head == 1
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], model(x)[0], rtol=0, atol=0)


def test_hf_and_gguf_tokenizers_go_through(tmp_path):
    """A tokenizer.json (byte-level BPE, "gpt-2" pre-tokenizer) -> GGUF -> minillm's GGUF tokenizer encodes
    as the `tokenizers` library did; that GGUF tokenizer written again gives the same vocabulary."""
    write_bpe_tokenizer_json(tmp_path, [TEXT], vocab_size=300)
    hf = load_hf_tokenizer(tmp_path)
    model = tiny_llama()
    a = read_gguf(write_gguf(model, hf, tmp_path / "a.gguf")).metadata
    assert a["tokenizer.ggml.pre"] == "gpt-2" and a["tokenizer.ggml.token_type"][hf.special_tokens["<|endoftext|>"]] == 3
    g = GGUFTokenizer.from_metadata(a)
    for text in (TEXT[:120], "unseen wörds 99<|endoftext|>"):
        assert g.encode(text) == hf.encode(text)
    b = read_gguf(write_gguf(model, g, tmp_path / "b.gguf")).metadata
    assert all(a[k] == b[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                                       "tokenizer.ggml.pre"))


# --- other readers --------------------------------------------------------------------------------

def test_gguf_package_reads_it(tmp_path, tok):
    gguf = pytest.importorskip("gguf")
    model = tiny_llama()
    path = write_gguf(model, tok, tmp_path / "m.gguf", file_type="q8_0")
    r = gguf.GGUFReader(str(path))
    assert len(r.tensors) == 2 + 9 * 2
    t = {t.name: t for t in r.tensors}
    assert t["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(t["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out)
    w = model.transformer.blocks[0].attn.qkv.weight.detach().numpy()[64:96]
    np.testing.assert_array_equal(gguf.quants.dequantize(t["blk.0.attn_k.weight"].data, gguf.GGMLQuantizationType.Q8_0),
                                  dequantize(gguf_blocks.encode(w, gguf_blocks.Q8_0), gguf_blocks.Q8_0, w.shape))
    field = r.fields["llama.attention.head_count_kv"]
    assert field.parts[field.data[0]][0] == 2
    assert r.fields["tokenizer.ggml.tokens"].contents()[256] == tok.vocab[256].decode().replace(" ", "Ġ")


def test_transformers_loads_an_f32_export(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model = tiny_llama(seed=2)
    write_gguf(model, tok, tmp_path / "m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tok) -> CausalLM:
    """A tiny model trained on TEXT for a few seconds, so its greedy choices are clear-cut."""
    model = tiny_llama(seed=0, vocab_size=tok.vocab_size).train()
    ids = torch.tensor(tok.encode(TEXT * 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small run faster on one thread than on a shared, busy CPU's two
    try:
        for _ in range(150):  # to loss ~0.05: the greedy path's top-2 logit gaps are > 1, far above q8_0's error
            starts = torch.randint(0, len(ids) - 33, (8,), generator=g)
            batch = torch.stack([ids[s:s + 33] for s in starts])  # (B, T + 1)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("file_type", ["f32", "q8_0"])
def test_llama_cpp_decodes_what_minillm_decodes(tmp_path, tok, trained, file_type):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model = trained
    path = write_gguf(model, tok, tmp_path / f"m.{file_type}.gguf", file_type=file_type)
    ours, _, _ = load_model(path)  # q8_0: minillm runs the same quantized weights (dequantized)
    prompt = tok.encode("the lazy dog. hello")
    want = _greedy(ours, prompt, 32)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    got = list(prompt)
    llm.eval(got)
    for _ in range(32):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(got[-1:])
    assert got[len(prompt):] == want
    assert llm.detokenize(want).decode() == tok.decode(want)


def test_llama_cpp_tokenizes_as_minillm(tmp_path, tok):
    """The vocabulary, merges and "gpt-2" pre-tokenizer written for a minillm BPE: llama.cpp's ids are minillm's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = write_gguf(tiny_llama(), tok, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (TEXT[:150], "naïve 2024 unseen wörds<|endoftext|>x", " \n\n  spaces  end", "don't we'll 12345"):
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert llm.detokenize(ids, special=True).decode() == text


# --- refusals, one line each ----------------------------------------------------------------------

def _refused(model, tokenizer, tmp_path, match, **kw):
    with pytest.raises(ValueError, match=match) as e:
        write_gguf(model, tokenizer, tmp_path / "x.gguf", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_refusals(tmp_path, tok):
    _refused(tiny_llama(), tok, tmp_path, "'q5_0' is not one minillm writes", file_type="q5_0")
    _refused(MaskedLM(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32, causal=False)), tok, tmp_path,
             "masked LM")
    s2s = Seq2Seq(Seq2SeqConfig(model=ModelConfig(vocab_size=320, n_head=2, n_embd=32), n_enc_layer=1, n_dec_layer=1))
    _refused(s2s, tok, tmp_path, "encoder-decoder")
    gpt2 = CausalLM(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=32, positional="learned",
                                activation="gelu_tanh"))
    _refused(gpt2, tok, tmp_path, "GPT-2 family models export --format=hf")
    _refused(tiny_llama(sliding_window=8), tok, tmp_path, "sliding window")
    _refused(tiny_llama(), CharTokenizer.from_text(TEXT), tmp_path, "character-level tokenizer")
    _refused(tiny_llama(), BPETokenizer.train(TEXT, 270, pattern="none"), tmp_path, "split pattern")
    _refused(tiny_llama(vocab_size=290), tok, tmp_path, "300 ids but the model only 290")
    _refused(tiny_llama(), None, tmp_path, "no tokenizer")
    lora = tiny_llama()
    lora.register_buffer("lora_A", torch.zeros(1))  # a parameter no plain llama model has
    _refused(lora, tok, tmp_path, "lora_A are not a plain llama model's")
