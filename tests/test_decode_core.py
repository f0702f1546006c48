"""The decode core (minillm/generate/core.py), its cache verbs, the FFN seam, and the one stop-string place.

Every token-producing loop runs the same two functions, `prefill` and `decode_step`; these tests hold
them to the modules' own forward, and check that a layer the flat fast path does not know makes it
step aside (the modules run it) instead of raising.
"""

import pytest
import torch
import torch.nn as nn

from minillm.data.tokenizer import CharTokenizer
from minillm.generate.cache import SlotKVCache
from minillm.generate.core import decode_step, extend, positions_from_mask, prefill
from minillm.generate.flat import FlatDecoder
from minillm.generate.sampling import generate, left_pad
from minillm.generate.text import StopText
from minillm.model.config import ModelConfig
from minillm.model.layers import FeedForward, make_ffn
from minillm.model.transformer import Block, CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"


def tiny_model(seed=0, vocab_size=40, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32), **kw})
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        model.transformer.tok_emb.weight.mul_(20.0)  # clear greedy decisions (see test_generate.py)
    return model


class TwoExperts(nn.Module):
    """A stand-in for a mixture-of-experts FFN: nothing called up/gate/down at its top level."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.experts = nn.ModuleList([a, b])

    def forward(self, x):  # (B, T, C) -> (B, T, C): the average of two FFNs
        return 0.5 * (self.experts[0](x) + self.experts[1](x))


def with_experts(model):
    for block in model.transformer.blocks:
        other = make_ffn(model.cfg)
        other.load_state_dict({k: v.flip(0) for k, v in block.ffn.state_dict().items()})
        block.ffn = TwoExperts(block.ffn, other)
    return model


# --- the FFN seam ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ffn_bound_forward_is_bit_identical_to_its_forward(activation):
    cfg = ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16, activation=activation)
    ffn = make_ffn(cfg)
    assert type(ffn) is FeedForward
    x = torch.randn(3, 5, 16)
    assert torch.equal(ffn.bound_forward()(x), ffn(x))


def test_flat_decode_runs_an_unknown_ffn_through_its_own_forward():
    model = with_experts(tiny_model(positional="rotary", n_kv_head=1))
    assert FlatDecoder.build(model) is not None  # the rest of the block is still flattened
    idx, mask = left_pad([[3, 4, 5, 6, 7], [1, 2]])
    want = generate(model, idx, 40, 0.0, key_padding_mask=mask)  # past block_size: re-prefills too
    assert torch.equal(generate(model, idx, 40, 0.0, key_padding_mask=mask, flat_decode=True), want)


class LoggingBlock(Block):
    """A block of a type FlatDecoder does not know (a subclass is another type)."""


def test_flat_decode_steps_aside_for_an_unknown_block_type():
    model = tiny_model()
    old = model.transformer.blocks[1]
    new = LoggingBlock(model.cfg, old.attn.rotary)
    new.load_state_dict(old.state_dict())
    model.transformer.blocks[1] = new.eval()
    assert FlatDecoder.build(model) is None
    idx = torch.tensor([[3, 4, 5]])
    assert torch.equal(generate(model, idx, 10, 0.0, flat_decode=True), generate(model, idx, 10, 0.0))


def complete(engine, prompts, params, timeout=60):
    """engine.complete, but a dead engine thread fails the test instead of hanging it."""
    from minillm.generate.batching import Request

    done, events = __import__("threading").Event(), {}
    req = Request(prompts, params, stream=False)

    def emit(ev):
        events[ev.index] = ev
        if len(events) == req.n_rows:
            done.set()
    req.emit = emit
    engine.submit(req)
    assert done.wait(timeout), "the engine stopped serving"
    return [events[i] for i in range(req.n_rows)]


def test_batch_engine_keeps_serving_a_model_with_an_unknown_ffn():
    from minillm.generate.batching import BatchEngine, SamplingParams

    tok = CharTokenizer.from_text(TEXT)
    model = with_experts(tiny_model(vocab_size=tok.vocab_size))
    engine = BatchEngine(model, tok, max_batch_size=3, flat_decode=True).start()
    try:
        prompts = [tok.encode("the quick"), tok.encode("lazy dog")]
        first = complete(engine, prompts, SamplingParams(max_tokens=10, temperature=0.0))
        second = complete(engine, prompts[:1], SamplingParams(max_tokens=5, temperature=0.0))
        assert engine.alive
    finally:
        engine.shutdown()
    for p, ev in zip(prompts, first):
        ref = generate(model, torch.tensor([p]), 10, temperature=0.0)[0, len(p):]
        assert ev.finish_reason == "length" and ev.text == tok.decode(ref.tolist())
    assert second[0].text == first[0].text[:5]


# --- the cache verbs and the core's functions, against one forward of the whole sequence ----------


def full_logits(model, idx, mask=None):
    """Logits (B, T, V) of one uncached forward: what every cached path must reproduce."""
    with torch.no_grad():
        pos = None if mask is None else positions_from_mask(mask)
        return model(idx, positions=pos, key_padding_mask=mask)[0]


@pytest.mark.parametrize("kw", [dict(positional="learned"), dict(positional="rotary", n_kv_head=1)])
def test_prefill_decode_step_and_extend_equal_one_whole_forward(kw):
    model = tiny_model(**kw)
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4]])
    want = full_logits(model, idx, mask)  # (2, 10, V)
    flat = FlatDecoder.build(model, native=False)
    for f in (None, flat):
        cache = model.new_cache(2)
        with torch.no_grad():
            got = [prefill(model, idx[:, :6], cache, mask[:, :6])]  # (B, V) at position 5
            got += [decode_step(model, idx[:, t:t + 1], cache, f) for t in (6, 7)]
            tail = extend(model, idx[:, 8:], cache)  # (B, 2, V): two tokens at once
        torch.testing.assert_close(torch.stack(got, 1), want[:, 5:8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tail, want[:, 8:], atol=1e-5, rtol=1e-5)
        assert cache.length == 10


@pytest.mark.parametrize("window", [None, 5])
def test_rewind_forgets_a_rejected_draft(window):
    model = tiny_model(positional="rotary", sliding_window=window)
    idx = torch.randint(0, 40, (2, 14), generator=torch.Generator().manual_seed(0))
    draft = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(1))
    want = full_logits(model, idx)
    cache = model.new_cache(2, spare=3)  # a window cache keeps 3 more keys, so it can go back 3
    with torch.no_grad():
        prefill(model, idx[:, :10], cache)
        extend(model, draft, cache)  # a draft that turns out wrong ...
        cache.rewind(10)  # ... is forgotten
        got = extend(model, idx[:, 10:], cache)
    torch.testing.assert_close(got, want[:, 10:], atol=1e-5, rtol=1e-5)


def test_a_window_cache_refuses_to_rewind_past_the_keys_it_dropped():
    model = tiny_model(positional="rotary", sliding_window=5)
    cache = model.new_cache(1)  # keeps only the last W-1 = 4 keys
    with torch.no_grad():
        prefill(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), cache)
    with pytest.raises(ValueError, match="sliding-window"):
        cache.rewind(7)
    assert cache.length == 8
    cache.rewind(0)  # emptying is always possible
    assert cache.length == 0


def test_reorder_makes_rows_follow_an_index():
    model = tiny_model(positional="rotary")
    idx = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    index = torch.tensor([2, 0, 0])
    want = full_logits(model, idx[index])
    cache = model.new_cache(3)
    with torch.no_grad():
        prefill(model, idx[:, :6], cache)
        cache.reorder(index)  # beam search: survivors continue other rows' prefixes
        got = extend(model, idx[index, 6:], cache)
    torch.testing.assert_close(got, want[:, 6:], atol=1e-5, rtol=1e-5)


def test_slot_cache_rows_of_their_own_length_through_the_same_core():
    model = tiny_model(positional="learned")
    cfg = model.cfg
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    cache = SlotKVCache(cfg.n_layer, 4, cfg.kv_heads, cfg.block_size, cfg.head_dim)
    with torch.no_grad():
        for slot, r in enumerate(rows):  # each prompt alone into its slot, as the engine does
            cache.select(slot, 1)
            prefill(model, torch.tensor([r[:-1]]), cache)
        cache.select(0, 2)  # ragged: lengths 5 and 2
        got = decode_step(model, torch.tensor([[r[-1]] for r in rows]), cache)  # (2, V)
        assert cache.lengths[:2] == [6, 3]
        cache.rewind([5, 2])  # each row back by one ...
        again = decode_step(model, torch.tensor([[r[-1]] for r in rows]), cache)  # ... and the same again
    for b, r in enumerate(rows):
        torch.testing.assert_close(got[b], full_logits(model, torch.tensor([r]))[0, -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again)


# --- one place for stop strings: StopText ---------------------------------------------------------


class Bytes:
    """A byte-level tokenizer: token = one UTF-8 byte, so a character may arrive in pieces."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(row, data: bytes):
    pieces = []
    for b in data:
        if row.stopped:
            break
        row.add(b)
        pieces.append(row.take())
    return pieces + [row.take(final=True)]


def test_stop_text_holds_back_half_characters_and_stop_prefixes():
    row = StopText(Bytes(), ["\n\n"])
    pieces = feed(row, "né\nx\n\nafter".encode())
    assert row.stopped and row.text == "né\nx"
    assert "".join(pieces) == "né\nx"
    assert all("\ufffd" not in p for p in pieces)  # é (2 bytes) is shown whole or not at all
    assert pieces[pieces.index("n") + 1] == ""  # after é's first byte: nothing yet
    assert pieces[3] == ""  # "né\n": the "\n" might begin the stop string, held back


def test_stop_text_refuses_an_empty_stop():
    with pytest.raises(ValueError, match="non-empty"):
        StopText(Bytes(), ["a", ""])


def test_generate_text_and_the_engine_end_a_completion_at_the_same_place():
    from minillm.generate.batching import BatchEngine, SamplingParams
    from minillm.generate.sampling import generate_text

    tok = CharTokenizer.from_text(TEXT)
    model = tiny_model(vocab_size=tok.vocab_size)
    [free] = generate_text(model, tok, ["the "], 20, temperature=0.0)
    stop = free[6:8]
    pieces = []
    [text] = generate_text(model, tok, ["the "], 20, temperature=0.0, stop=[stop],
                           stream=lambda i, p: pieces.append(p))
    engine = BatchEngine(model, tok, max_batch_size=2).start()
    try:
        [ev] = complete(engine, [tok.encode("the ")], SamplingParams(20, 0.0, stop=(stop,)))
    finally:
        engine.shutdown()
    assert text == "".join(pieces) == ev.text == free[:free.index(stop)] and ev.finish_reason == "stop"


def test_slot_cache_reorder_moves_rows_with_their_lengths():
    model = tiny_model(positional="learned")
    cfg = model.cfg
    rows = [[3, 4, 5, 6, 7], [9, 10, 11]]
    cache = SlotKVCache(cfg.n_layer, 2, cfg.kv_heads, cfg.block_size, cfg.head_dim)
    with torch.no_grad():
        for slot, r in enumerate(rows):
            cache.select(slot, 1)
            prefill(model, torch.tensor([r[:-1]]), cache)
        cache.select(0, 2)
        cache.reorder(torch.tensor([1, 0]))
        assert cache.lengths == [2, 4]
        got = decode_step(model, torch.tensor([[rows[1][-1]], [rows[0][-1]]]), cache)
    for b, r in enumerate(rows[::-1]):
        torch.testing.assert_close(got[b], full_logits(model, torch.tensor([r]))[0, -1], atol=1e-5, rtol=1e-5)


def test_a_seq2seq_decoder_runs_through_the_same_core():
    from minillm.generate.core import WithSource
    from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig

    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(model=ModelConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2,
                                                    n_embd=32, positional="rotary"))).eval()
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])  # row 1 padded (pad_id 0)
    tgt = torch.tensor([[1, 11, 12, 13, 14], [1, 15, 16, 17, 18]])
    with torch.no_grad():
        want = model(src, tgt)[0]  # (2, 5, V) teacher forcing, one pass
        dec, cache = WithSource(model, src), model.new_cache(2)
        got = [prefill(dec, tgt[:, :2], cache)] + [decode_step(dec, tgt[:, t:t + 1], cache) for t in (2, 3)]
        index = torch.tensor([1, 0])  # beam search: rows follow an index, sources with them
        cache.reorder(index)
        dec.reorder(index)
        last = decode_step(dec, tgt[index, 4:5], cache)
    torch.testing.assert_close(torch.stack(got, 1), want[:, 1:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, want[index, 4], atol=1e-5, rtol=1e-5)
