"""Tokenizer throughput: BPE training and encoding (char and byte-level BPE), in MB of text per second.

    pytest bench/test_tokenizer.py                                 timed, sizes from bench.common.SIZE
    pytest bench/test_tokenizer.py --benchmark-disable             each case once, correctness only

The text is the embedded python-docs corpus (no download): its first 64k characters when SIZE is
"quick", all ~470k otherwise. Tokenizers are pure Python, so GPU or not makes no difference here.
Each case checks its result once (exact round trip, vocabulary size) before it is timed.
"""

from __future__ import annotations

import time

import pytest

from bench import common
from minillm.data.dataset import load_text
from minillm.data.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict

QUICK = common.SIZE == "quick"
N_CHARS = 64_000 if QUICK else None
VOCABS = (512,) if QUICK else (512, 1024, 4096)


def _text() -> str:
    text = load_text("python-docs")
    return text[:N_CHARS] if N_CHARS else text


def _record(benchmark, n_bytes: int, first_call_s: float, **info) -> None:
    """MB/s from the timed rounds' median, or from the checking call when timing is disabled."""
    seconds = benchmark.stats.stats.median if benchmark.stats else first_call_s
    benchmark.extra_info.update(common.machine_info())
    benchmark.extra_info.update(info, text_mb=n_bytes / 1e6, seconds=seconds,
                                mb_per_s=n_bytes / 1e6 / seconds, timed=benchmark.stats is not None)


@pytest.mark.parametrize("vocab_size", VOCABS)
def test_bpe_train(benchmark, vocab_size):
    text = _text()
    n_bytes = len(text.encode("utf-8"))
    t0 = time.perf_counter()
    tok = BPETokenizer.train(text, vocab_size)
    first = time.perf_counter() - t0
    assert tok.vocab_size == vocab_size
    assert tok.decode(tok.encode(text)) == text
    # Training is deterministic: every timed round must learn the same merges.
    benchmark.pedantic(BPETokenizer.train, args=(text, vocab_size), rounds=3, iterations=1)
    _record(benchmark, n_bytes, first, vocab_size=vocab_size, merges=len(tok.merges))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode(benchmark, kind):
    """Encoding with a cold cache: what preparing a dataset does, one pass over fresh text."""
    text = _text()
    n_bytes = len(text.encode("utf-8"))
    trained = CharTokenizer.from_text(text) if kind == "char" else BPETokenizer.train(text, 1024)
    saved = trained.to_dict()

    def fresh():  # a new tokenizer per round, so the BPE chunk cache starts empty each time
        return (tokenizer_from_dict(saved), text), {}

    def encode(tok, text):
        return tok.encode(text)

    t0 = time.perf_counter()
    ids = encode(*fresh()[0])
    first = time.perf_counter() - t0
    assert trained.decode(ids) == text
    out = benchmark.pedantic(encode, setup=fresh, rounds=3, iterations=1)
    assert out == ids
    _record(benchmark, n_bytes, first, tokenizer=kind, vocab_size=trained.vocab_size,
            tokens=len(ids), bytes_per_token=n_bytes / len(ids))
