"""The decode core (minillm/generate/core.py), its cache verbs, the FFN seam, and the one stop-string place.

Every token-producing loop runs the same two functions, `prefill` and `decode_step`; these tests hold
them to the modules' own forward, and check that a layer the flat fast path does not know makes it
step aside (the modules run it) instead of raising.
"""

import pytest
import torch
import torch.nn as nn

from minillm.data.tokenizer import CharTokenizer
from minillm.generate.flat import FlatDecoder
from minillm.generate.sampling import generate, left_pad
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
