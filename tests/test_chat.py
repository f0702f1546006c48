"""`minillm chat` and the ChatSession under it: the template, the context window, the commands.

A tiny random model with a byte-level GGUF tokenizer and SmolLM2's ChatML template stands in for
a real instruct model: what is tested is the conversation's bookkeeping, not the answers.
"""

import json

import pytest
import torch

from minillm.cli import main
from minillm.data.tokenizer_gguf import GGUFTokenizer, bytes_to_unicode
from minillm.generate.chat import ChatSession
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny(block_size=256, template=CHATML):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values()]
    tok = GGUFTokenizer(tokens, [], [3, 3, 3] + [1] * 256, "gpt2", bos_id=1, eos_id=2, chat_template=template)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size, vocab_size=len(tokens),
                      positional="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    return build_model(cfg).eval(), tok


def test_a_reply_renders_the_history_and_keeps_the_answer():
    model, tok = tiny()
    chat = ChatSession(model, tok, system="Be brief.", max_new_tokens=5, temperature=0)
    answer = chat.reply("Hi")
    assert [m["role"] for m in chat.conversation()] == ["system", "user", "assistant"]
    assert chat.messages[-1]["content"] == answer and 0 < chat.last_tokens <= 5
    chat.reply("And?")
    text, stops = chat.prompt()
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n") and stops == ["<|im_end|>"]


def test_the_oldest_turns_are_dropped_to_fit_the_context_and_the_system_message_stays():
    model, tok = tiny(block_size=96)
    chat = ChatSession(model, tok, system="S", max_new_tokens=4, temperature=0)
    for i in range(6):
        chat.reply(f"message number {i}")
    text, _ = chat.prompt()
    assert len(tok.encode(text)) <= 96 - 4
    assert chat.conversation()[0] == {"role": "system", "content": "S"}
    assert "message number 5" in text and "message number 0" not in text
    assert chat.messages[0]["role"] == "user"  # dropped a whole exchange, never half of one


def test_a_message_longer_than_the_context_is_one_line():
    model, tok = tiny(block_size=32)
    chat = ChatSession(model, tok, max_new_tokens=4)
    with pytest.raises(ValueError, match="longer than the context allows"):
        chat.reply("x" * 100)


def test_ctrl_c_keeps_what_was_written_and_raises_again():
    model, tok = tiny()
    chat = ChatSession(model, tok, max_new_tokens=20, temperature=0)
    seen = []

    def stream(piece):
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.reply("Hi", stream=stream)
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(seen)}


def test_a_model_without_a_template_is_refused():
    model, tok = tiny(template=None)
    with pytest.raises(ValueError, match="no chat template"):
        ChatSession(model, tok)


def test_the_command_line_session(monkeypatch, tmp_path, capsys):
    model, tok = tiny()
    monkeypatch.setattr("minillm.cli.chat.load_model", lambda path, device, **kw: (model, tok, {}))
    lines = iter(["Hi", "/system Be brief.", "Hello", f"/save {tmp_path / 'c.json'}", "/nonsense", ""])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(tmp_path / "model.gguf"), "--temperature=0", "--max_new_tokens=4"]) == 0
    saved = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"] and saved[0]["content"] == "Be brief."
    err = capsys.readouterr().err
    assert "tokens/s]" in err and "conversation reset" in err and "/reset" in err


def test_bad_options_are_one_line(capsys):
    assert main(["chat", "x.gguf", "--top_p=0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_generate_chat_uses_the_template_and_prints_the_answer_only(monkeypatch, tmp_path, capsys):
    model, tok = tiny()
    seen = {}

    def fake_generate_text(model_, tok_, rows, n, **kw):
        seen["rows"], seen["stop"] = rows, kw["stop"]
        if kw.get("stream"):
            kw["stream"](0, "Paris.")
        if kw.get("token_counts") is not None:
            kw["token_counts"][:] = [2]
        return ["Paris."]

    monkeypatch.setattr("minillm.cli.generate.find_checkpoint", lambda p: tmp_path)
    monkeypatch.setattr("minillm.cli.generate.load_model", lambda *a, **k: (model, tok, {}))
    monkeypatch.setattr("minillm.cli.generate.generate_text", fake_generate_text)
    assert main(["generate", "m.gguf", "--chat", "--system=Be brief.", "--prompt=Capital of France?"]) == 0
    assert seen["rows"] == ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?"
                            "<|im_end|>\n<|im_start|>assistant\n"]
    assert "<|im_end|>" in seen["stop"]
    assert capsys.readouterr().out.strip() == "Paris."  # the template is not shown


def test_generate_chat_without_a_template_is_one_line(monkeypatch, tmp_path, capsys):
    model, tok = tiny(template=None)
    monkeypatch.setattr("minillm.cli.generate.find_checkpoint", lambda p: tmp_path)
    monkeypatch.setattr("minillm.cli.generate.load_model", lambda *a, **k: (model, tok, {}))
    assert main(["generate", "m", "--chat", "--prompt=Hi"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and err.count("\n") == 1
