"""Instruction tuning (minillm/finetune/instruct.py): the loss sees the response only, examples fit the
context, bad input fails in one line, and a tuned checkpoint answers through `minillm generate`."""

import json

import pytest
import torch
import torch.nn.functional as F

from minillm.weights.checkpoint import load_model
from minillm.cli import main
from minillm.data.tokenizer import CharTokenizer
from minillm.finetune.config import FinetuneConfig
from minillm.finetune.instruct import (END, TEMPLATES, answer, encode_example, encode_records, end_marker,
                                       finetune_instruct, format_prompt, make_batch, response_stop)
from minillm.model.config import ModelConfig
from minillm.model.losses import IGNORE_INDEX
from minillm.model.transformer import CausalLM, MaskedLM

WORDS = "cat dog sun owl fox bee ant elk yak emu".split()
RECORDS = [dict(instruction="Reverse the word.", input=w, output=w[::-1]) for w in WORDS] + \
          [dict(instruction=f"Say {w}.", input="", output=w) for w in WORDS]
CHARS = "".join(TEMPLATES.values()) + END + "".join(r["instruction"] + r["input"] + r["output"] for r in RECORDS)


def tokenizer(eos: bool = False) -> CharTokenizer:
    return CharTokenizer.from_text(CHARS, special_tokens=["<|endoftext|>"] if eos else [])


def tiny(tok, block_size: int = 64, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32))


def test_templates_with_and_without_input():
    assert format_prompt("Add these.", "2 + 3") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd these.\n\n### Input:\n2 + 3\n\n### Response:\n")
    assert format_prompt({"instruction": "Say hi.", "input": ""}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_prompt("Add these.", "2 + 3", "plain") == "### Instruction:\nAdd these.\n2 + 3\n### Response:\n"
    assert format_prompt("Say hi.", template="plain") == "### Instruction:\nSay hi.\n### Response:\n"
    with pytest.raises(ValueError, match="unknown instruction template 'chatml'"):
        format_prompt("Say hi.", template="chatml")


@pytest.mark.parametrize("eos", [False, True])
def test_end_marker_is_the_eos_token_or_the_end_text(eos):
    tok = tokenizer(eos)
    ids, n_prompt, cut = encode_example(RECORDS[0], tok, 200, "plain")
    prompt = tok.encode(format_prompt(RECORDS[0], template="plain"))
    assert not cut and ids[:n_prompt] == prompt
    if eos:
        assert end_marker(tok) == "<|endoftext|>" and ids[-1] == tok.special_tokens["<|endoftext|>"]
        assert tok.decode(ids[n_prompt:]) == "tac<|endoftext|>"
    else:
        assert end_marker(tok) == END and tok.decode(ids[n_prompt:]) == "tac" + END
    assert response_stop(tok) == [end_marker(tok)]


def test_prompt_targets_are_masked_response_targets_are_next_tokens():
    tok = tokenizer()
    examples = [encode_example(r, tok, 200, "plain")[:2] for r in (RECORDS[0], RECORDS[12])]
    batch = make_batch(examples, pad_id=0, device="cpu")
    x, y = batch["idx"], batch["targets"]
    assert x.shape == y.shape == (2, max(len(ids) for ids, _ in examples) - 1)
    for row, (ids, n_prompt) in enumerate(examples):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (y[row, :n_prompt - 1] == IGNORE_INDEX).all()  # these positions predict prompt tokens
        assert y[row, n_prompt - 1:n].tolist() == ids[n_prompt:]  # the response and the end marker
        assert (y[row, n:] == IGNORE_INDEX).all() and (x[row, n:] == 0).all()  # padding
    assert examples[0][1] != examples[1][1]  # prompts of different lengths: the mask is per row


def test_loss_is_cross_entropy_over_the_response_tokens_only():
    tok = tokenizer()
    model = tiny(tok).eval()
    examples = [encode_example(r, tok, 64, "plain")[:2] for r in RECORDS[:4]]
    batch = make_batch(examples, pad_id=0, device="cpu")
    logits, loss = model(**batch)
    picked_logits, picked_targets = [], []
    for row, (ids, n_prompt) in enumerate(examples):
        span = slice(n_prompt - 1, len(ids) - 1)  # positions whose next token is in the response
        picked_logits.append(logits[row, span])
        picked_targets.append(torch.tensor(ids[n_prompt:]))
    expected = F.cross_entropy(torch.cat(picked_logits), torch.cat(picked_targets))
    torch.testing.assert_close(loss, expected)


def test_truncation_keeps_half_the_window_for_the_response_and_is_counted():
    tok = tokenizer()
    long_answer = dict(instruction="Say cat.", input="", output="cat " * 40)  # prompt short, response long
    long_prompt = dict(instruction="Say " + "dog " * 40, input="", output="cat " * 40)  # both long
    short = RECORDS[0]
    for record in (long_answer, long_prompt, short):
        ids, n_prompt, cut = encode_example(record, tok, 96, "plain")
        assert len(ids) <= 97
        assert cut == (record is not short)
    ids, n_prompt, _ = encode_example(long_answer, tok, 96, "plain")
    assert ids[:n_prompt] == tok.encode(format_prompt(long_answer, template="plain"))  # the prompt stays whole
    ids, n_prompt, _ = encode_example(long_prompt, tok, 96, "plain")
    assert n_prompt == 48 and tok.decode(ids[:n_prompt]).endswith("### Response:\n")  # its end is kept
    assert tok.decode(ids[n_prompt:]) == ("cat " * 40)[:49]
    _, cut = encode_records([long_answer, short, long_prompt], tok, 96, "plain")
    assert cut == 2


def test_a_character_the_tokenizer_lacks_names_the_record():
    tok = tokenizer()
    records = [RECORDS[0], dict(instruction="Say ~.", input="", output="cat")]
    with pytest.raises(ValueError, match=r"training record 2 \('Say ~\.'\): character '~' \(U\+007E\).*BPE") as e:
        encode_records(records, tok, 64, "plain", "training")
    assert "\n" not in str(e.value)


def write_records(tmp_path, records=RECORDS * 3):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_refuses_a_masked_lm_and_a_linear_probe(tmp_path):
    tok = tokenizer()
    cfg = dict(task="instruct", data=write_records(tmp_path), out_dir=str(tmp_path / "out"))
    masked = MaskedLM(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                  causal=False))
    with pytest.raises(ValueError, match="needs a causal LM.*not a MaskedLM"):
        finetune_instruct(masked, tok, FinetuneConfig(**cfg), progress=False)
    with pytest.raises(ValueError, match="a linear probe has no new head for instruction tuning; use full or "):
        finetune_instruct(tiny(tok), tok, FinetuneConfig(**cfg, freeze_trunk=True), progress=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny char-level model tuned 40 steps on a generated record set (the plain template, END marker)."""
    tmp_path = tmp_path_factory.mktemp("instruct")
    tok = tokenizer()
    cfg = FinetuneConfig(task="instruct", data=write_records(tmp_path), template="plain", max_iters=40,
                         batch_size=8, learning_rate=3e-3, warmup_iters=5, eval_interval=20, max_eval_examples=4,
                         dev_fraction=0.2, out_dir=str(tmp_path / "out"), device="cpu")
    lines = []
    result = finetune_instruct(tiny(tok, block_size=96), tok, cfg, base="tiny", progress=False, say=lines.append)
    return result, tok, cfg, lines


def test_finetune_instruct_end_to_end(tuned):
    result, tok, cfg, lines = tuned
    ev = result["eval"]
    assert ev["step"] == 40 and set(ev) >= {"val_loss", "val_exact_match", "val_rougeL"}
    assert 0 <= ev["val_exact_match"] <= 1 and 0 <= ev["val_rougeL"] <= 1
    assert ev["val_loss"] < 2.5  # from ~ln(vocab) = 3.4: it learnt something about the responses
    assert result["truncated"] == {"train": 0, "dev": 0}
    assert result["params"]["trainable"] == result["params"]["total"]  # full fine-tuning
    assert result["n_train"] + result["n_dev"] == len(RECORDS) * 3
    assert 1 <= len(result["samples"]) <= 3 and result["samples"][0]["prompt"].startswith("### Instruction:\n")
    assert any("instruction tuning (full, template 'plain', end '\\n###')" in line for line in lines)
    model, tok2, meta = load_model(cfg.out_dir)
    assert meta["instruct"] == {"template": "plain", "end": END}
    assert meta["base"] == "tiny" and meta["finetune"]["task"] == "instruct"
    assert tok2.to_dict() == tok.to_dict()
    reply = answer(model, tok2, "Say cat.", template="plain", max_new_tokens=20)
    assert END not in reply and len(reply) <= 20


def test_lora_trains_only_the_adapters(tmp_path):
    tok = tokenizer()
    cfg = FinetuneConfig(task="instruct", data=write_records(tmp_path), template="plain", max_iters=2,
                         lora_rank=2, batch_size=4, max_eval_examples=2, dev_fraction=0.2,
                         out_dir=str(tmp_path / "out"), device="cpu")
    model = tiny(tok, block_size=96)
    result = finetune_instruct(model, tok, cfg, progress=False, say=lambda line: None)
    trainable = {n for n, p in result["model"].named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert load_model(cfg.out_dir)[2]["instruct"]["template"] == "plain"


def test_cli_generate_wraps_the_prompt_and_stops_at_the_end_marker(tuned, capsys, monkeypatch):
    import minillm.cli.generate as cli_generate

    _, _, cfg, _ = tuned
    calls = []
    real = cli_generate.generate_text

    def spy(model, tok, prompts, max_new_tokens, **kw):
        calls.append((prompts, kw["stop"]))
        return real(model, tok, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(cli_generate, "generate_text", spy)
    assert main(["generate", cfg.out_dir, "--prompt=Reverse the word.", "--input=owl", "--max_new_tokens=5",
                 "--temperature=0"]) == 0
    assert calls[-1] == ([format_prompt("Reverse the word.", "owl", "plain")], [END])
    out = capsys.readouterr().out
    assert "### Instruction" not in out and "Reverse the word." not in out  # the response alone
    assert main(["generate", cfg.out_dir, "--prompt=Say cat.", "--raw", "--max_new_tokens=5", "--temperature=0"]) == 0
    assert calls[-1] == (["Say cat."], [])
    assert capsys.readouterr().out.startswith("Say cat.")


def test_generate_help_explains_instruction_mode(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "instruction-tuned checkpoint" in out and "--raw" in out and "--input" in out
