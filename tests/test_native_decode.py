"""The C decode step (minillm/generate/native.py, csrc/decode_cpu.c) against the flat Python step.

The C step writes out the same ops (RMSNorm, RoPE, the cache write, GQA attention, SwiGLU) and calls
the same quantized matmul, so its logits must match the flat step's to float rounding, its greedy
tokens must be the same, and the cache it fills must hold the same keys and values. Where it does not
apply, it must say why (why_not) and the flat step must run instead.
"""

import pytest
import torch

from minillm.compress import cpu_kernel
from minillm.compress.quant import quantize_model
from minillm.generate.flat import FlatDecoder
from minillm.generate.native import NativeDecoder, why_not
from minillm.generate.sampling import generate
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"CPU kernel: {cpu_kernel.why_unavailable()}")


def llama(seed=0, scheme="int4", group=32, **over):
    torch.manual_seed(seed)
    kw = dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, block_size=40, vocab_size=97, norm="rmsnorm",
              positional="rotary", activation="swiglu", bias=False)
    model = CausalLM(ModelConfig(**(kw | over))).eval()
    if scheme:
        quantize_model(model, scheme, group, backend="cpu", int8_groups=group is not None)
    return model


def steps(model, dec, idx, n=12):
    """Prefill idx through the modules, then n greedy steps through `dec`: logits (n, B, V), the cache."""
    cache = model.new_cache(idx.shape[0], model.cfg.block_size)
    out = []
    with torch.inference_mode():
        tok = model(idx, cache=cache)[0][:, -1:].argmax(-1)  # (B, 1)
        for _ in range(n):
            logits = dec.step(tok, cache)  # (B, V)
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
    return torch.stack(out), cache


@needs_kernel
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("scheme,group,over", [
    ("int4", 32, {}),                                   # GQA: 4 query heads share 2 K/V heads
    ("int8", None, {"n_kv_head": None}),                # int8 per output channel, plain multi-head
    ("int8", 32, {"bias": True, "n_kv_head": 1}),       # grouped int8 (GGUF's Q8_0), biases, one K/V head
    ("int4", 64, {"tie_weights": True, "norm_eps": 1e-3}),
    (None, None, {"bias": True}),                       # float32 nn.Linear (decode_cpu.c's linear_f32)
], ids=["int4-gqa", "int8-mha", "int8g-bias-mqa", "int4-tied", "fp32"])
def test_the_c_step_matches_the_flat_step(B, scheme, group, over):
    model = llama(scheme=scheme, group=group, **over)
    assert why_not(model) == ""
    native = FlatDecoder.build(model)
    assert type(native) is NativeDecoder
    idx = torch.randint(0, 97, (B, 7), generator=torch.Generator().manual_seed(1))
    got, c_native = steps(model, native, idx)
    want, c_flat = steps(model, FlatDecoder.build(model, native=False), idx)
    assert type(FlatDecoder.build(model, native=False)) is FlatDecoder
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # the same greedy tokens
    assert c_native.length == c_flat.length == 7 + 12
    n = c_flat.length
    torch.testing.assert_close(c_native.k[..., :n, :], c_flat.k[..., :n, :], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_native.v[..., :n, :], c_flat.v[..., :n, :], rtol=1e-4, atol=1e-5)


@needs_kernel
def test_generate_uses_it_and_gives_the_modules_tokens():
    model = llama(seed=3)
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    fast = generate(model, idx, 20, temperature=0.0, flat_decode=True)
    slow = generate(model, idx, 20, temperature=0.0, flat_decode=False)
    assert torch.equal(fast, slow)


@needs_kernel
def test_steps_it_cannot_take_run_in_python():
    """Padded rows (a key padding mask) and an almost full cache go to the flat step, whose answer
    (and whose error for a full cache) is the one the caller gets."""
    model = llama()
    native, flat = FlatDecoder.build(model), FlatDecoder(model)
    assert type(native) is NativeDecoder
    idx = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # row 1 is left-padded by 2
    outs = []
    for dec in (native, flat):
        cache = model.new_cache(2, model.cfg.block_size)
        cache.pad_left(mask)
        with torch.inference_mode():
            pos, kpm = cache.positions_and_mask(6)
            model(idx, positions=pos, key_padding_mask=kpm, cache=cache)
            pos, kpm = cache.positions_and_mask(1)
            outs.append(dec.step(idx[:, -1:], cache, pos, kpm))
    assert torch.equal(outs[0], outs[1])
    cache = model.new_cache(1, model.cfg.block_size)
    cache.length = model.cfg.block_size
    with torch.inference_mode(), pytest.raises(ValueError, match="block_size"):
        native.step(idx[:1, -1:], cache)


@needs_kernel
@pytest.mark.parametrize("over,reason", [
    ({"activation": "gelu"}, "SwiGLU"),
    ({"norm": "layernorm"}, "RMSNorm"),
    ({"positional": "learned"}, "rotary"),
    ({"sliding_window": 8}, "sliding window"),
], ids=["gelu", "layernorm", "learned", "window"])
def test_models_it_does_not_know_are_named_and_left_to_python(over, reason):
    model = llama(**over)
    assert reason in why_not(model)
    assert type(FlatDecoder.build(model)) is FlatDecoder


def test_a_reference_backend_bf16_weights_and_lora_are_not_taken():
    model = llama(scheme=None)
    quantize_model(model, "int4", 32, backend="reference")
    assert "on reference" in why_not(model)
    assert "fp32" in why_not(llama(scheme=None).to(torch.bfloat16))  # the first fp32 check met: a norm
    model = llama(scheme=None)
    model.transformer.blocks[1].ffn.up.to(torch.bfloat16)
    assert "block 1: up is torch.bfloat16" in why_not(model)
    from minillm.finetune.lora import apply_lora

    model = llama(scheme=None)
    apply_lora(model, rank=2)
    assert "LoRA" in why_not(model.eval())


@needs_kernel
def test_cpu_exact_gives_the_reference_backends_tokens():
    """backend "cpu-exact": float activations and the reference's Ŵ, so the C step's greedy tokens are
    those of the modules on the reference backend (which dequantizes Ŵ in PyTorch), not merely close."""
    from minillm.compress.quant import set_backend

    model = llama(seed=5, scheme="int4", group=32)
    idx = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    want = generate(set_backend(model, "reference"), idx, 24, temperature=0.0, flat_decode=False)
    set_backend(model, "cpu-exact")
    assert why_not(model) == "" and type(FlatDecoder.build(model)) is NativeDecoder
    assert torch.equal(generate(model, idx, 24, temperature=0.0, flat_decode=True), want)
    got, _ = steps(model, FlatDecoder.build(model), idx)
    ref, _ = steps(set_backend(model, "reference"), FlatDecoder.build(model, native=False), idx)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_decode_steps_names_the_path_minillm_generate_takes():
    from minillm.generate.flat import decode_steps

    assert decode_steps(llama(), True) == "C decode steps"
    assert decode_steps(llama(activation="gelu"), True) == "flat Python steps"
    assert decode_steps(llama(), False) == "modules" and decode_steps(llama(), "compile") == "compiled flat steps"
