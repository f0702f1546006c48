"""The options generate, chat and serve share (minillm/cli/run_options.py): --threads, --backend,
--dequantize, --compile. Each is checked where it lands: the thread count torch uses, the keywords
load_model gets, the flat_decode generate_text gets, and, end to end on a tiny Q4_0 GGUF file, that
the file's blocks stay quantized unless --dequantize.
"""

import inspect

import pytest
import torch

from minillm.cli import main
from minillm.cli.run_options import flat_decode, load_options
from minillm.compress.quant import QuantLinear, default_backend
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.weights.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # (restores the thread count --threads changes)

KEEPS = "keep_quantized" in inspect.signature(load_model).parameters


class Args:
    def __init__(self, **kw):
        self.threads, self.backend, self.dequantize, self.compile = None, "auto", False, False
        self.__dict__.update(kw)


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_help_states_threads_backend_and_dequantize(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads" in text and "one per physical core" in text
    assert "{auto,reference,cpu,cpu-exact,triton}" in text and "default_backend" in text and "--dequantize" in text
    assert ("--compile" in text) == (command != "serve")  # the server's engine steps without compiling


def test_load_options_keep_a_gguf_quantized_unless_dequantize():
    assert load_options(Args(), "cpu")["backend"] == default_backend("cpu")  # auto: the library's choice
    assert load_options(Args(backend="reference"), "cpu")["backend"] == "reference"
    if KEEPS:
        assert load_options(Args(), "cpu")["keep_quantized"] is True
        assert load_options(Args(dequantize=True), "cpu")["keep_quantized"] is False
    assert flat_decode(Args()) is True and flat_decode(Args(), readable=True) is False
    assert flat_decode(Args(compile=True)) == "compile"
    with pytest.raises(ValueError, match="choose one"):
        flat_decode(Args(compile=True), readable=True)


def test_generate_passes_each_option_where_it_belongs(monkeypatch, tmp_path, capsys):
    from tests.test_chat import tiny

    model, tok = tiny()
    seen = {}

    def fake_load(path, device, **kw):
        seen["load"] = kw
        return model, tok, {}

    def fake_generate_text(model_, tok_, rows, n, **kw):
        seen["flat_decode"], seen["threads"] = kw["flat_decode"], torch.get_num_threads()
        kw["token_counts"][:] = [0]
        return [""]

    monkeypatch.setattr("minillm.cli.generate.find_checkpoint", lambda p: tmp_path)
    monkeypatch.setattr("minillm.cli.generate.load_model", fake_load)
    monkeypatch.setattr("minillm.cli.generate.generate_text", fake_generate_text)
    torch.set_num_threads(2)
    assert main(["generate", "m.gguf", "--threads=1", "--backend=reference", "--dequantize", "--compile",
                 "--prompt=Hi"]) == 0
    assert seen["threads"] == 1 and seen["flat_decode"] == "compile"
    assert seen["load"]["backend"] == "reference" and seen["load"].get("keep_quantized", False) is False
    assert "KV cache, 1 thread;" in capsys.readouterr().err
    assert main(["generate", "m.gguf", "--prompt=Hi"]) == 0
    assert seen["flat_decode"] is True and seen["load"]["backend"] == default_backend("cpu")
    assert seen["load"].get("keep_quantized", KEEPS) is KEEPS  # a GGUF stays quantized by default


@pytest.mark.parametrize("argv,message", [
    (["generate", "m", "--compile", "--readable"], "choose one"),
    (["generate", "m", "--compile", "--no_cache"], "--compile compiles the cached"),
    (["generate", "m", "--threads=0"], "--threads must be >= 1"),
])
def test_bad_combinations_are_one_line(argv, message, monkeypatch, tmp_path, capsys):
    from tests.test_chat import tiny

    monkeypatch.setattr("minillm.cli.generate.find_checkpoint", lambda p: tmp_path)
    monkeypatch.setattr("minillm.cli.generate.load_model", lambda *a, **k: (*tiny(), {}))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own refusal of a backend it does not list
        main(["generate", "m", "--backend=fast"])


def test_chat_gives_its_session_the_compiled_step_when_asked(monkeypatch, tmp_path):
    from tests.test_chat import tiny

    model, tok = tiny()
    sessions = []
    monkeypatch.setattr("minillm.cli.chat.load_model", lambda path, device, **kw: (model, tok, {}))
    monkeypatch.setattr("minillm.cli.chat.ChatSession", lambda *a, **kw: sessions.append(kw))
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert main(["chat", str(tmp_path / "m.gguf"), "--compile", "--threads=1"]) == 0
    assert main(["chat", str(tmp_path / "m.gguf")]) == 0
    assert [s["flat_decode"] for s in sessions] == ["compile", True]


@pytest.mark.skipif(not KEEPS, reason="load_model has no keep_quantized yet (GGUF blocks kept quantized)")
def test_a_q4_0_gguf_stays_quantized_unless_dequantize(tmp_path, capsys):
    from minillm.data.tokenizer import BPETokenizer
    from minillm.weights.gguf_write import write_gguf

    tok = BPETokenizer.train("the quick brown fox jumps over the lazy dog. " * 8, vocab_size=280,
                             special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=288, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                 ffn_hidden=96, positional="rotary", activation="swiglu", norm="rmsnorm",
                                 bias=False)).eval()
    path = write_gguf(model, tok, tmp_path / "m.gguf", file_type="q4_0")
    kept, _, _ = load_model(path, **load_options(Args(backend="reference"), "cpu"))
    float_, _, _ = load_model(path, **load_options(Args(dequantize=True), "cpu"))
    assert any(isinstance(m, QuantLinear) for m in kept.modules())
    assert not any(isinstance(m, QuantLinear) for m in float_.modules())
    for extra in ([], ["--dequantize"]):  # end to end: the closing line says which weights ran
        assert main(["generate", str(path), "--prompt=the", "--max_new_tokens=4", "--temperature=0",
                     "--backend=reference", *extra]) == 0
        err = capsys.readouterr().err
        assert ("run in fp32" in err) == bool(extra) and ("kept quantized, backend reference" in err) != bool(extra)
