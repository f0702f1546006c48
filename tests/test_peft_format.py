"""LoRA adapters in PEFT's format (minillm/finetune/peft_format.py): PeftModel.from_pretrained on the
Hugging Face export of the base computes minillm's LoRA logits (to 1e-5), minillm reads a PEFT folder
back (its own bit-exactly, one trained in peft with separate q/k/v adapters exactly), a fine-tune run
writes PEFT's files beside its own, and an adapter of another base is refused in one line."""

import copy

import pytest
import torch

from minillm.cli import main
from minillm.finetune.lora import LoRALinear, apply_lora, load_adapter
from minillm.finetune.peft_format import PEFT_WEIGHTS, load_peft_adapter, save_peft_adapter
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.weights.checkpoint import load_model
from minillm.weights.huggingface_write import export_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = {
    "gpt2": dict(positional="learned", activation="gelu_tanh", norm="layernorm", bias=True),
    "llama": dict(positional="rotary", activation="swiglu", norm="rmsnorm", bias=False, n_kv_head=2,
                  tie_weights=False),
}
TARGETS = {"gpt2": ("qkv", "proj", "up", "down"), "llama": ("qkv", "proj", "gate", "up", "down")}


def tiny(family: str, n_embd: int = 32, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=n_embd,
                                **FAMILIES[family])).eval()


def with_lora(model: CausalLM, targets, rank: int = 4) -> CausalLM:
    """apply_lora, then B away from its zero init so the update is not nothing."""
    apply_lora(model, rank=rank, alpha=8.0, targets=targets)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    return model


IDX = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_on_the_hf_export_gives_minillms_lora_logits(tmp_path, family):
    base = tiny(family)
    export_hf(base, None, tmp_path / "hf")
    tuned = with_lora(copy.deepcopy(base), TARGETS[family])
    save_peft_adapter(tmp_path / "adapter", tuned, base=str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = tuned(IDX)[0], peft_model(IDX).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 8.0
    # and back into minillm: the same A and B, bit for bit
    again = load_peft_adapter(tmp_path / "adapter", copy.deepcopy(base))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tuned.state_dict().values()))


def test_an_adapter_trained_in_peft_loads_exactly(tmp_path):
    """PEFT's own adapters: separate A for q and v, k_proj not adapted (the usual target_modules)."""
    base = tiny("llama")
    export_hf(base, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = peft.get_peft_model(hf, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(tmp_path / "adapter", copy.deepcopy(base))
    assert ours.lora_config["rank"] == 6 and ours.lora_config["targets"] == ["down", "qkv"]  # q and v stacked
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX)[0], peft_model.eval()(IDX).logits, atol=1e-5, rtol=0)


def test_an_adapter_of_another_base_is_refused(tmp_path):
    save_peft_adapter(tmp_path / "wide", with_lora(tiny("llama", n_embd=64), ("qkv",)))
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"does not fit this model: model.layers.0.self_attn.q_proj has A \(4, 64\)"):
        load_peft_adapter(tmp_path / "wide", model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # left as it was
    save_peft_adapter(tmp_path / "gpt2", with_lora(tiny("gpt2"), ("qkv",)))
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.lora_A.weight names no module of it"):
        load_peft_adapter(tmp_path / "gpt2", model)


# OUT/adapter/adapter_config.json keeps lora.py's keys beside PEFT's; peft warns that it ignores them
@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")
def test_a_lora_finetune_writes_a_peft_adapter_and_export_copies_it(tmp_path, capsys):
    """`minillm finetune --lora_rank` on a tiny instruct run: OUT/adapter/ holds both formats, PEFT on the
    HF export of the base gives the merged checkpoint's logits, and `export --format=peft` writes it alone."""
    import json

    from minillm.data.tokenizer import BPETokenizer
    from minillm.weights.checkpoint import save_model

    records = [dict(instruction="Say it.", input=w, output=w) for w in "cat dog sun owl fox bee".split()] * 3
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = BPETokenizer.train("".join(json.dumps(r) for r in records), 270, ["<|endoftext|>"])  # bytes: any text
    torch.manual_seed(0)
    base = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32,
                                **FAMILIES["llama"])).eval()
    save_model(tmp_path / "base", base, tok)
    assert main(["finetune", str(tmp_path / "base"), "--task=instruct", f"--data={data}", "--max_iters=3",
                 "--lora_rank=2", "--lora_targets=qkv,proj,down", "--batch_size=4", "--eval_interval=3",
                 "--max_eval_examples=2", "--learning_rate=3e-2", f"--out_dir={tmp_path / 'run'}"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / PEFT_WEIGHTS).is_file() and (adapter / "adapter.safetensors").is_file()
    merged, _, _ = load_model(tmp_path / "run")
    assert main(["export", str(tmp_path / "base"), "--format=hf", f"--out={tmp_path / 'hf'}"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    idx = IDX % tok.vocab_size
    with torch.no_grad():
        want = merged(idx)[0]
        got = peft.PeftModel.from_pretrained(hf, adapter).eval()(idx).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # minillm's own reader still takes the folder (its keys stay in adapter_config.json)
        torch.testing.assert_close(load_adapter(adapter, copy.deepcopy(base))(idx)[0], want, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--format=peft", f"--out={tmp_path / 'peft'}"]) == 0
    assert "LoRA rank 2 on self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.down_proj" \
        in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and "rank" not in config  # PEFT's keys only
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(idx).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_export_peft_of_a_folder_without_adapter_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format=peft", f"--out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no LoRA adapter" in err
