"""The GGUF tokenizer (written out) against the `tokenizers` library and transformers' GGUF loader.

CI has no 98 MB model, so small byte-level BPEs are trained here with the `tokenizers` library on
the Python docs, written into GGUF files with gguf.GGUFWriter, and read by every side. The real
SmolLM2 file is compared too when it is in the cache (`minillm pull smollm2-135m-instruct`).

One known difference: transformers' GGUF loader ignores `tokenizer.ggml.pre` and always splits
with GPT-2's regex, while SmolLM2's own tokenizer.json (and llama.cpp, for pre = "smollm") first
isolates every digit. The two agree except where whitespace runs into a digit (":\n\n1." is
[":", "ĊĊ", "1", "."] for SmolLM2's tokenizer, [":", "Ċ", "Ċ", "1", "."] for transformers' GGUF
loader). So with pre = "gpt2" we must equal transformers everywhere, and with pre = "smollm" we
must equal the pipeline SmolLM2's tokenizer.json names (Digits(individual) + ByteLevel).
"""

import pytest

from minillm.data.corpora import python_docs_text
from minillm.data.tokenizer_gguf import PRE_TOKENIZERS, GGUFTokenizer, bytes_to_unicode
from minillm.weights.pull import cached_path

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLES = ["Hello world!", "<|im_start|>user\nWhat is 2024 + 17?<|im_end|>\n<|im_start|>assistant\n",
           "def add(a, b):\n    return a + b  # 3.14159\n\n\n", "ünïcödé ✓ 日本語 🙂 — “quotes”  spaces   \t\n",
           "x" * 300, "   leading and trailing   ", "it's they're we've I'm you'll he'd", "\r\n\r\nCRLF",
           "<|endoftext|><|endoftext|>", "<|im_end", "1234567890 0.5e-10 0x1F"]


def gguf_with_tokenizer(path, tokens, merges, types, pre="smollm"):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_pipeline(pre: str):
    """The `tokenizers` pre-tokenizer a Hugging Face tokenizer.json names for this `pre`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def train_vocab(pre: str):
    """A 600-token byte-level BPE trained on the Python docs with the given pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = hf_pipeline(pre)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([python_docs_text()[:200_000]], trainer)
    model = tok.to_str()
    import json

    bpe = json.loads(model)["model"]
    vocab = sorted(bpe["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return (tokens, merges, types), tok


@pytest.fixture(scope="module")
def small_vocab():
    return train_vocab("smollm")[0]


def texts():
    docs = python_docs_text()
    return SAMPLES + [docs[i:i + 2000] for i in range(300_000, 340_000, 2000)]


def test_gpt2_pre_equals_transformers_gguf_loader(tmp_path):
    vocab, _ = train_vocab("gpt2")
    gguf_with_tokenizer(tmp_path / "tok.gguf", *vocab, pre="gpt2")
    ours = GGUFTokenizer(*vocab, pre="gpt2", bos_id=1, eos_id=2)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in texts():
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text[:60]
        assert ours.decode(ids) == text


def test_smollm_pre_equals_its_tokenizer_json_pipeline(tmp_path):
    vocab, reference = train_vocab("smollm")
    ours = GGUFTokenizer(*vocab, pre="smollm")
    for text in texts():
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, text[:60]
        assert ours.decode(ids) == text
    # the documented difference from transformers' GGUF loader, which ignores `pre`
    gguf_with_tokenizer(tmp_path / "tok.gguf", *vocab, pre="smollm")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    text = "object:\n\n1. The"
    pieces = [vocab[0][i] for i in ours.encode(text)]
    assert "ĊĊ" in pieces and [vocab[0][i] for i in hf.encode(text, add_special_tokens=False)].count("Ċ") == 2


def test_special_tokens_whole_or_spelled_out(small_vocab):
    tok = GGUFTokenizer(*small_vocab)
    end = tok.special_tokens["<|im_end|>"]
    assert tok.encode("hi<|im_end|>")[-1] == end
    assert end not in tok.encode("hi<|im_end|>", allowed_special="none")
    assert tok.decode(tok.encode("hi<|im_end|>", allowed_special="none")) == "hi<|im_end|>"


def test_byte_table_is_a_bijection_and_space_is_G():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_round_trip_and_save(small_vocab, tmp_path):
    from minillm.data.tokenizer import load_tokenizer

    tok = GGUFTokenizer(*small_vocab)
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, GGUFTokenizer)
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)


def test_unknown_pre_and_model_are_one_line(small_vocab):
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery' is not one minillm reads"):
        GGUFTokenizer(*small_vocab, pre="mystery")
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not one minillm reads"):
        GGUFTokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    assert "smollm" in PRE_TOKENIZERS


def test_real_smollm2_tokenizer_equals_transformers():
    path = cached_path("smollm2-135m-instruct")
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not in the cache ({path}); `minillm pull smollm2-135m-instruct` fetches it")
    reader = gguf.GGUFReader(str(path))

    def value(key):
        f = reader.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [int(f.parts[i][0]) for i in f.data]
        part = f.parts[f.data[0]]
        return bytes(part).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else int(part[0])

    from tokenizers import AddedToken, Tokenizer, models

    meta = {k: value(k) for k in reader.fields if k.startswith("tokenizer.ggml.")}
    ours = GGUFTokenizer.from_metadata(meta)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    reference = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    reference.pre_tokenizer = hf_pipeline("smollm")
    reference.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ours.special_tokens])
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in texts():
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text[:60]
        if not any(c.isspace() and d.isdigit() for c, d in zip(text, text[1:])):
            assert ids == hf.encode(text, add_special_tokens=False), text[:60]  # where the loaders agree
