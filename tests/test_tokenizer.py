"""Tokenizers: nanoGPT's character ordering, byte-level BPE against a naive reference, exact round trips."""

import json
import random
from collections import Counter

import pytest
import regex
import torch

from minillm.weights.checkpoint import write_json
from minillm.data.tokenizer import (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer, CharTokenizer,
                                    load_tokenizer, tokenizer_from_dict)

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


# --- split patterns, tie-breaks, special-token ids --------------------------------------------

def test_gpt4_pattern_splits_as_cl100k_does():
    # cl100k's documented behaviour: digits in groups of <= 3, a symbol joins the word after it,
    # newlines join the punctuation before them, contractions are case-insensitive.
    assert regex.findall(GPT4_SPLIT_PATTERN, "I'M (foo) 1234567.\n\n x") == [
        "I", "'M", " (", "foo", ")", " ", "123", "456", "7", ".\n\n", " x"]
    assert regex.findall(GPT2_SPLIT_PATTERN, "I'M (foo) 1234567") == [
        "I", "'", "M", " (", "foo", ")", " 1234567"]


def test_split_pattern_none_lets_merges_cross_words():
    text = "ab ab ab ab ab ab\n" * 20
    crossing = BPETokenizer.train(text, 270, pattern="none")
    assert crossing.pattern is None
    assert any(b"b a" in crossing.vocab[i] for i in crossing.merges.values())
    split = BPETokenizer.train(text, 270, pattern="gpt2")
    assert not any(b"b " in split.vocab[i] for i in split.merges.values())  # a space only starts a word
    for tok in (crossing, split, BPETokenizer.train(text, 270, pattern="gpt4")):
        assert tok.decode(tok.encode(TEXT)) == TEXT


def test_ties_go_to_the_smallest_pair_whatever_the_order_of_the_text():
    # Three pairs, each seen once: (a,b) < (c,d) < (x,y) as byte values. "First seen" would follow
    # the text order and give different merges for the two texts.
    for text in ("xy\nab\ncd\n", "cd\nxy\nab\n"):
        tok = BPETokenizer.train(text, 259)
        assert list(tok.merges) == [(97, 98), (99, 100), (120, 121)]


def test_special_token_ids_can_be_chosen_and_round_trip(tmp_path):
    eot = "<|endoftext|>"
    tok = BPETokenizer.train(TEXT, 300, special_tokens={eot: 299, "[MASK]": 310}, pattern="gpt4")
    assert len(tok.merges) == 300 - 256 - 2 and tok.vocab_size == 311  # ids 298, 300..309 unused
    assert tok.special_tokens == {eot: 299, "[MASK]": 310}
    ids = tok.encode(f"hi{eot}there[MASK]")
    assert ids.count(299) == 1 and ids[-1] == 310 and tok.decode(ids) == f"hi{eot}there[MASK]"
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary .*unused"):
        tok.decode([300])
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert back.to_dict() == tok.to_dict() and back.pattern == GPT4_SPLIT_PATTERN
    assert back.encode(TEXT + eot) == tok.encode(TEXT + eot)
    none = BPETokenizer.train(TEXT, 280, pattern="none")
    assert tokenizer_from_dict(json.loads(json.dumps(none.to_dict()))).pattern is None


def test_special_token_ids_must_not_collide_with_bytes_or_merges():
    with pytest.raises(ValueError, match=r"collide with the byte/merge ids 0..297 .*use ids >= 298"):
        BPETokenizer.train(TEXT, 300, special_tokens={"<s>": 297, "</s>": 299})
    with pytest.raises(ValueError, match="distinct ints >= 258"):
        BPETokenizer([(97, 98), (256, 99)], {"<s>": 100})
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer([], {"<s>": 300, "</s>": 300})
    with pytest.raises(ValueError, match="< 1048576"):  # not a billion-entry vocabulary
        tokenizer_from_dict({"type": "bpe", "merges": [], "special_tokens": {"<s>": 10**9}})


def test_tokenizer_json_from_before_split_patterns_and_ids_still_loads():
    old = {"type": "bpe", "merges": [[97, 98], [256, 99]], "special_tokens": {"[PAD]": 258, "[MASK]": 259}}
    tok = tokenizer_from_dict(old)  # no "pattern": GPT-2's, the only one then
    assert tok.pattern == GPT2_SPLIT_PATTERN and tok.special_tokens == {"[PAD]": 258, "[MASK]": 259}
    assert tok.encode("abc abc[MASK]") == [257, 32, 257, 259]
    assert tokenizer_from_dict({"type": "bpe", "merges": []}).vocab_size == 256


# --- streaming: encode_iterable == encode ------------------------------------------------------

TRICKY = [
    "no newline at the end",
    "line one\nline two\n\n\nthree   spaces   \n    indented\n\tTab\n",
    "  \n\n   \n word\n\n\nWord.\n\n",  # whitespace runs that a cut must not split
    "crlf\r\nlines\r\n\r\nend\r",
    "they're 'RE it's I'M don't\n'\nre",  # contractions: "'" and "re" must stay together
    "Naïve café déjà vu 東京タワー 🙂🙂 👩‍👩‍👧\u00a0nbsp\u2028sep\n12345 6789.\n",
    "a<|endoftext|>b\n<|endoftext|><|endoftext|>\n<|end",  # specials and a prefix of one at the end
    "x[MASK]\n[MASK] [MASK][MA\nSK]<s>\n",  # "<s>\n" below is a special containing a newline
]
SPECIALS = ("<|endoftext|>", "[MASK]", "<s>\n", "<|end")


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randrange(0, 12)))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
def test_bpe_encode_iterable_equals_encode_of_the_whole_text(pattern):
    # Whitespace runs in the training text: merges like "\n\n" make a wrongly cut run change the ids.
    ws = "x\n\n\ny  \n\n z\r\n\r\n" * 20
    tok = BPETokenizer.train(TEXT + "".join(TRICKY) + ws, 400, special_tokens=SPECIALS, pattern=pattern)
    rng = random.Random(0)
    for text in TRICKY + ["".join(TRICKY), TEXT]:
        whole = tok.encode(text)
        for i in range(len(text) + 1 if len(text) < 200 else 0):  # every two-piece split
            assert list(tok.encode_iterable([text[:i], text[i:]])) == whole, (text, i)
        for _ in range(20):  # random many-piece splits, and empty pieces
            assert list(tok.encode_iterable(_pieces(text, rng))) == whole
        assert list(tok.encode_iterable(text.splitlines(keepends=True))) == whole
        plain = list(tok.encode_iterable(_pieces(text, rng), allowed_special="none"))
        assert plain == tok.encode(text, allowed_special="none")


def test_char_encode_iterable_equals_encode_of_the_whole_text():
    text = "".join(TRICKY)
    tok = CharTokenizer.from_text(text, special_tokens=SPECIALS)
    rng = random.Random(0)
    for i in range(len(text) + 1):
        assert list(tok.encode_iterable([text[:i], text[i:]])) == tok.encode(text)
    for _ in range(50):
        assert list(tok.encode_iterable(_pieces(text, rng))) == tok.encode(text)
    with pytest.raises(ValueError, match="not in this CharTokenizer"):
        list(tok.encode_iterable(["ab", "c\u0394"]))


def test_streaming_holds_a_line_at_a_time_not_the_corpus():
    lines = [f"Line {i}: the quick brown fox, {i * 7} jumps.\n  and again\n" for i in range(2000)]
    tok = BPETokenizer.train("".join(lines[:200]), 300, special_tokens=("<|endoftext|>",))
    segments = list(tok.encode_stream(lines))
    assert [i for seg in segments for i in seg] == tok.encode("".join(lines))
    assert len(segments) > 1000 and max(len(tok.decode(s)) for s in segments) <= 2 * max(map(len, lines))
    # Without a split pattern only special tokens are safe cuts: one segment per document.
    none = BPETokenizer.train("".join(lines[:200]), 300, special_tokens=("<|endoftext|>",), pattern="none")
    docs = ["".join(lines[i:i + 100]) + "<|endoftext|>" for i in range(0, 2000, 100)]
    segments = list(none.encode_stream(docs))
    assert [i for seg in segments for i in seg] == none.encode("".join(docs)) and len(segments) == 20
