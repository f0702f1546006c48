"""Tokenizers: nanoGPT's character ordering, byte-level BPE against a naive reference, exact round trips."""

import json
import random
from collections import Counter

import pytest
import regex
import torch

from minillm.checkpoint import write_json
from minillm.data.tokenizer import (GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer, load_tokenizer,
                               tokenizer_from_dict)

# A small text with repeated words, overlapping runs ("aaaa", spaces) and multi-byte characters.
TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs!\n"
    "aaaa aaaaaa  aa   baa  \n\n"
    "Naïve café — déjà vu, déjà vu. 東京 東京 東京タワー 🙂🙂 🙂.\n"
    "def f(x):\n    return x ** 2  # square\n\n"
    "It's what we'll do: they're here, you've been, I'm sure, he'd go.\n"
) * 3 + "numbers 1234 12345 2024 and more 1234.\n"


def naive_bpe(text: str, n_merges: int):
    """The textbook algorithm: recount every pair of every chunk after each merge, O(n · merges).

    Ties go to the smallest pair, the rule BPETokenizer.train documents.
    """
    chunks = [list(c.encode("utf-8")) for c in regex.findall(GPT2_SPLIT_PATTERN, text)]
    merges = []
    for k in range(n_merges):
        stats = Counter(p for ch in chunks for p in zip(ch, ch[1:]))
        if not stats:
            break
        pair = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        new_chunks = []
        for ch in chunks:
            out, i = [], 0
            while i < len(ch):
                if i + 1 < len(ch) and (ch[i], ch[i + 1]) == pair:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(ch[i])
                    i += 1
            new_chunks.append(out)
        chunks = new_chunks
        merges.append(pair)
    return merges, [i for ch in chunks for i in ch]


# --- CharTokenizer -----------------------------------------------------------------------------

def test_char_ids_follow_nanogpt_sorted_order():
    text = "hello world\nHELLO!"
    tok = CharTokenizer.from_text(text, special_tokens=("[PAD]", "[MASK]"))
    chars = sorted(set(text))  # nanoGPT's prepare.py
    assert tok.encode(text) == [chars.index(c) for c in text]
    assert tok.special_tokens == {"[PAD]": len(chars), "[MASK]": len(chars) + 1}
    assert tok.vocab_size == len(chars) + 2
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_error_names_it_and_its_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 3"):
        tok.encode("abcz")
    with pytest.raises(ValueError, match=r"position 7"):  # offsets count the special token's chars
        tok2 = CharTokenizer.from_text("abc", special_tokens=("<s>",))
        tok2.encode("ab<s>ccz")


def test_char_special_tokens_are_atomic_unless_disallowed():
    tok = CharTokenizer.from_text("ab[]MASK", special_tokens=("[MASK]",))
    mask = tok.special_tokens["[MASK]"]
    assert tok.encode("a[MASK]b") == [tok.stoi["a"], mask, tok.stoi["b"]]
    assert tok.encode("a[MASK]b", allowed_special="none") == [tok.stoi[c] for c in "a[MASK]b"]
    assert tok.decode([mask]) == "[MASK]"
    with pytest.raises(ValueError, match="does not have"):
        tok.encode("a", allowed_special={"[CLS]"})


def test_char_decode_rejects_ids_outside_vocab_and_accepts_tensors():
    tok = CharTokenizer.from_text("abc")
    assert tok.decode(torch.tensor([2, 0, 1])) == "cab"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([0, 3])


def test_char_save_load_round_trip(tmp_path):
    tok = CharTokenizer.from_text("héllo\x00 wörld 🙂", special_tokens=("[PAD]", "[MASK]"))
    tok.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(back, CharTokenizer)
    assert back.to_dict() == tok.to_dict()
    assert back.encode("wörld[MASK]🙂") == tok.encode("wörld[MASK]🙂")


# --- BPETokenizer ------------------------------------------------------------------------------

def test_bpe_training_matches_naive_reference():
    n_merges = 80
    tok = BPETokenizer.train(TEXT, vocab_size=256 + n_merges)
    ref_merges, ref_tokens = naive_bpe(TEXT, n_merges)
    assert list(tok.merges) == ref_merges
    # Encoding (apply merges by rank) gives the same tokens as training's sequential merging.
    assert tok.encode(TEXT) == ref_tokens
    assert tok.vocab_size == 256 + n_merges


def test_bpe_training_is_deterministic_and_stops_when_nothing_is_left_to_merge():
    a = BPETokenizer.train(TEXT, 400)
    b = BPETokenizer.train(TEXT, 400)
    assert a.to_dict() == b.to_dict()
    tiny = BPETokenizer.train("ab ab", 300)  # chunks "ab", " ab": at most 2 merges exist
    assert len(tiny.merges) == 2 and tiny.encode("ab ab") == [256, 257]


def test_bpe_round_trips_anything():
    tok = BPETokenizer.train(TEXT, 320)
    samples = ["", "\x00\x00nul\x00", "emoji 👩‍👩‍👧 🙂🙃", "中文字符 日本語 한국어", "tabs\t\r\n  \u00a0nbsp",
               "ü" * 50, "aaaaaaaaaaaaaaaaaaaaaaa", TEXT]
    rng = random.Random(0)
    for _ in range(20):  # random code points, lone surrogates (not encodable as UTF-8) excluded
        cps = [rng.choice([rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)])
               for _ in range(rng.randrange(1, 60))]
        samples.append("".join(map(chr, cps)))
    for s in samples:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == s.encode("utf-8")


def test_bpe_compresses_the_text_it_was_trained_on():
    tok = BPETokenizer.train(TEXT, 356)
    assert len(tok.encode(TEXT)) < 0.5 * len(TEXT.encode("utf-8"))


def test_bpe_special_tokens_atomic_and_never_merged_into():
    eot = "<|endoftext|>"
    text = eot.join([TEXT, "hello world <|endoftext", TEXT]) + eot
    tok = BPETokenizer.train(text, 300, special_tokens=(eot, "[MASK]"))
    assert tok.vocab_size == 300
    assert tok.special_tokens == {eot: 298, "[MASK]": 299}
    ids = tok.encode(f"hi{eot}there[MASK]")
    assert ids.count(298) == 1 and ids.count(299) == 1
    assert tok.decode(ids) == f"hi{eot}there[MASK]"
    # As plain text the same string is ordinary bytes (and merges); no special id appears.
    plain = tok.encode(f"hi{eot}", allowed_special="none")
    assert 298 not in plain and tok.decode(plain) == f"hi{eot}"
    assert tok.encode(eot, allowed_special={"[MASK]"}) == tok.encode(eot, allowed_special="none")
    # Training text was cut around specials: no learned token contains one.
    assert not any(eot.encode() in tok.vocab[i] for i in tok.merges.values())


def test_bpe_save_load_is_exact(tmp_path):
    tok = BPETokenizer.train(TEXT, 330, special_tokens=("[PAD]", "[MASK]"))
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path)  # a folder holding tokenizer.json, like a checkpoint
    assert back.to_dict() == tok.to_dict()
    assert back.encode(TEXT + "[MASK]") == tok.encode(TEXT + "[MASK]")
    # JSON with sorted keys (how checkpoints write it) loads the same.
    write_json(tmp_path / "sorted.json", tok.to_dict())
    again = tokenizer_from_dict(json.loads((tmp_path / "sorted.json").read_text()))
    assert again.to_dict() == tok.to_dict()
    assert isinstance(json.loads((tmp_path / "tokenizer.json").read_text())["merges"][0], list)


def test_bpe_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train(TEXT, 257, special_tokens=("a", "b"))
    with pytest.raises(ValueError, match="earlier ids"):
        BPETokenizer([(0, 300)])
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_dict({"type": "wordpiece"})
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer.train(TEXT, 300, special_tokens=("[X]", "[X]"))
    with pytest.raises(ValueError, match="outside"):
        BPETokenizer([]).decode([256])
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/tokenizer.json")
