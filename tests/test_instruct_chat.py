"""Instruction tuning in the model's own chat template (template="chat", minillm/finetune/instruct.py):
the instruction is a user turn, the answer the assistant's, and the end marker the template's end of turn."""

import json

import pytest
import torch

from minillm.data.tokenizer_hf import HFTokenizer
from minillm.finetune.config import FinetuneConfig
from minillm.finetune.instruct import encode_example, end_marker, finetune_instruct, format_prompt, response_stop
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from tests.helpers import SMOLLM2_TEMPLATE

RECORDS = [dict(instruction="Reverse the word.", input=w, output=w[::-1]) for w in "cat dog sun owl fox".split()] + \
          [dict(instruction=f"Say {w}.", input="", output=w) for w in "bee ant elk yak emu".split()]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SMOLLM2_TEMPLATE] + [json.dumps(r) for r in RECORDS] * 3, trainer)
    return HFTokenizer(tok.to_str(), chat_template=SMOLLM2_TEMPLATE, eos_token="<|im_end|>")


def test_the_chat_template_wraps_the_instruction_as_a_user_turn(chat_tokenizer):
    prompt = format_prompt(RECORDS[0], template="chat", tokenizer=chat_tokenizer)
    assert prompt.endswith("<|im_start|>user\nReverse the word.\n\ncat<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # the template's own default system message
    assert format_prompt("Say bee.", template="chat", tokenizer=chat_tokenizer).endswith(
        "<|im_start|>user\nSay bee.<|im_end|>\n<|im_start|>assistant\n")


def test_the_end_marker_is_the_end_of_turn_not_end_of_text(chat_tokenizer):
    # the vocabulary has <|endoftext|> too: the alpaca templates would end there, the chat template ends turns
    assert end_marker(chat_tokenizer) == "<|endoftext|>"
    assert end_marker(chat_tokenizer, "chat") == "<|im_end|>" == response_stop(chat_tokenizer, "chat")[0]
    ids, n_prompt, cut = encode_example(RECORDS[0], chat_tokenizer, block_size=256, template="chat")
    assert not cut and ids[-1] == chat_tokenizer.special_tokens["<|im_end|>"]
    assert chat_tokenizer.decode(ids[n_prompt:]) == "tac<|im_end|>"


def test_chat_needs_a_tokenizer_with_a_template(chat_tokenizer):
    plain = HFTokenizer(chat_tokenizer.to_dict()["tokenizer_json"])
    for call in (lambda: format_prompt("Say hi.", template="chat"),
                 lambda: format_prompt("Say hi.", template="chat", tokenizer=plain),
                 lambda: end_marker(plain, "chat")):
        with pytest.raises(ValueError, match="template 'chat' needs a tokenizer"):
            call()
    with pytest.raises(ValueError, match="choose one of alpaca, plain, chat"):
        format_prompt("Say hi.", template="chatml")


def test_a_short_chat_template_run_learns_and_answers_in_the_template(chat_tokenizer, tmp_path, monkeypatch):
    import minillm.finetune.instruct as instruct

    monkeypatch.setattr(instruct, "instruction_records", lambda *a, **k: RECORDS * 4)
    torch.manual_seed(0)
    lm = CausalLM(ModelConfig(vocab_size=chat_tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32))
    cfg = FinetuneConfig(task="instruct", template="chat", max_iters=6, batch_size=8, eval_interval=3,
                         max_eval_examples=2, out_dir=str(tmp_path / "out"), learning_rate=3e-3)
    result = finetune_instruct(lm, chat_tokenizer, cfg, progress=False, say=lambda *_: None)
    evals = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["val_loss"] for e in evals if "val_loss" in e]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert result["samples"][0]["prompt"].endswith("<|im_start|>assistant\n")
