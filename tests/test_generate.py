"""Generation: the KV cache changes the cost, never the tokens; padding, filters, stops, cropping."""

import threading

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.generate.sampling import (generate, generate_text, left_pad, sample_next, top_k_filter,
                              top_p_filter)
from minillm.model.transformer import CausalLM, MaskedLM
from minillm.data.tokenizer import CharTokenizer



pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"


def tiny_model(positional="sinusoidal", block_size=32, vocab_size=40, seed=0, emb_scale=20.0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                                positional=positional), **kw})
    # a random model's logits are nearly flat; scale the head so greedy decisions are not near-ties
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        model.transformer.tok_emb.weight.mul_(emb_scale)
    return model


def prompt(B=2, T=7, vocab_size=40, seed=1):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 10, 0.9)])
def test_cached_equals_uncached(positional, temperature, top_k, top_p):
    model = tiny_model(positional)
    idx = prompt()
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        outs.append(generate(model, idx, 20, temperature, top_k, top_p, use_cache=use_cache, generator=g))
    assert outs[0].shape == (2, 7 + 20)
    assert torch.equal(outs[0][:, :7], idx)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("window_stride", [None, 1, 3, 16])
def test_past_block_size_cached_equals_uncached(window_stride):
    model = tiny_model(block_size=16)
    idx = prompt(T=10)
    cached = generate(model, idx, 30, temperature=0.0, use_cache=True, window_stride=window_stride)
    uncached = generate(model, idx, 30, temperature=0.0, use_cache=False, window_stride=window_stride)
    assert cached.shape == (2, 40)
    assert torch.equal(cached, uncached)


# --- past block_size: what the model conditions on, written out from the definition ------------
# These sample at temperature 1 from an unscaled random model: greedy decoding of a random model soon
# repeats one token forever, and then every context predicts the same thing, whatever the stride.

def context_length(width: int, block_size: int, stride: int) -> int:
    """How many of the last `width` columns the next token is predicted from (sampling.py's docstring):
    all of them up to block_size; past it T-K+1, T-K+2, ..., T, then T-K+1 again, every K tokens."""
    if width <= block_size:
        return width
    return block_size - stride + 1 + (width - block_size - 1) % stride


@torch.no_grad()
def reference_sample(model, rows: list[list[int]], max_new_tokens: int, stride: int, seed: int) -> list[list[int]]:
    """Continue left-padded `rows` without any cache: each step runs the model on each row ALONE, on
    that row's real tokens among the last context_length(...) columns of the batch, then draws the
    batch's tokens with one sample_next call (so the generator is used exactly as generate uses it)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [list(r) for r in rows]
    width = max(len(r) for r in rows)  # columns of the left-padded batch
    for step in range(max_new_tokens):
        c = context_length(width + step, model.cfg.block_size, stride)
        logits = torch.cat([model(torch.tensor([s[-c:]]))[0][:, -1] for s in seqs])  # (B, V)
        for s, t in zip(seqs, sample_next(logits, 1.0, generator=g).tolist()):
            s.append(t)
    return [s[len(r):] for s, r in zip(seqs, rows)]


def sampled(model, idx, n, seed, **kw):
    return generate(model, idx, n, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_stride_1_is_nanogpts_sliding_window(positional, use_cache):
    # the old behaviour, written as nanoGPT's sample loop: always the last block_size tokens
    model = tiny_model(positional, block_size=16, emb_scale=1.0)
    idx = prompt(T=10)
    seq, g = idx.clone(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(30):
            nxt = sample_next(model(seq[:, -16:])[0][:, -1], 1.0, generator=g)  # (B,)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(sampled(model, idx, 30, 7, use_cache=use_cache, window_stride=1), seq)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("window_stride", [None, 2, 5, 16])
def test_stride_k_conditions_on_the_defined_context(positional, window_stride):
    model = tiny_model(positional, block_size=16, emb_scale=1.0)
    idx = prompt(T=10)
    out = sampled(model, idx, 60, 7, window_stride=window_stride)[:, 10:].tolist()  # 70 tokens > 4 windows
    assert out == reference_sample(model, idx.tolist(), 60, window_stride or 16 // 4, seed=7)
    assert out != reference_sample(model, idx.tolist(), 60, 1, seed=7)  # the stride matters here


@pytest.mark.parametrize("window_stride", [None, 1, 5])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_past_block_size(window_stride, use_cache):
    # rows share the batch's columns, so a short row's context is its real tokens among them
    model = tiny_model("learned", block_size=16, emb_scale=1.0)
    rows = [prompt(1, T, seed=T)[0].tolist() for T in (3, 9, 6)]
    idx, mask = left_pad(rows, pad_id=5)
    out = sampled(model, idx, 50, 7, use_cache=use_cache, key_padding_mask=mask, window_stride=window_stride)
    assert out[:, 9:].tolist() == reference_sample(model, rows, 50, window_stride or 4, seed=7)


@pytest.mark.parametrize("window_stride", [0, 17, 2.0, True])
def test_window_stride_out_of_range_is_refused(window_stride):
    with pytest.raises(ValueError, match="window_stride"):
        generate(tiny_model(block_size=16), prompt(T=4), 2, window_stride=window_stride)


def test_long_prompt_is_cropped_to_block_size():
    model = tiny_model(block_size=16)
    idx = prompt(T=40)
    full = generate(model, idx, 8, temperature=0.0)
    cropped = generate(model, idx[:, -16:], 8, temperature=0.0)
    assert full.shape == (2, 48)
    assert torch.equal(full[:, 40:], cropped[:, 16:])


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(positional, use_cache):
    model = tiny_model(positional)
    rows = [prompt(1, T, seed=T)[0].tolist() for T in (3, 9, 6)]
    idx, mask = left_pad(rows, pad_id=5)
    assert mask.sum(1).tolist() == [3, 9, 6] and mask[:, -1].all()
    batched = generate(model, idx, 12, temperature=0.0, use_cache=use_cache, key_padding_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, torch.tensor([r]), 12, temperature=0.0, use_cache=use_cache)
        assert batched[i, -12:].tolist() == alone[0, -12:].tolist()


def test_right_padding_is_refused():
    model = tiny_model()
    idx = prompt(T=4)
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    with pytest.raises(ValueError, match="LEFT"):
        generate(model, idx, 2, key_padding_mask=mask)


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    out = top_k_filter(logits, 2)
    kept = torch.isfinite(out)
    assert kept.tolist() == [[False, True, False, False, True], [False, False, False, True, True]]
    torch.testing.assert_close(out[kept], logits[kept])  # kept logits are unchanged
    assert torch.isfinite(top_k_filter(logits, 100)).all()  # k larger than V keeps everything


@pytest.mark.parametrize("p,expected", [(0.4, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_filter_keeps_the_smallest_nucleus(p, expected):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    order = torch.tensor([2, 0, 3, 1])  # shuffle the vocabulary so sorting is exercised
    logits = probs.log()[:, order]
    kept = torch.isfinite(top_p_filter(logits, p))[0]
    assert sorted(order[kept].tolist()) == expected


def test_sampling_respects_filters_and_greedy():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(picks.tolist()) == {1, 3}
    assert sample_next(logits[:1], temperature=0.0).item() == 3
    assert sample_next(logits[:1], temperature=1.0, top_k=1, generator=g).item() == 3
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0.0)


def test_stop_strings_and_streaming():
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_model(vocab_size=tok.vocab_size, block_size=64)
    [free] = generate_text(model, tok, ["the "], 40, temperature=0.0)
    assert len(free) == 40
    stop = free[10:13]  # a string the greedy continuation is known to produce
    pieces = []
    [stopped] = generate_text(model, tok, ["the "], 40, temperature=0.0, stop=[stop, "never-seen"],
                              stream=lambda i, piece: pieces.append(piece))
    assert stopped == free[: free.index(stop)]
    assert "".join(pieces) == stopped  # the stream never shows the stop string or anything after it


def test_generate_text_batch_of_prompts_matches_single():
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_model(vocab_size=tok.vocab_size, block_size=64)
    prompts = ["a", "the lazy dog", "fox "]
    batch = generate_text(model, tok, prompts, 15, temperature=0.0)
    assert batch == [generate_text(model, tok, [p], 15, temperature=0.0)[0] for p in prompts]


def test_masked_lm_cannot_generate():
    cfg = ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, causal=False)
    with pytest.raises(ValueError, match="causal"):
        generate(MaskedLM(cfg), prompt(T=3, vocab_size=20), 2)


# --- grouped-query attention and sliding windows: the cache shrinks, the tokens do not change -------

GQA_WINDOW = {"mqa": dict(n_head=4, n_kv_head=1), "mqa-window4": dict(n_head=4, n_kv_head=1, sliding_window=4),
              "gqa-window6": dict(n_head=4, n_kv_head=2, sliding_window=6)}


@pytest.mark.parametrize("variant", GQA_WINDOW)
def test_gqa_and_window_cached_equals_uncached_past_the_window(variant):
    model = tiny_model("rotary", **GQA_WINDOW[variant])
    idx = prompt(T=7)
    cached = generate(model, idx, 30, temperature=0.0, use_cache=True)  # 37 > block_size 32 > window
    uncached = generate(model, idx, 30, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_with_a_window_equals_each_prompt_alone(use_cache):
    model = tiny_model("rotary", n_head=4, n_kv_head=2, sliding_window=5)
    rows = [prompt(1, T, seed=T)[0].tolist() for T in (3, 9, 6)]
    idx, mask = left_pad(rows, pad_id=5)
    batched = generate(model, idx, 12, temperature=0.0, use_cache=use_cache, key_padding_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, torch.tensor([r]), 12, temperature=0.0, use_cache=use_cache)
        assert batched[i, -12:].tolist() == alone[0, -12:].tolist()


@pytest.mark.parametrize("flat_decode", [False, True])
def test_batch_engine_serves_a_gqa_model_like_generate(flat_decode):
    from minillm.generate.batching import BatchEngine, SamplingParams
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_model("rotary", vocab_size=tok.vocab_size, n_head=4, n_kv_head=2)
    engine = BatchEngine(model, tok, max_batch_size=3, flat_decode=flat_decode).start()
    try:
        assert engine.cache.k.shape[2] == 2  # (L, slots, H_kv, T, D): K/V heads, not query heads
        prompts = [tok.encode("the quick"), tok.encode("lazy dog")]  # ragged rows: a key padding mask
        events = engine.complete(prompts, SamplingParams(max_tokens=10, temperature=0.0))
        assert (engine._flat is not None) == flat_decode
    finally:
        engine.shutdown()
    for p, ev in zip(prompts, events):
        ref = generate(model, torch.tensor([p]), 10, temperature=0.0)[0, len(p):]
        assert ev.text == tok.decode(ref.tolist())


def test_batch_engine_admits_the_next_request_as_soon_as_one_ends_in_its_prefill():
    from minillm.generate.batching import BatchEngine, Request, SamplingParams
    tok = CharTokenizer.from_text(TEXT)
    engine = BatchEngine(tiny_model(vocab_size=tok.vocab_size), tok, max_batch_size=2)
    steps_at_end = {}
    reqs = []
    for name, n in (("long", 5), ("a", 1), ("b", 1), ("c", 1)):
        emit = (lambda name: lambda ev: ev.finish_reason and steps_at_end.setdefault(name, engine.stats.decode_steps))(name)
        reqs.append(engine.submit(Request([tok.encode("the ")], SamplingParams(max_tokens=n, temperature=0.0),
                                          emit=emit, stream=False)))
    engine.start()  # all four wait: "long" and "a" fit; a, b, c each end in their prefill
    try:
        for _ in range(200):
            if len(steps_at_end) == 4:
                break
            threading.Event().wait(0.01)
    finally:
        engine.shutdown()
    assert steps_at_end == {"a": 0, "b": 0, "c": 0, "long": 4}  # b and c did not wait for a decode step


def test_batch_engine_refuses_a_sliding_window_model():
    from minillm.generate.batching import BatchEngine
    model = tiny_model("rotary", sliding_window=8)
    with pytest.raises(ValueError, match="sliding_window=8"):
        BatchEngine(model, CharTokenizer.from_text(TEXT))


# --- what `minillm generate` and `minillm serve` run: the fused twins of the written-out layers ---

@pytest.mark.parametrize("kw", [dict(), dict(positional="rotary", norm="rmsnorm", activation="swiglu", n_kv_head=1),
                                dict(positional="learned", sliding_window=6), dict(activation="gelu_tanh")])
def test_for_inference_computes_the_same_function(kw):
    from minillm.model.builtin_ops import for_inference

    readable = tiny_model(**kw)
    fast = tiny_model(**kw)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    for_inference(fast)
    assert fast.cfg.attention == "sdpa" and readable.cfg.attention == "naive"
    assert fast.state_dict().keys() == before.keys()  # checkpoints unchanged
    assert all(torch.equal(before[k], v) for k, v in fast.state_dict().items())
    assert not any(type(m).__module__ == "minillm.model.layers" and "Norm" in type(m).__name__
                   for m in fast.modules())  # every written-out norm was swapped
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8, 9], [1, 2]])
    with torch.no_grad():
        want = readable(idx, key_padding_mask=mask)[0]
        got = fast(idx, key_padding_mask=mask)[0]
    real = mask[:, :, None].expand_as(want)  # pad positions' outputs are never used
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(fast, idx, 30, 0.0, key_padding_mask=mask),
                       generate(readable, idx, 30, 0.0, key_padding_mask=mask))  # past block_size too


def test_for_inference_keeps_an_explicit_attention():
    from minillm.model.builtin_ops import for_inference

    model = for_inference(tiny_model(), attention=False)
    assert model.cfg.attention == "naive"


# --- flat decode steps (minillm/generate/flat.py): the modules' ops without the module tree -----

FLAT_CONFIGS = [dict(), dict(positional="learned", prenorm=False), dict(positional="rotary", norm="rmsnorm",
                activation="swiglu", n_kv_head=1, bias=False), dict(positional="none", sliding_window=5),
                dict(attention="sdpa", activation="relu", tie_weights=False)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kw", FLAT_CONFIGS)
def test_flat_decode_step_is_bit_identical_to_the_modules(kw, fused):
    from minillm.generate.flat import FlatDecoder
    from minillm.model.builtin_ops import for_inference

    model = tiny_model(**kw)
    if fused:
        for_inference(model)
    flat = FlatDecoder.build(model, native=False)
    assert flat is not None
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3]])  # a padded row: explicit positions
    for padded in (False, True):
        kpm = mask if padded else None
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0) if padded else None
        c1, c2 = model.new_cache(2), model.new_cache(2)
        with torch.no_grad():
            model(idx[:, :5], positions=None if pos is None else pos[:, :5],
                  key_padding_mask=None if kpm is None else kpm[:, :5], cache=c1)
            model(idx[:, :5], positions=None if pos is None else pos[:, :5],
                  key_padding_mask=None if kpm is None else kpm[:, :5], cache=c2)
            for t in range(5, 8):  # three decode steps, each through the modules and flat
                p = None if pos is None else pos[:, t:t + 1]
                m = None if kpm is None else kpm[:, :t + 1]
                want = model(idx[:, t:t + 1], positions=p, key_padding_mask=m, cache=c1)[0][:, -1]
                got = flat.step(idx[:, t:t + 1], c2, p, m)
                assert torch.equal(got, want)
        assert c1.length == c2.length == 8


def test_flat_decode_generates_the_same_tokens_and_steps_aside_for_hooks():
    from minillm.generate.flat import FlatDecoder

    model = tiny_model(positional="rotary", n_kv_head=1)
    idx, mask = left_pad([[3, 4, 5, 6, 7], [1, 2]])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    want = generate(model, idx, 40, 0.9, top_k=20, generator=g(), key_padding_mask=mask)  # past block_size
    got = generate(model, idx, 40, 0.9, top_k=20, generator=g(), key_padding_mask=mask, flat_decode=True)
    assert torch.equal(got, want)
    seen = []
    handle = model.transformer.blocks[0].attn.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    assert FlatDecoder.build(model) is None  # a hook must fire: the modules run
    generate(model, idx, 3, 0.0, flat_decode=True)
    handle.remove()
    assert len(seen) == 3  # the prefill and two decode steps, each through the hooked module
    model.train()
    assert FlatDecoder.build(model) is None  # training mode (dropout) is the modules' business


def test_flat_decode_runs_quantized_layers_through_their_own_forward():
    from minillm.compress.quant import quantize_model

    model = quantize_model(tiny_model(), "int8", 128, False, False, backend="reference")
    idx = prompt()
    assert torch.equal(generate(model, idx, 30, 0.0, flat_decode=True), generate(model, idx, 30, 0.0))


def test_last_only_gives_the_last_positions_logits_and_prefill_uses_it():
    """A prompt's prefill needs one position's logits: the head (C × V per position) runs once, not T
    times. The logits are those of the full forward's last position."""
    from minillm.generate.core import prefill

    model = tiny_model(positional="rotary").eval()
    idx = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)  # (B, T, V)
        last, _ = model(idx, last_only=True)  # (B, 1, V)
        assert last.shape == (2, 1, 40)
        torch.testing.assert_close(last[:, 0], full[:, -1])
        calls = []
        model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
        torch.testing.assert_close(prefill(model, idx, model.new_cache(2)), full[:, -1])
        torch.testing.assert_close(prefill(model, idx), full[:, -1])
    assert calls == [1, 1]  # the head saw one position per row, cached and uncached
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)
