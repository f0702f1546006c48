"""`minillm export --format=hf`: transformers' AutoModelForCausalLM / AutoTokenizer load the folder and
compute what minillm computes (logits to 1e-5, the same greedy tokens, the same token ids), for the
GPT-2 family (learned and sinusoidal positions) and the Llama family; minillm reads its own export back
to the same weights; what a Hugging Face causal LM cannot hold is refused in one line (exit 2)."""

from pathlib import Path

import pytest
import torch

from minillm.cli import main
from minillm.data.tokenizer import BPETokenizer, CharTokenizer, GGUFTokenizer, HFTokenizer
from minillm.generate.sampling import generate
from minillm.model.config import ModelConfig
from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig
from minillm.model.transformer import CausalLM, MaskedLM
from minillm.weights.checkpoint import load_model, save_model
from minillm.weights.huggingface_write import export_hf, hf_model_type, interleaved_to_half
from minillm.weights.huggingface import half_to_interleaved
from tests.helpers import SMOLLM2_TEMPLATE, write_bpe_tokenizer_json

transformers = pytest.importorskip("transformers")

TEXT = ("The quick brown fox jumps over the lazy dog. 2024 numbers: 12345!\n"
        "Héllo wörld, naïve café — 日本語 too.  Two  spaces, tabs\tand\n\nnew lines. ") * 4
FAMILIES = {
    "gpt2": dict(positional="learned", activation="gelu_tanh", norm="layernorm", bias=True),
    "gpt2-sinusoidal": dict(),  # minillm's default recipe: sinusoidal positions, exact GELU, tied
    "llama": dict(positional="rotary", activation="swiglu", norm="rmsnorm", bias=False, n_kv_head=2,
                  tie_weights=False, rope_base=500.0),
}


def tiny(vocab_size: int, seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw))
    with torch.no_grad():  # away from the init's symmetries (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=320, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    tok = bpe()
    model = tiny(tok.vocab_size, **FAMILIES[request.param])
    save_model(tmp / "ckpt", model, tok)
    assert main(["export", str(tmp / "ckpt"), "--format=hf", f"--out={tmp / 'hf'}"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    return request.param, model, tok, hf, tmp / "hf"


def test_folder_has_the_files_transformers_reads(exported):
    _, _, _, _, out = exported
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}


def test_logits_match_transformers(exported):
    name, model, tok, hf, _ = exported
    idx = torch.randint(0, tok.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))  # the full context
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert hf.config.model_type == ("llama" if name == "llama" else "gpt2")


def test_greedy_decoding_matches_transformers(exported):
    _, model, tok, hf, _ = exported
    prompt = torch.tensor([tok.encode("The quick")])
    ours = generate(model, prompt, max_new_tokens=12, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert theirs.tolist() == ours.tolist()


def test_tokenizer_ids_match(exported):
    _, _, tok, _, out = exported
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = TEXT + "<|endoftext|>after"
    assert auto(text)["input_ids"] == tok.encode(text)
    assert auto.decode(tok.encode(text)) == text
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tok.special_tokens["<|endoftext|>"]


def test_minillm_reads_its_export_back(exported):
    name, model, _, _, out = exported
    back, _, _ = load_model(out)
    if name == "gpt2-sinusoidal":  # read back as learned positions (the table) and an untied head: same logits
        assert back.cfg.positional == "learned" and not back.cfg.tie_weights
        idx = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(back(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
        return
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_rope_row_permutation_inverts_the_reader():
    w = torch.randn(4 * 8, 5)  # (H·D, C) with H=4, D=8
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, 4), 4), w)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, 4), 4), w)


@pytest.mark.parametrize("kind", ["char", "gguf", "hf"])
def test_other_tokenizers_export_with_the_same_ids(tmp_path, kind):
    if kind == "char":
        tok = CharTokenizer.from_text(TEXT, special_tokens=["<|endoftext|>"])
    else:  # a byte-level BPE from the tokenizers library, as HF's tokenizer.json or as GGUF's vocabulary
        import json

        write_bpe_tokenizer_json(tmp_path, [TEXT], vocab_size=300)
        data = json.loads((tmp_path / "tokenizer.json").read_text())
        vocab, merges = data["model"]["vocab"], data["model"]["merges"]
        tokens = sorted(vocab, key=vocab.get)
        if kind == "gguf":
            tok = GGUFTokenizer(tokens, [" ".join(m) if isinstance(m, list) else m for m in merges],
                                [3 if t == "<|endoftext|>" else 1 for t in tokens], pre="smollm",
                                eos_id=vocab["<|endoftext|>"], chat_template=SMOLLM2_TEMPLATE)
        else:
            tok = HFTokenizer((tmp_path / "tokenizer.json").read_text(), SMOLLM2_TEMPLATE, None, "<|endoftext|>")
    model = tiny(tok.vocab_size, **FAMILIES["llama"])
    export_hf(model, tok, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TEXT + "<|endoftext|>x"
    assert auto(text)["input_ids"] == tok.encode(text)
    assert auto.decode(tok.encode(text)) == text
    if kind != "char":  # the chat template travels in tokenizer_config.json
        messages = [{"role": "user", "content": "Hi there"}]
        rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant") and \
            rendered.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def refusal(tmp_path, capsys, model, *args) -> str:
    save_model(tmp_path / "ckpt", model, bpe() if isinstance(model.cfg, ModelConfig) and model.cfg.vocab_size >= 320
               else None)
    code = main(["export", str(tmp_path / "ckpt"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_refuses_a_masked_lm(tmp_path, capsys):
    torch.manual_seed(0)
    bert = MaskedLM(ModelConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16, causal=False))
    assert "a masked LM (causal=False, BERT-style) is not a causal LM" in \
        refusal(tmp_path, capsys, bert, "--format=hf", f"--out={tmp_path / 'hf'}")
    assert not (tmp_path / "hf").exists()


def test_refuses_an_encoder_decoder(tmp_path, capsys):
    torch.manual_seed(0)
    s2s = Seq2Seq(Seq2SeqConfig(model=ModelConfig(vocab_size=64, block_size=16, n_head=2, n_embd=16),
                                n_enc_layer=1, n_dec_layer=1))
    assert "an encoder-decoder (Seq2Seq) is not a causal LM" in \
        refusal(tmp_path, capsys, s2s, "--format=hf", f"--out={tmp_path / 'hf'}")


def test_refuses_an_architecture_between_families(tmp_path, capsys):
    model = tiny(320, positional="rotary", norm="layernorm", activation="gelu")
    err = refusal(tmp_path, capsys, model, "--format=hf", f"--out={tmp_path / 'hf'}")
    assert "does not fit the Hugging Face Llama architecture" in err and "norm='layernorm'" in err


def test_refuses_a_tokenizer_with_unused_ids():
    tok = BPETokenizer.train(TEXT, vocab_size=300, special_tokens={"<|endoftext|>": 310})
    with pytest.raises(ValueError, match="unused ids"):
        tok.to_hf_json()


def test_refuses_an_unknown_gguf_type_and_type_without_gguf(tmp_path, capsys):
    model = tiny(320, **FAMILIES["llama"])
    assert "--type=q3_k: GGUF types minillm writes are f32, f16, q8_0" in \
        refusal(tmp_path, capsys, model, "--format=gguf", "--type=q3_k", f"--out={tmp_path / 'x.gguf'}")
    assert "--type applies to --format=gguf only" in \
        refusal(tmp_path, capsys, model, "--format=hf", "--type=q8_0", f"--out={tmp_path / 'hf'}")


def test_hf_model_type_names_each_family():
    assert hf_model_type(tiny(64, **FAMILIES["gpt2"]).cfg) == "gpt2"
    assert hf_model_type(tiny(64, **FAMILIES["llama"], qkv_bias=True).cfg) == "qwen2"
    assert hf_model_type(tiny(64, **FAMILIES["llama"], sliding_window=4).cfg) == "mistral"


SMOLLM2 = Path.home() / ".cache/minillm/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"the pulled model is absent ({SMOLLM2}); "
                    "`minillm pull smollm2-135m-instruct` fetches it")
def test_smollm2_from_gguf_exports_to_transformers(tmp_path):
    model, tok, _ = load_model(SMOLLM2, block_size=64)
    export_hf(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = auto.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                    add_generation_prompt=True)
    ids = tok.encode(chat)
    assert auto(chat)["input_ids"] == ids
    idx = torch.tensor([ids])
    with torch.no_grad():  # 30 layers in fp32 summed in another order: 8.6e-5 measured (logits up to 38);
        # transformers' own two attention paths differ by 1.5e-4 on this model (docs/guides/real-models.md)
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=2e-4, rtol=0)
    assert hf.generate(idx, max_new_tokens=8, do_sample=False).tolist() == \
        generate(model, idx, max_new_tokens=8, temperature=0).tolist()


def test_cli_gguf_branch_writes_a_file_minillm_reads_back(tmp_path, capsys):
    """The --format=gguf branch calls weights.gguf_write (tests/test_gguf_write.py tests the writer)."""
    tok = bpe()
    model = tiny(tok.vocab_size, **FAMILIES["llama"])
    save_model(tmp_path / "ckpt", model, tok)
    assert main(["export", str(tmp_path / "ckpt"), "--format=gguf", f"--out={tmp_path / 'm.gguf'}"]) == 0
    assert "(f32)" in capsys.readouterr().out
    back, tok2, _ = load_model(tmp_path / "m.gguf")
    idx = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])  # f32: the same numbers
    assert tok2.encode(TEXT) == tok.encode(TEXT)


def test_refuses_a_masked_lm_to_gguf(tmp_path, capsys):
    torch.manual_seed(0)
    bert = MaskedLM(ModelConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16, causal=False))
    refusal(tmp_path, capsys, bert, "--format=gguf", "--type=q8_0", f"--out={tmp_path / 'x.gguf'}")
    assert not (tmp_path / "x.gguf").exists()
