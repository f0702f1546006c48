"""Generation throughput: prefill tokens/s, and decode tokens/s with and without the KV cache.

    pytest bench/test_generate.py                        sizes from bench.common.SIZE
    pytest bench/test_generate.py --bench-size=full --benchmark-json=gen.json

Model: `tiny` on a CPU ("quick"), nanoGPT's baby GPT (`char-small`, 6/6/384, block 256) on a GPU
("full"), random weights (speed does not depend on what the weights say). Decoding is greedy so
both modes do the same work; each case first checks that cached and uncached decoding produce
the same tokens. Uncached decoding re-runs the whole prefix every token, as nanoGPT's sample.py
does: the reference the KV cache is measured against (the README's speed targets: ≥ 5× its tokens/s).
"""

from __future__ import annotations

import pytest
import torch

from bench import common
from minillm.model.config import ModelConfig
from minillm.generate.sampling import generate
from minillm.model.transformer import CausalLM

PRESET = common.pick(quick="tiny", full="char-small")
PROMPT, NEW = common.pick(quick=(16, 16), full=(32, 200))  # prompt tokens, generated tokens
BATCHES = common.pick(quick=[1], full=[1, 8])


def make_model() -> CausalLM:
    torch.manual_seed(0)
    dev = common.device()
    cfg = ModelConfig.from_preset(PRESET, dropout=0.0, vocab_size=65,
                                  attention="sdpa" if dev.type == "cuda" else "naive")
    model = CausalLM(cfg).to(dev).eval()
    return model.to(torch.bfloat16) if dev.type == "cuda" else model


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("mode", ["cached", "uncached"])
def test_decode(benchmark, mode, B):
    model = make_model()
    dev = common.device()
    idx = torch.randint(0, 65, (B, PROMPT), generator=torch.Generator().manual_seed(0)).to(dev)
    # correctness once: a few greedy tokens agree between the two modes
    a = generate(model, idx, 8, temperature=0.0, use_cache=True)
    b = generate(model, idx, 8, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
    use_cache = mode == "cached"
    benchmark(common.synchronized(lambda: generate(model, idx, NEW, temperature=0.0, use_cache=use_cache)))
    common.record(benchmark, tokens=B * NEW, mode=mode, batch=B, prompt=PROMPT, preset=PRESET)


@pytest.mark.parametrize("B", BATCHES)
def test_prefill(benchmark, B):
    model = make_model()
    dev = common.device()
    T = model.cfg.block_size
    idx = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        ref, _ = model(idx)
        cache = model.new_cache(B)
        out, _ = model(idx, cache=cache)  # the prefill a generate() call starts with
    torch.testing.assert_close(out, ref)

    @torch.no_grad()
    def prefill():
        return model(idx, cache=model.new_cache(B))[0]

    benchmark(common.synchronized(prefill))
    common.record(benchmark, tokens=B * T, batch=B, preset=PRESET)
