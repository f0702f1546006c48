"""Decoding a Llama-family model (RMSNorm, RoPE, grouped-query attention, SwiGLU) on the fast path.

What issue 27 asks of the decode step, held on tiny models of SmolLM2's shape: the flat step over
every layer gives the modules' logits bit for bit; it makes far fewer Python calls per token, and
their number does not grow with the context; the KV cache is written in place, never reallocated;
a prompt is one forward (T = 34 or a batch of 8 rows), and a batch decodes one step per token for
all its rows; torch.compile of the step is an explicit switch that reuses what it compiled. The
real SmolLM2 file is used only when `minillm pull smollm2-135m-instruct` has put it in the cache.
"""

import cProfile
import pstats
from pathlib import Path

import pytest
import torch

from minillm.generate.core import decode_step, prefill
from minillm.generate.flat import FlatDecoder
from minillm.generate.sampling import generate, left_pad
from minillm.model.builtin_ops import for_inference
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

REAL = Path.home() / ".cache/minillm/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_like(n_layer=4, block_size=96, seed=0):
    """SmolLM2's layer types at toy size: 6 query heads sharing 2 key/value heads (groups of 3)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, block_size=block_size, n_layer=n_layer, n_head=6, n_kv_head=2, n_embd=48,
                      ffn_hidden=128, positional="rotary", norm="rmsnorm", activation="swiglu", bias=False,
                      tie_weights=True, rope_base=100000.0)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        model.transformer.tok_emb.weight.mul_(20.0)  # sharper logits: greedy choices are not near-ties
    return model


def calls_per_token(model, flat, context: int, steps: int = 5) -> float:
    """Python-level calls (cProfile's count, built-ins included) per decode step after `context` tokens."""
    with torch.inference_mode():
        cache = model.new_cache(1)
        logits = prefill(model, torch.randint(0, 64, (1, context)), cache)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            logits = decode_step(model, logits.argmax(-1)[:, None], cache, flat)
        profiler.disable()
    return pstats.Stats(profiler).total_calls / steps


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_the_flat_step_of_a_gqa_llama_is_bit_identical_to_the_modules(fused, padded):
    model = llama_like()
    if fused:
        for_inference(model)  # F.rms_norm, SDPA with enable_gqa: what the CLI runs
    flat = FlatDecoder.build(model, native=False)
    assert flat is not None  # RMSNorm, RoPE, GQA and SwiGLU are all flattened, none steps aside
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4]])
    kpm = mask if padded else None
    with torch.inference_mode():
        c1, c2 = model.new_cache(2), model.new_cache(2)
        l1, l2 = prefill(model, idx, c1, kpm), prefill(model, idx, c2, kpm)
        for _ in range(6):
            l1 = decode_step(model, l1.argmax(-1)[:, None], c1)  # the modules
            l2 = decode_step(model, l2.argmax(-1)[:, None], c2, flat)
            assert torch.equal(l1, l2)
    n = c1.length  # the columns written (the rest of a cache is never read, and never initialised)
    assert c1.length == c2.length and torch.equal(c1.k[..., :n, :], c2.k[..., :n, :])
    assert torch.equal(c1.v[..., :n, :], c2.v[..., :n, :])


def test_flat_greedy_tokens_equal_the_modules_past_block_size():
    model = for_inference(llama_like(block_size=24))
    idx = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    want = generate(model, idx, 40, temperature=0.0)  # past block_size: re-prefills included
    assert torch.equal(generate(model, idx, 40, temperature=0.0, flat_decode=True), want)


def test_the_flat_step_makes_fewer_python_calls_and_none_grow_with_the_context():
    model = for_inference(llama_like(n_layer=6))
    flat = FlatDecoder.build(model, native=False)
    modules, short, long = (calls_per_token(model, None, 8), calls_per_token(model, flat, 8),
                            calls_per_token(model, flat, 80))
    assert short < 0.45 * modules  # measured: 42 calls per layer flat, 121 through the modules
    assert long == short  # per token, nothing in Python is O(context)
    assert calls_per_token(model, None, 80) == modules


def test_the_kv_cache_is_written_in_place_during_decoding():
    model = for_inference(llama_like())
    flat = FlatDecoder.build(model, native=False)
    with torch.inference_mode():
        cache = model.new_cache(2)
        k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
        logits = prefill(model, torch.randint(0, 64, (2, 5)), cache)
        for _ in range(20):
            logits = decode_step(model, logits.argmax(-1)[:, None], cache, flat)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_ptr, v_ptr)  # preallocated: never reallocated
    assert cache.length == 25 and cache.k.shape[3] == model.cfg.block_size


@pytest.mark.parametrize("B,T", [(1, 34), (8, 34), (1, 90)])
def test_a_prompt_is_one_forward_and_a_batch_decodes_one_step_per_token(B, T):
    model = for_inference(llama_like())
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(tuple(args[0].shape)), with_kwargs=True)
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(2))
    generate(model, idx, 5, temperature=0.0)  # (the hook makes the flat path step aside: the modules run)
    assert calls == [(B, T)] + [(B, 1)] * 4  # one prefill over the whole prompt, then one step per token


def test_compile_is_an_explicit_switch_that_keeps_the_tokens_and_is_reused():
    pytest.importorskip("torch._dynamo")
    model = for_inference(llama_like(n_layer=2))
    plain = FlatDecoder.build(model, native=False)
    assert plain.step == plain._step and FlatDecoder.build(model, native=False) is not plain  # off: no compiling, no caching
    # Dynamo traces the step; the "eager" backend runs the traced ops as they are (Inductor's fusion,
    # compile=True, takes minutes on a small CPU: measured in bench/flat_compile.py, not here)
    compiled = FlatDecoder.build(model, compile="eager")
    assert compiled.step != compiled._step
    assert FlatDecoder.build(model, compile="eager") is compiled  # the next generation reuses it
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        c1, c2 = model.new_cache(2), model.new_cache(2)
        l1, l2 = prefill(model, idx, c1), prefill(model, idx, c2)
        for _ in range(4):  # the cache length changes every step: the compiled step follows it
            l1 = decode_step(model, l1.argmax(-1)[:, None], c1, plain)
            l2 = decode_step(model, l2.argmax(-1)[:, None], c2, compiled)
            torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    model.transformer.blocks[0].attn.proj = torch.nn.Linear(48, 48, bias=False)  # a new layer: compile again
    assert FlatDecoder.build(model, compile="eager") is not compiled


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} not pulled (minillm pull smollm2-135m-instruct)")
def test_smollm2_decodes_flat_bit_for_bit():
    from minillm.weights.checkpoint import load_model

    model, tok, _ = load_model(REAL)  # fp32 weights
    for_inference(model)
    flat = FlatDecoder.build(model, native=False)
    assert flat is not None and len(flat.layers) == 30
    idx = torch.tensor([tok.encode("The capital of France is")])
    with torch.inference_mode():
        c1, c2 = model.new_cache(1, 64), model.new_cache(1, 64)
        l1, l2 = prefill(model, idx, c1), prefill(model, idx, c2)
        for _ in range(4):
            l1 = decode_step(model, l1.argmax(-1)[:, None], c1)
            l2 = decode_step(model, l2.argmax(-1)[:, None], c2, flat)
            assert torch.equal(l1, l2)


def test_a_quantized_embedding_and_head_decode_flat_like_the_modules():
    """A GGUF kept quantized has a QuantEmbedding (no .weight) tied to a quantized head."""
    from minillm.compress.quant import QuantEmbedding, quantize_model

    model = quantize_model(for_inference(llama_like()), "int8", None, include_embeddings=True, include_head=True,
                           backend="reference")
    assert type(model.transformer.tok_emb) is QuantEmbedding
    flat = FlatDecoder.build(model, native=False)
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        c1, c2 = model.new_cache(2), model.new_cache(2)
        l1, l2 = prefill(model, idx, c1), prefill(model, idx, c2)
        for _ in range(4):
            l1 = decode_step(model, l1.argmax(-1)[:, None], c1)
            l2 = decode_step(model, l2.argmax(-1)[:, None], c2, flat)
            assert torch.equal(l1, l2)
