"""Generation throughput: prefill tokens/s, and decode tokens/s with and without the KV cache.

    pytest bench/test_generate.py                        sizes from bench.common.SIZE
    pytest bench/test_generate.py --bench-size=full --benchmark-json=gen.json

Model: `tiny` on a CPU ("quick"), nanoGPT's baby GPT (`char-small`, 6/6/384, block 256) on a GPU
("full"), random weights (speed does not depend on what the weights say). Decoding is greedy so
both modes do the same work; each case first checks that cached and uncached decoding produce
the same tokens. Uncached decoding re-runs the whole prefix every token, as nanoGPT's sample.py
does: the reference the KV cache is measured against (the speed targets in
docs/guides/benchmarks-cloud.md: ≥ 5× its tokens/s).

`test_decode_past_context` decodes after a full block_size prompt, so every token is past the
context: nanoGPT's sliding window against the cached re-prefill (minillm/generate/sampling.py).

`test_decode_kv_heads` compares multi-head, grouped-query and multi-query attention at the same
width (same H, D, C; only H_kv changes) decoding after a long prompt, where reading the KV cache is
a large part of each step. It records the cache's bytes per token, 2·L·H_kv·D·bytes, beside tokens/s:

    OMP_NUM_THREADS=1 pytest bench/test_generate.py -k kv_heads --benchmark-json=kv.json

(one thread on a shared CPU: with two, every step waits for the slower core, and the spread grows.)
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


# past the context: every token after a full block_size prompt (sampling.py's cached re-prefill);
# bench/decode.py times these cases against nanoGPT, interleaved in one process, and prints the ratios
PAST = {"uncached": dict(use_cache=False, window_stride=1),  # nanoGPT's sliding window
        "stride1": dict(window_stride=1),  # the same tokens, minillm's old behaviour
        "default": dict()}  # re-prefill every block_size // 4 tokens
PAST_NEW = common.pick(quick=64, full=200)  # tokens past the context: several re-prefill cycles


@pytest.mark.parametrize("mode", PAST)
def test_decode_past_context(benchmark, mode):
    model = make_model()
    dev = common.device()
    T = model.cfg.block_size
    idx = torch.randint(0, 65, (1, T), generator=torch.Generator().manual_seed(0)).to(dev)
    # correctness once: stride 1 with the cache picks nanoGPT's tokens
    ref = generate(model, idx, 8, temperature=0.0, **PAST["uncached"])
    assert torch.equal(generate(model, idx, 8, temperature=0.0, **PAST["stride1"]), ref)
    benchmark(common.synchronized(lambda: generate(model, idx, PAST_NEW, temperature=0.0, **PAST[mode])))
    common.record(benchmark, tokens=PAST_NEW, mode=mode, batch=1, prompt=T, preset=PRESET)


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


# MHA vs GQA vs MQA: C = 512, H = 8 (D = 64) on a CPU; C = 768, H = 12 (D = 64) on a GPU
KV_SHAPE = common.pick(quick=dict(n_layer=4, n_head=8, n_embd=512), full=dict(n_layer=12, n_head=12, n_embd=768))
KV_HEADS = common.pick(quick=[8, 2, 1], full=[12, 4, 1])
KV_B, KV_PROMPT, KV_NEW = common.pick(quick=(4, 512, 32), full=(16, 2048, 128))


@pytest.mark.parametrize("n_kv_head", KV_HEADS)
def test_decode_kv_heads(benchmark, n_kv_head):
    torch.manual_seed(0)
    dev = common.device()
    cfg = ModelConfig(**KV_SHAPE, n_kv_head=n_kv_head, vocab_size=512, block_size=KV_PROMPT + KV_NEW,
                      positional="rotary", activation="swiglu", norm="rmsnorm", bias=False,
                      attention="sdpa" if dev.type == "cuda" else "naive")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = CausalLM(cfg).to(dev, dtype).eval()
    idx = torch.randint(0, 512, (KV_B, KV_PROMPT + 4), generator=torch.Generator().manual_seed(0)).to(dev)
    cache = model.new_cache(KV_B)
    with torch.no_grad():
        # correctness once: 4 cached decode steps give the logits of one full forward
        full = model(idx)[0][:, KV_PROMPT:]
        model(idx[:, :KV_PROMPT], cache=cache)
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(KV_PROMPT, KV_PROMPT + 4)], 1)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(steps, full, atol=tol, rtol=tol)

    @torch.no_grad()
    def decode():
        # the prompt's k, v stay in the cache; rewinding `length` re-decodes the same KV_NEW steps
        cache.length = KV_PROMPT
        tok = idx[:, KV_PROMPT - 1:KV_PROMPT]  # (B, 1)
        for _ in range(KV_NEW):
            tok = model(tok, cache=cache)[0][:, -1].argmax(-1, keepdim=True)  # greedy, (B, 1)
        return tok

    benchmark(common.synchronized(decode))
    per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * cache.k.element_size()  # k and v, every layer
    common.record(benchmark, tokens=KV_B * KV_NEW, batch=KV_B, prompt=KV_PROMPT, n_head=cfg.n_head,
                  n_kv_head=cfg.kv_heads, kv_bytes_per_token=per_token,
                  kv_cache_bytes=per_token * KV_B * (KV_PROMPT + KV_NEW),
                  parameters=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads())
