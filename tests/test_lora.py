"""LoRA (minillm/finetune/lora.py): a no-op at step 0, merges exactly, trains only A and B, round-trips.

Each property on a GPT-style CausalLM and a BERT-style MaskedLM (bidirectional), both tiny.
"""

import json

import pytest
import torch
import torch.nn as nn

from minillm.finetune.lora import (LoRALinear, apply_lora, count_lora_parameters, expected_lora_parameters,
                                   load_adapter, lora_parameters, lora_state_dict, merge_lora, save_adapter)
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM, MaskedLM

SIZES = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**SIZES)) if kind == "causal" else MaskedLM(ModelConfig(**SIZES, causal=False))
    return model.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: nn.Module, seed: int = 2) -> None:
    """Non-zero A and B, as after training (B = 0 would make every check below trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


KINDS = ("causal", "masked")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_b_leaves_the_model_unchanged_at_step_0(kind):
    model, x = make_model(kind), tokens()
    before = model(x)[0]
    names = apply_lora(model, rank=4, alpha=8.0)
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(x)[0], before)  # exactly: B = 0 adds exact zeros


@pytest.mark.parametrize("kind", KINDS)
def test_merge_folds_scaled_BA_into_W_and_keeps_the_logits(kind):
    model, x = make_model(kind), tokens()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = apply_lora(model, rank=4, alpha=8.0, targets=("qkv", "proj", "up", "down"))
    randomize_lora(model)
    lora_logits = model(x)[0]
    assert not torch.allclose(lora_logits, make_model(kind)(x)[0])  # the adapter does change the output
    updates = {n: (model.get_submodule(n).lora_A.detach().clone(), model.get_submodule(n).lora_B.detach().clone())
               for n in names}
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for n, (A, B) in updates.items():
        layer = model.get_submodule(n)
        assert type(layer) is nn.Linear
        torch.testing.assert_close(layer.weight, base[f"{n}.weight"] + (8.0 / 4) * B @ A)
    torch.testing.assert_close(model(x)[0], lora_logits)


@pytest.mark.parametrize("kind", KINDS)
def test_only_A_and_B_are_trainable_and_their_count_is_the_closed_form(kind):
    model = make_model(kind)
    expected_before = expected_lora_parameters(model, rank=8, targets=("qkv", "proj"))
    apply_lora(model, rank=8, alpha=16.0, targets=("qkv", "proj"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # by hand: per block qkv 32→96 and proj 32→32, so r·(32+96) + r·(32+32) = 8·192; two blocks
    assert trainable == count_lora_parameters(model) == expected_before == 2 * 8 * 192
    assert expected_lora_parameters(model, rank=8, targets=("qkv", "proj")) == expected_before
    shapes = {"a.qkv": (96, 32), "a.proj": (32, 32), "a.up": (128, 32)}
    assert expected_lora_parameters(shapes, rank=2, targets=("qkv",)) == 2 * 128
    frozen = [n for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B"))]
    assert frozen and not any(dict(model.named_parameters())[n].requires_grad for n in frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_steps_change_only_A_and_B(kind):
    model, x = make_model(kind), tokens()
    apply_lora(model, rank=4, alpha=8.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # every parameter goes to the optimizer, with weight decay: frozen ones must still not move
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):  # step 1 moves only B (A's gradient is ∝ B = 0); later steps move A too
        loss = model(x, x)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_adapter_reproduce_the_logits(kind, tmp_path):
    model, x = make_model(kind), tokens()
    apply_lora(model, rank=4, alpha=8.0, targets=("qkv", "proj", "up"), dropout=0.1)
    randomize_lora(model)
    want = model.eval()(x)[0]
    save_adapter(tmp_path / "adapter", model, {"base": "tiny.pt", "task": "demo"})
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg == dict(rank=4, alpha=8.0, targets=["qkv", "proj", "up"], dropout=0.1, base="tiny.pt", task="demo")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert set(saved) == set(lora_state_dict(model)) and all(k.endswith(("lora_A", "lora_B")) for k in saved)

    fresh = make_model(kind)  # same seed: the same base weights, as a real base checkpoint would give
    load_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(fresh.eval()(x)[0], want, rtol=0, atol=0)


def test_load_adapter_rejects_a_model_it_does_not_fit(tmp_path):
    model = make_model("causal")
    apply_lora(model, rank=4, alpha=8.0)
    save_adapter(tmp_path, model, {})
    wider = CausalLM(ModelConfig(**{**SIZES, "n_embd": 64}))
    with pytest.raises(ValueError, match="does not fit this model: .*lora_A is \\(4, 32\\), the model needs"):
        load_adapter(tmp_path, wider)
    assert count_lora_parameters(wider) == 0  # untouched
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        load_adapter(tmp_path / "nothing", make_model("causal"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be >= 1"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(alpha=-1.0), "alpha must be > 0"),
    (dict(targets=("qkv", "attn_out")), "'attn_out' matches no linear layer; .* are: .*lm_head, proj, qkv, up"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        apply_lora(make_model("causal"), **kwargs)
    assert "\n" not in str(e.value)


def test_applying_twice_is_an_error():
    model = make_model("causal")
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    merge_lora(model)
    apply_lora(model)  # after merging the model is plain again


def test_a_quantized_model_is_refused():
    from minillm.compress.quant import quantize_model
    model = quantize_model(make_model("causal"), "int8")
    with pytest.raises(ValueError, match="LoRA on a quantized model is not supported: fine-tune the float "
                                         "checkpoint, then quantize the merged model"):
        apply_lora(model)
