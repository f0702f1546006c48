"""QLoRA (finetune/qlora.py, compress/quant_grad.py): LoRA adapters over a frozen quantized base.

The gradient through a QuantLinear against nn.Linear holding the dequantized weight (float64), no float
copy of Ŵ kept for the backward, a few steps lowering the loss with the codes unchanged, the merge into a
float model, and the refusals (one line each). Tiny models only; the real SmolLM2 run is bench/qlora.py.
"""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.compress import cpu_kernel
from minillm.compress.quant import QuantEmbedding, QuantLinear, quantize_model
from minillm.finetune.lora import LoRALinear, apply_lora, lora_parameters, lora_state_dict, merge_lora
from minillm.finetune.qlora import check_trainable, dequantize_model, frozen_codes, is_quantized
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM

SIZES = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64)


def tiny(seed: int = 0, emb_scale: float = 1.0, **quant) -> CausalLM:
    """A tied CausalLM quantized int4 g32 (embedding and head too when quant says so). emb_scale > 1 gives
    the frozen tied head room to move the logits (at init_std 0.02 they are all near 0: loss ≈ ln V)."""
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**SIZES)).eval()
    with torch.no_grad():
        model.transformer.tok_emb.weight.mul_(emb_scale)
    return quantize_model(model, "int4", 32, **quant)


def train(model, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps on the adapters only, on one fixed batch; the losses."""
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=lr)
    x, y = tokens(2), tokens(3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, targets=y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def tokens(seed: int = 1, B: int = 4) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (B, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", None), ("int8", 32)])
@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("chunk", [4096, 20])  # the whole matrix at once; 20-row chunks (48 = 20 + 20 + 8)
def test_gradient_through_a_quantlinear_equals_linear_on_the_dequantized_weight(scheme, group, T, chunk, monkeypatch):
    from minillm.compress import quant_grad

    monkeypatch.setattr(quant_grad, "CHUNK", chunk)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, dtype=torch.float64)
    q = QuantLinear.from_linear(lin, scheme, group, "reference", int8_groups=group is not None)
    ref = nn.Linear(64, 48, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized_weight(torch.float64))
        ref.bias.copy_(q.bias)
    x = torch.randn(3, T, 64, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(3, T, 48, dtype=torch.float64)
    y, y_ref = q(x), ref(x_ref)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert_close(y, y_ref, rtol=0, atol=1e-12)
    assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert all(not b.requires_grad for b in q.buffers())  # the codes have no gradient


@pytest.mark.skipif(not cpu_kernel.available(), reason="the CPU kernel does not compile here")
def test_the_cpu_kernel_serves_the_training_forward():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 48), "int4", 32, "cpu")
    x = torch.randn(2, 17, 64, requires_grad=True)  # M = 34 rows: the kernel's GEMM path
    y = q(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, q.dequantized_weight(), q.bias)
    y_ref.square().sum().backward()
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_no_float_copy_of_the_weight_is_kept_for_the_backward():
    """Autograd's own F.linear would save Ŵ (N, K) until the backward: the fp32 model again."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 48, bias=False), "int4", 32, "reference")
    saved = []
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = q(x)
        y_plain = F.linear(x, q.dequantized_weight())  # the control: what autograd alone would keep
    y.sum().backward()
    assert 48 * 64 in saved  # the control's Ŵ (or its transposed view) ...
    assert len(saved) == 1  # ... and nothing saved by the QuantLinear at all
    assert y_plain.shape == y.shape


def test_adapters_wrap_quantized_layers_with_sensible_keys_and_start_as_a_no_op():
    model, x = tiny(), tokens()
    before = model(x)[0]
    names = apply_lora(model, rank=4, alpha=8.0, targets=("qkv", "proj"), quantized=True)
    assert names == ["transformer.blocks.0.attn.qkv", "transformer.blocks.0.attn.proj",
                     "transformer.blocks.1.attn.qkv", "transformer.blocks.1.attn.proj"]
    layer = model.get_submodule(names[0])
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantLinear)
    keys = set(model.state_dict())
    assert {f"{names[0]}.base.weight_q", f"{names[0]}.base.scales", f"{names[0]}.lora_A",
            f"{names[0]}.lora_B"} <= keys
    assert set(lora_state_dict(model)) == {f"{n}.lora_{m}" for n in names for m in "AB"}  # as for float LoRA
    assert torch.equal(model(x)[0], before)  # B = 0: exactly the quantized model
    assert [p.requires_grad for p in model.parameters()].count(True) == len(lora_parameters(model))


def test_a_few_qlora_steps_lower_the_loss_and_leave_the_codes_unchanged():
    model = tiny(emb_scale=10.0, include_embeddings=True, include_head=True)  # all quantized, the tied table too
    codes = frozen_codes(model)
    assert len(codes) == 2 * 4 * 3 + 3  # 4 linears (qkv, proj, up, down) x 2 blocks x 3 buffers; the table
    torch.manual_seed(5)
    apply_lora(model, rank=4, alpha=8.0, targets=("qkv", "proj", "up", "down"), quantized=True)
    losses = train(model)
    assert losses[-1] < 0.5 * losses[0]
    after = frozen_codes(model)
    stripped = {k.replace(".base.", "."): v for k, v in after.items()}  # the same buffers, under the wrapper
    assert set(stripped) == set(codes)
    assert all(torch.equal(codes[k], stripped[k]) for k in codes)


def test_qlora_trains_as_lora_over_the_dequantized_float_model():
    """Same Ŵ, same adapters' init, same batches: the two runs differ only in where Ŵ lives."""
    curves = []
    for quantized in (True, False):
        model = tiny(emb_scale=10.0, include_embeddings=True, include_head=True)
        if not quantized:
            dequantize_model(model)
        torch.manual_seed(5)
        apply_lora(model, rank=4, alpha=8.0, targets=("qkv", "proj", "up", "down"), quantized=quantized)
        curves.append(train(model, steps=10))
    assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-4)


def test_merging_gives_a_float_model_that_computes_what_the_adapter_computed():
    model, x = tiny(include_embeddings=True, include_head=True), tokens()
    apply_lora(model, rank=4, alpha=8.0, targets=("qkv", "proj"), quantized=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    with torch.no_grad():
        expected = model(x)[0]
    merge_lora(model)
    assert not is_quantized(model) and not hasattr(model, "quant_config")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.transformer.tok_emb, nn.Embedding)
    assert model.lm_head.weight is model.transformer.tok_emb.weight  # still tied, one float table
    with torch.no_grad():
        assert_close(model(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_dequantize_model_keeps_the_logits():
    model, x = tiny(include_embeddings=True, include_head=True), tokens()
    with torch.no_grad():
        expected = model(x)[0]
        dequantize_model(model)
        assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
        assert_close(model(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_refusals_are_one_line_each():
    model = tiny()
    with pytest.raises(ValueError, match=r"quantized=True") as e:
        apply_lora(model)  # QLoRA is asked for, not stumbled into
    assert "\n" not in str(e.value)
    for mode, what in (("full", "full fine-tuning"), ("frozen", "freeze_trunk")):
        with pytest.raises(ValueError, match=what) as e:
            check_trainable(model, mode)
        assert "--lora_rank=8 --quantize=int4" in str(e.value) and "\n" not in str(e.value)
    check_trainable(model, "lora")  # the one mode a quantized base trains in
    check_trainable(CausalLM(ModelConfig(**SIZES)), "full")  # a float model trains in any


WORDS = "cat dog sun owl fox bee ant elk yak emu".split()
RECORDS = [dict(instruction="Reverse the word.", input=w, output=w[::-1]) for w in WORDS] * 3


def _checkpoint(tmp_path, quantized: bool):
    from minillm.data.tokenizer import CharTokenizer
    from minillm.finetune.instruct import END, TEMPLATES
    from minillm.weights.checkpoint import save_model

    chars = "".join(TEMPLATES.values()) + END + "".join(r["instruction"] + r["input"] + r["output"] for r in RECORDS)
    tok = CharTokenizer.from_text(chars)
    torch.manual_seed(0)
    lm = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    if quantized:
        quantize_model(lm, "int4", 32)
    folder = tmp_path / ("q" if quantized else "f")
    save_model(folder, lm, tok)
    return str(folder)


def _task(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return str(path)


def test_cli_qlora_runs_over_a_float_base_and_a_quantized_checkpoint(tmp_path, capsys):
    from minillm.cli import main
    from minillm.weights.checkpoint import load_model

    data = _task(tmp_path)
    for base in (_checkpoint(tmp_path, False), _checkpoint(tmp_path, True)):
        out = tmp_path / f"out-{base[-1]}"
        assert main(["finetune", base, "--task=instruct", "--template=plain", f"--data={data}", "--lora_rank=4",
                     "--quantize=int4", "--max_iters=4", "--eval_interval=2", "--batch_size=4",
                     "--max_eval_examples=2", f"--out_dir={out}"]) == 0, capsys.readouterr().err
        assert (out / "adapter" / "adapter.safetensors").is_file()
        merged, _, meta = load_model(out)  # the merged checkpoint: a float model
        assert "quantization" not in meta and not is_quantized(merged)
    capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    (["--task=instruct", "--lora_rank=4"], "pass --quantize=int4 to train QLoRA adapters"),
    (["--task=instruct"], "full fine-tuning needs float weights"),
    (["--task=instruct", "--freeze_trunk=true"], "freeze_trunk (a probe) needs float weights"),
    (["--task=instruct", "--lora_rank=4", "--quantize=int8"], "holds int4 weights, not int8"),
    (["--task=classify", "--lora_rank=4", "--quantize=int4"], "QLoRA runs --task=instruct"),
])
def test_cli_refusals_on_a_quantized_checkpoint_are_one_line(tmp_path, capsys, argv, message):
    from minillm.cli import main

    base = _checkpoint(tmp_path, True)
    assert main(["finetune", base, f"--data={_task(tmp_path)}", f"--out_dir={tmp_path / 'o'}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_quantize_without_lora_is_refused(tmp_path, capsys):
    from minillm.cli import main

    assert main(["finetune", _checkpoint(tmp_path, False), "--quantize=int4", f"--out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --lora_rank=8 too" in err and len(err.splitlines()) == 1
