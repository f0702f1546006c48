"""A model with attention="triton" computes what the readable model computes, and trains the same.

Twin models share one initialisation; only ModelConfig.attention differs. Without a GPU the kernel
runs through Triton's interpreter, so the models are tiny (2 layers, 2 heads of D=16).
"""

import os

import torch

if not torch.cuda.is_available():  # must happen before the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.testing import assert_close  # noqa: E402

pytest.importorskip("triton", reason="Triton kernels need: pip install 'minillm[kernels]'")

from minillm.model.config import ModelConfig  # noqa: E402
from minillm.model.transformer import CausalLM, MaskedLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=2e-5, rtol=1e-4)
TINY = dict(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32)  # D = 16
VARIANTS = {
    "gpt": {},  # sinusoidal positions, LayerNorm, GELU, tied head
    "llama": dict(positional="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_weights=False),
}
# Mistral-style: one K/V head for both query heads (multi-query) and a sliding window of 8 tokens
VARIANTS["mistral"] = dict(VARIANTS["llama"], n_kv_head=1, sliding_window=8)


def twins(cls, **overrides):
    """(readable, triton) models with identical weights, in train mode without dropout."""
    torch.manual_seed(0)
    ref = cls(ModelConfig(**TINY, attention="naive", **overrides)).to(DEVICE)
    fast = cls(ModelConfig(**TINY, attention="triton", **overrides)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def tokens(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=g).to(DEVICE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_lm_logits_and_gradients_match(variant):
    ref, fast = twins(CausalLM, **VARIANTS[variant])
    idx, targets = tokens(2, 40), tokens(2, 40, seed=1)
    ref_logits, ref_loss = ref(idx, targets)
    logits, loss = fast(idx, targets)
    assert_close(logits, ref_logits, **TOL)
    assert_close(loss, ref_loss, **TOL)
    ref_loss.backward()
    loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), fast.parameters()):
        assert_close(p.grad, p_ref.grad, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_kv_cache_decode_matches_readable(variant):
    """Prefill then decode token by token: queries shorter than keys (Tq = 1 against a growing
    cache), the bottom-right causal case the kernel must get right for generation. With a window
    the cache keeps only the last window - 1 tokens."""
    ref, fast = twins(CausalLM, **VARIANTS[variant])
    idx = tokens(2, 16)
    with torch.no_grad():
        outs = []
        for model in (ref, fast):
            cache = model.new_cache(batch_size=2)
            steps = [model(idx[:, :12], cache=cache)[0]]
            steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 16)]
            outs.append(torch.cat(steps, dim=1))  # (B, 16, V)
        assert_close(outs[1], outs[0], **TOL)
        assert_close(outs[1], fast(idx)[0], **TOL)  # and cached == uncached


def test_masked_lm_with_padding_matches_readable():
    ref, fast = twins(MaskedLM, causal=False, positional="learned")
    idx = tokens(3, 30)
    attention_mask = torch.ones(3, 30, dtype=torch.bool, device=DEVICE)
    attention_mask[1, 21:] = False  # right-padded rows, as an MLM batch of ragged sentences
    attention_mask[2, 9:] = False
    labels = torch.where(attention_mask, tokens(3, 30, seed=2), torch.full_like(idx, -100))
    ref_logits, ref_loss = ref(idx, labels, attention_mask=attention_mask)
    logits, loss = fast(idx, labels, attention_mask=attention_mask)
    assert_close(logits[attention_mask], ref_logits[attention_mask], **TOL)
    assert_close(loss, ref_loss, **TOL)
    ref_loss.backward()
    loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), fast.parameters()):
        assert_close(p.grad, p_ref.grad, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_training_tracks_the_readable_loss_curve():
    """Eight AdamW steps on a repeating sequence: same losses step by step, and the loss falls."""
    curves = []
    for model in twins(CausalLM):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        pattern = tokens(1, 9)
        data = pattern.repeat(2, 5)[:, :33]  # (2, 33): a sequence the model can learn to continue
        x, y = data[:, :-1], data[:, 1:]
        losses = []
        for _ in range(8):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    ref_curve, fast_curve = curves
    assert_close(torch.tensor(fast_curve), torch.tensor(ref_curve), atol=1e-4, rtol=1e-4)
    assert fast_curve[-1] < fast_curve[0] - 0.5, fast_curve
