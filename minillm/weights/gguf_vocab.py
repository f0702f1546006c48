"""A minillm tokenizer as GGUF's `tokenizer.ggml.*` metadata: the vocabulary llama.cpp tokenizes with.

The other half of tokenizer_gguf.py (which reads these keys). A GGUF file carries byte-level BPE as

    tokenizer.ggml.model       "gpt2"  (byte-level BPE; llama.cpp's LLAMA_VOCAB_TYPE_BPE)
    tokenizer.ggml.pre         the pre-tokenizer's name: which regexes split text before BPE
    tokenizer.ggml.tokens      one string per id, bytes spelled with GPT-2's byte table (space = "Ġ")
    tokenizer.ggml.token_type  1 normal, 3 control (special tokens), 4 user-defined, 5 unused
    tokenizer.ggml.merges      "Ġ t" = merge "Ġ" and "t", in priority order
    tokenizer.ggml.bos_token_id / eos_token_id, add_bos_token, and tokenizer.chat_template

Three of minillm's tokenizers can be written so:
  - BPETokenizer (trained here): ids 0-255 are bytes, each merge (a, b) -> id is the string pair
    "tokens[a] tokens[b]", so llama.cpp's string-pair merges replay minillm's id-pair merges in the
    same order. Its split pattern names the pre-tokenizer: GPT-2's is llama.cpp's "gpt-2", GPT-4's
    (cl100k) is "llama-bpe" (Llama 3 took it from tiktoken). "none" or a custom regex has no name
    llama.cpp knows, and is refused.
  - GGUFTokenizer (read from a GGUF file): written back as it came.
  - HFTokenizer: a tokenizer.json whose model is byte-level BPE and whose pre-tokenizer is one of
    GPT-2's ByteLevel ("gpt-2"), SmolLM2's Digits + ByteLevel ("smollm"), or Llama 3's Split +
    ByteLevel ("llama-bpe").
A CharTokenizer is refused: llama.cpp has no "one id per character" vocabulary, and its byte-level
BPE must spell every byte, which a character vocabulary cannot.

Ids the model has but the tokenizer does not use (a vocabulary padded to a round size, a gap below
a special token's chosen id) become "<|unused{id}|>" of type 5, so the list has one string per row
of the token embedding, as llama.cpp requires.
"""

from __future__ import annotations

import json

from minillm.data.tokenizer_bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer
from minillm.data.tokenizer_char import CharTokenizer
from minillm.data.tokenizer_gguf import LLAMA3_SPLIT, GGUFTokenizer, bytes_to_unicode
from minillm.data.tokenizer_hf import HFTokenizer

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types
BPE_PRE = {GPT2_SPLIT_PATTERN: "gpt-2", GPT4_SPLIT_PATTERN: "llama-bpe"}  # minillm split pattern -> pre


def _spell(b: bytes) -> str:
    """Bytes as GPT-2's byte-level BPE spells them: each byte one printable character."""
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def _from_bpe(tok: BPETokenizer) -> dict:
    if tok.pattern not in BPE_PRE:
        raise ValueError("a BPE tokenizer whose split pattern is not GPT-2's or GPT-4's cannot go into GGUF: "
                         "llama.cpp only knows named pre-tokenizers")
    tokens, types = [], []
    specials = set(tok.special_tokens.values())
    for i, b in enumerate(tok.vocab):
        if b is None:  # an id below a special token's chosen id that nothing uses
            tokens.append(f"<|unused{i}|>"), types.append(UNUSED)
        elif i in specials:  # written as it is typed, matched whole by llama.cpp as minillm does
            tokens.append(b.decode("utf-8")), types.append(CONTROL)
        else:
            tokens.append(_spell(b)), types.append(NORMAL)
    merges = [f"{tokens[a]} {tokens[b]}" for a, b in tok.merges]  # dict order = learned order = rank
    eos = tok.special_tokens.get("<|endoftext|>")  # GPT-2's convention: one token both starts and ends
    return dict(tokens=tokens, token_type=types, merges=merges, pre=BPE_PRE[tok.pattern], bos=eos, eos=eos)


def _from_gguf(tok: GGUFTokenizer) -> dict:
    # the reader calls GPT-2's split "gpt2"; llama.cpp's name for it is "gpt-2"
    pre = {"gpt2": "gpt-2"}.get(tok.pre, tok.pre)
    return dict(tokens=list(tok.tokens), token_type=list(tok.token_types), merges=list(tok.merges), pre=pre,
                bos=tok.bos_id, eos=tok.eos_id)


def _hf_pre(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json "pre_tokenizer", or None if it has none."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def _from_hf(tok: HFTokenizer) -> dict:
    data = json.loads(tok._json)
    model = data["model"]
    pre = _hf_pre(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ValueError("this tokenizer.json is not byte-level BPE with a pre-tokenizer llama.cpp names "
                         "(GPT-2's ByteLevel, SmolLM2's Digits + ByteLevel, Llama 3's Split): GGUF cannot hold it")
    vocab = {t: i for t, i in model["vocab"].items()}
    added = {t["content"]: (t["id"], CONTROL if t.get("special") else USER_DEFINED) for t in data.get("added_tokens") or []}
    size = max([*vocab.values(), *(i for i, _ in added.values())], default=-1) + 1
    tokens, types = [f"<|unused{i}|>" for i in range(size)], [UNUSED] * size
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for t, (i, kind) in added.items():
        tokens[i], types[i] = t, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]  # both JSON forms
    ids = {t: i for i, t in enumerate(tokens)}
    return dict(tokens=tokens, token_type=types, merges=merges, pre=pre,
                bos=ids.get(tok.bos_token), eos=ids.get(tok.eos_token))


def gguf_vocab(tokenizer, n_vocab: int) -> dict:
    """{tokens, token_type, merges, pre, bos, eos} for a model with `n_vocab` token embeddings.

    ValueError (one line) for a tokenizer GGUF cannot express, or one with more ids than the model."""
    if isinstance(tokenizer, BPETokenizer):
        v = _from_bpe(tokenizer)
    elif isinstance(tokenizer, GGUFTokenizer):
        v = _from_gguf(tokenizer)
    elif isinstance(tokenizer, HFTokenizer):
        v = _from_hf(tokenizer)
    elif isinstance(tokenizer, CharTokenizer):
        raise ValueError("a character-level tokenizer cannot go into GGUF: llama.cpp's vocabularies are "
                         "byte-level BPE or SentencePiece, which must spell every byte; train a BPE tokenizer")
    else:
        raise ValueError(f"a {type(tokenizer).__name__} cannot go into GGUF (minillm writes BPE tokenizers)")
    n = len(v["tokens"])
    if n > n_vocab:
        raise ValueError(f"the tokenizer has {n} ids but the model only {n_vocab} token embeddings")
    v["tokens"] += [f"<|unused{i}|>" for i in range(n, n_vocab)]  # padding rows the tokenizer never emits
    v["token_type"] += [UNUSED] * (n_vocab - n)
    return v
