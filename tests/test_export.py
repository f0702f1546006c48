"""`minillm export`: the ONNX file runs in onnxruntime and gives PyTorch's logits at any (B, T).

onnx / onnxruntime / onnxscript are dev dependencies (the `export` extra): without them these tests
fail rather than skip.
"""

import onnx
import pytest
import torch

from minillm.weights.checkpoint import save_model
from minillm.cli import main
from minillm.model.config import ModelConfig
from minillm.serve.export import compare_with_onnxruntime, export_onnx
from minillm.model.transformer import CausalLM
from minillm.data.tokenizer import CharTokenizer


def tiny(**overrides) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=32), **overrides})
    return CausalLM(cfg).eval()


def input_dims(path) -> list:
    """The idx input's dimensions as stored: a name (dynamic) or a number (fixed)."""
    (inp,) = onnx.load(str(path)).graph.input
    return [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]


def test_cli_dynamo_export_matches_pytorch(tmp_path, capsys):
    # a Llama-style block exercises RoPE, RMSNorm and SwiGLU in the exported graph
    model = tiny(positional="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_weights=False,
                 n_layer=1)
    ckpt = save_model(tmp_path / "ckpt", model, CharTokenizer.from_text("abcdefghij "))
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dynamo exporter" in printed and "max |logits difference|" in printed
    dims = input_dims(out)
    assert all(isinstance(d, str) for d in dims), f"batch and sequence must be dynamic, got {dims}"
    # two shapes unlike the (2, 8) the exporter traced with, one of them the full context
    assert compare_with_onnxruntime(out, model, [(1, 5), (3, 24)]) < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"positional": "rotary"' in meta["minillm.config"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the exporter warns that it is deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_exporter_matches_pytorch(tmp_path):
    model = tiny(positional="learned", activation="gelu_tanh")  # GPT-2-style
    info = export_onnx(model, tmp_path / "gpt.onnx", exporter="torchscript")
    assert info["bytes"] > 0 and info["exporter"] == "torchscript"
    assert all(isinstance(d, str) for d in input_dims(tmp_path / "gpt.onnx"))
    assert compare_with_onnxruntime(tmp_path / "gpt.onnx", model, [(2, 3), (4, 17)]) < 1e-4


def test_export_rejects_unknown_exporter(tmp_path):
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(tiny(), tmp_path / "x.onnx", exporter="tflite")
