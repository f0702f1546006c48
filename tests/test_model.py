"""Properties that teach: causality, padding invariance, KV cache = no cache, gradients, learning."""

import pytest
import torch
from torch.testing import assert_close

from minillm import CausalLM, MaskedLM, ModelConfig, build_model, count_parameters
from minillm.model.losses import next_token_targets

SMALL = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
VARIANTS = {
    "sinusoidal-gelu": dict(),
    "learned-gelu_tanh": dict(positional="learned", activation="gelu_tanh"),
    "rotary-swiglu-rms": dict(positional="rotary", activation="swiglu", norm="rmsnorm", bias=False,
                              tie_weights=False),
    "none-relu-postnorm": dict(positional="none", activation="relu", prenorm=False),
    # grouped-query attention (4 query heads, 2 K/V heads) and multi-query with a 5-token window
    "rotary-gqa": dict(positional="rotary", n_kv_head=2, activation="swiglu", norm="rmsnorm", bias=False),
    "rotary-mqa-window": dict(positional="rotary", n_kv_head=1, sliding_window=5),
}


def small(**kw):
    return ModelConfig(**{**SMALL, **kw})


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    torch.manual_seed(0)
    model = CausalLM(small(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 50, (2, 16))
    logits, _ = model(idx)
    t = 9
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 50  # change every token after t
    logits2, _ = model(changed)
    assert_close(logits2[:, : t + 1], logits[:, : t + 1])
    assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_full_forward(variant):
    torch.manual_seed(0)
    model = CausalLM(small(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 50, (2, 20))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2)
    steps = [model(idx[:, :11], cache=cache)[0]]  # prefill, then one token at a time
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(11, 20)]
    assert cache.length == 20
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_implementations_agree(attention):
    torch.manual_seed(0)
    ref = CausalLM(small(positional="rotary")).eval()
    other = CausalLM(small(positional="rotary", attention=attention)).eval()
    other.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50, (2, 12))
    assert_close(other(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)


def test_mlm_padding_never_changes_real_tokens():
    torch.manual_seed(0)
    cfg = small(causal=False, prenorm=False, positional="learned", n_token_types=2, embed_norm=True)
    model = MaskedLM(cfg).eval()
    idx = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # row 1: 8 real tokens, then padding
    logits, _ = model(idx, attention_mask=mask)
    junk = idx.clone()
    junk[1, 8:] = (junk[1, 8:] + 7) % 50  # different padding ids
    logits2, _ = model(junk, attention_mask=mask)
    assert_close(logits2[1, :8], logits[1, :8])
    alone, _ = model(idx[1:, :8])  # the same row with no padding at all
    assert_close(alone[0], logits[1, :8], atol=1e-5, rtol=1e-5)
    # and the encoder is bidirectional: a later token does change an earlier logit
    later = idx.clone()
    later[0, 10] = (later[0, 10] + 1) % 50
    assert not torch.allclose(model(later, attention_mask=mask)[0][0, 0], logits[0, 0])


@pytest.mark.parametrize("cfg", [small(dropout=0.0), small(causal=False, prenorm=False, n_token_types=2,
                                                               embed_norm=True)])
def test_gradients_reach_every_parameter_and_loss_drops(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 50, (4, 16))
    targets = next_token_targets(idx) if cfg.causal else torch.where(torch.rand(4, 16) < 0.3, idx, -100)
    inputs = idx if cfg.causal else torch.where(targets != -100, 0, idx)
    _, loss = model(inputs, targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(40):
        opt.zero_grad()
        _, loss = model(inputs, targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_gpt2_preset_size_and_init():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2", n_layer=2)  # init statistics do not need all 12 layers
    model = CausalLM(cfg)
    assert model.lm_head.weight is model.transformer.tok_emb.weight
    std = model.transformer.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 2) ** 0.5) < 1e-3  # residual projection: 0.02/sqrt(2·n_layer)
    assert abs(model.transformer.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    with torch.device("meta"):
        full = CausalLM(ModelConfig.from_preset("gpt2"))
    assert count_parameters(full) == 124_439_808  # GPT-2 small with its 50257-token vocabulary


@pytest.mark.parametrize("bad,message", [
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_embd=12, n_head=4, positional="rotary"), "head dim must be even"),
    (dict(activation="gleu"), "did you mean 'gelu'"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
    (dict(attention="flash"), "is not one of naive, sdpa, triton"),
    (dict(n_kv_head=3), "n_kv_head=3 must be a positive divisor of n_head=4"),
    (dict(n_kv_head=0), "n_kv_head=0 must be a positive divisor"),
    (dict(sliding_window=0), "sliding_window must be >= 1"),
    (dict(sliding_window=4, causal=False), "sliding_window needs causal=True"),
    (dict(rope_scaling="yarn"), "rope_scaling='yarn' is not one of linear, llama3"),
])
def test_bad_config_names_the_field(bad, message):
    with pytest.raises(ValueError, match=None) as e:
        small(**bad)
    assert message in str(e.value)


def test_model_kind_must_match_config():
    with pytest.raises(ValueError, match="causal=True"):
        CausalLM(small(causal=False))
    with pytest.raises(ValueError, match="causal=False"):
        MaskedLM(small())


def test_too_long_input_is_a_clear_error():
    model = CausalLM(small())
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
def test_token_embeddings_scaled_by_sqrt_c_only_with_sinusoids(positional):
    torch.manual_seed(0)
    model = CausalLM(small(positional=positional)).eval()
    seen = {}
    model.transformer.blocks[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    idx = torch.randint(0, 50, (1, 6))
    model(idx)
    tokens = model.transformer.tok_emb(idx)
    scale = 32 ** 0.5 if positional == "sinusoidal" else 1.0  # "Attention Is All You Need" §3.4
    pos = model.transformer.pos_emb(torch.arange(6)) if positional != "rotary" else 0.0
    assert_close(seen["x"], tokens * scale + pos)


# --- grouped-query attention and sliding windows at the model level --------------------------------

@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_gqa_and_window_implementations_agree(attention):
    torch.manual_seed(0)
    cfg = small(positional="rotary", n_kv_head=2, sliding_window=4)
    ref = CausalLM(cfg).eval()
    other = CausalLM(ModelConfig(**{**cfg.to_dict(), "attention": attention})).eval()
    other.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50, (2, 12))
    assert_close(other(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)


def test_gqa_projects_fewer_keys_and_values():
    model = CausalLM(small(n_kv_head=1))  # C=32, H=4, D=8: q has 32 outputs, k and v 8 each
    assert model.transformer.blocks[0].attn.qkv.weight.shape == (32 + 2 * 8, 32)


def test_kv_cache_holds_kv_heads_and_only_the_window():
    torch.manual_seed(0)
    model = CausalLM(small(positional="rotary", n_kv_head=2, sliding_window=6)).eval()
    cache = model.new_cache(batch_size=3)
    assert cache.k.shape == (2, 3, 2, 5, 8)  # (L, B, H_kv, window-1, D): not (L, B, H, block_size, D)
    full_cache = CausalLM(small(n_kv_head=2)).new_cache(batch_size=3)
    assert full_cache.k.shape == (2, 3, 2, 32, 8)
    # prefill longer than the window, then decode: positions stay absolute, output unchanged
    idx = torch.randint(0, 50, (3, 25))
    full, _ = model(idx)
    steps = [model(idx[:, :9], cache=cache)[0]]
    steps += [model(idx[:, t:t + 2], cache=cache)[0] for t in range(9, 25, 2)]  # two tokens per step
    assert cache.length == 25
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_window_changes_only_what_lies_beyond_it():
    torch.manual_seed(0)
    model = CausalLM(small(positional="rotary", sliding_window=4)).eval()
    idx = torch.randint(0, 50, (1, 16))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 50
    logits2, _ = model(changed)
    # 2 layers of a 4-token window reach 2·(4-1) = 6 tokens back: position 7 and later cannot see token 0
    assert_close(logits2[0, 7:], logits[0, 7:])
    assert not torch.allclose(logits2[0, :7], logits[0, :7])


def test_smollm2_preset_has_the_published_size():
    with torch.device("meta"):  # shapes only: no 135M random numbers drawn
        model = CausalLM(ModelConfig.from_preset("smollm2-135m"))
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim) == (30, 9, 3, 64, 1536)
    assert count_parameters(model) == 134_515_008  # HuggingFaceTB/SmolLM2-135M, tied embeddings
