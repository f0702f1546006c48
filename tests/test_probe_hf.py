"""Issue 29's probe of malformed Hugging Face folders and config.json size bombs, re-run as written.

Each case edits a copy of a small, valid folder (random-init GPT-2 / BERT / Llama / Mistral saved
offline with save_pretrained, a byte-level BPE tokenizer.json trained with `tokenizers`), then loads
it through `minillm generate` (minillm/weights/checkpoint.py: load_model). The rule is
tests/test_corrupt_inputs.py's: exit 2, no traceback, one line naming the file and the key, the
folder untouched. Size bombs must also fail fast: before the model is built, so in well under a
second of model code, where building them took minutes or a 51 GB allocation.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from minillm.cli import main  # noqa: E402
from minillm.model.config import ModelConfig  # noqa: E402
from minillm.train import TrainConfig, train  # noqa: E402
from minillm.weights.checkpoint import load_model, step_folder, write_manifest  # noqa: E402
from tests.helpers import write_bpe_tokenizer_json  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tokenizer_json(folder: Path) -> None:
    write_bpe_tokenizer_json(folder, TEXT)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{model_type: a valid folder}: tiny random-init models, saved as Hugging Face saves them."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    made = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=32,
                                                                     n_layer=2, n_head=2)),
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=320, hidden_size=32,
                                                                     num_hidden_layers=2, num_attention_heads=2,
                                                                     intermediate_size=64,
                                                                     max_position_embeddings=64)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
        "mistral": transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=16)),
    }
    out = {}
    for kind, model in made.items():
        folder = root / kind
        model.eval().save_pretrained(folder)
        tokenizer_json(folder)
        out[kind] = folder
    return out


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def write(name: str, content: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(content)


# (id, model_type, corruption, file the line names, what it must say)
CASES = [
    ("tokenizer-empty", "llama", write("tokenizer.json", ""), "tokenizer.json", "empty file"),
    ("tokenizer-not-json", "llama", write("tokenizer.json", '{"model": {'), "tokenizer.json", "not valid JSON"),
    ("tokenizer-a-list", "llama", write("tokenizer.json", "[1, 2]"), "tokenizer.json", 'expected an object with a "model"'),
    ("tokenizer-no-model", "gpt2", write("tokenizer.json", '{"version": "1.0"}'), "tokenizer.json", '"model" object'),
    ("tokenizer-bad-added-tokens", "gpt2", write("tokenizer.json", '{"model": {}, "added_tokens": [7]}'),
     "tokenizer.json", '"added_tokens" should be a list'),
    ("tokenizer-wrong-model", "llama", write("tokenizer.json", '{"model": {"type": "Nonsense"}}'), "tokenizer.json",
     "the tokenizers library cannot read it"),
    ("tokenizer-deep", "llama", write("tokenizer.json", "[" * 100_000 + "]" * 100_000), "tokenizer.json",
     "nested too deeply"),
    ("config-not-json", "gpt2", write("config.json", '{"model_type": "gpt2",'), "config.json", "not valid JSON"),
    ("gpt2-no-n_embd", "gpt2", edit_config(n_embd=None), "config.json", "no 'n_embd' key"),
    ("gpt2-vocab-disagrees", "gpt2", edit_config(vocab_size=400), "config.json",
     r"vocab_size=400, but the weights' .*wte.weight has shape \[320, 32\]"),
    ("llama-vocab-disagrees", "llama", edit_config(vocab_size=100), "config.json",
     r"vocab_size=100, but the weights' .*embed_tokens.weight has shape \[320, 48\]"),
    ("bert-vocab-disagrees", "bert", edit_config(vocab_size=321), "config.json", "vocab_size=321"),
    ("llama-zero-heads", "llama", edit_config(num_attention_heads=0), "config.json", "num_attention_heads=0 should be >= 1"),
    ("llama-heads-disagree", "llama", edit_config(num_attention_heads=4, head_dim=None), "config.json",
     r"num_attention_heads=4, num_key_value_heads=2 and hidden_size=48 give k_proj 24 rows"),
    ("gpt2-n_positions-float", "gpt2", edit_config(n_positions=1e12), "config.json",
     r"n_positions=1000000000000.0 should be an integer"),
    ("gpt2-n_positions-disagrees", "gpt2", edit_config(n_positions=10**12), "config.json",
     r"n_positions=1000000000000, but the weights' .*wpe.weight"),
    ("gpt2-n_layer-bomb", "gpt2", edit_config(n_layer=100_000), "config.json", "n_layer=100000, but the weights hold 2"),
    ("gpt2-n_embd-bomb", "gpt2", edit_config(n_embd=65536), "config.json", r"n_embd=65536, but the weights'"),
    ("llama-context-bomb", "llama", edit_config(max_position_embeddings=10**12), "config.json",
     "elements of position tables"),
    ("llama-bad-rope-scaling", "llama", edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "config.json", "rope_scaling.rope_type='yarn' is not supported"),
    ("llama-rope-scaling-a-string", "llama", edit_config(rope_scaling="linear"), "config.json",
     "rope_scaling should be an object"),
    ("llama-rope-factor-negative", "llama", edit_config(rope_scaling={"rope_type": "linear", "factor": -2}),
     "config.json", "rope_scaling.factor=-2 should be a positive number"),
    ("llama-rope-theta-negative", "llama", edit_config(rope_theta=-10000.0), "config.json",
     "rope_theta=-10000.0 should be a positive number"),
    ("mistral-sliding-window-zero", "mistral", edit_config(sliding_window=0), "config.json",
     "sliding_window=0 should be >= 1"),
    ("bert-unknown-activation", "bert", edit_config(hidden_act="swish"), "config.json", "hidden_act='swish'"),
    ("index-names-a-missing-shard", "gpt2",
     lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors.index.json").write_text(
         json.dumps({"weight_map": {"wte.weight": "../elsewhere.safetensors"}}))),
     "model.safetensors.index.json", "is not a file of this folder"),
]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(code: int, err: str, command: str, names: str, match: str) -> None:
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"minillm {command}: error: "), lines[0]
    assert names in lines[0], f"{names} not named in: {lines[0]}"
    assert re.search(match, lines[0]), f"{match!r} not in: {lines[0]}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_malformed_hugging_face_folder_is_one_line_naming_the_file_and_key(case, folders, tmp_path, capsys):
    _, kind, corrupt, names, match = case
    folder = tmp_path / kind
    shutil.copytree(folders[kind], folder)
    corrupt(folder)
    before = snapshot(folder)
    t0 = time.perf_counter()
    code = main(["generate", str(folder), "--prompt=def ", "--max_new_tokens=2", "--device=cpu"])
    seconds = time.perf_counter() - t0
    one_line(code, capsys.readouterr().err, "generate", names, match)
    assert seconds < 10, f"{seconds:.1f} s: the model was built before the config was checked"
    assert snapshot(folder) == before


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "mistral"])
def test_the_valid_folders_still_load(kind, folders):
    model, tok, meta = load_model(folders[kind])
    assert meta["huggingface"]["model_type"] == kind and tok is not None
    assert model.cfg.vocab_size == 320


# --- the same for minillm's own checkpoints -------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bomb-run")
    (root / "corpus.txt").write_text("".join(TEXT))
    tc = TrainConfig(max_iters=2, eval_interval=2, eval_iters=1, batch_size=2, device="cpu",
                     out_dir=str(root / "run"), cache_dir=str(root / "cache"))
    train(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), tc, str(root / "corpus.txt"), progress=False)
    return root / "run"


@pytest.mark.parametrize("field, value, match", [
    ("n_layer", 100_000, "model.safetensors: does not match config.json: it holds 1 layers, but config.json "
                         "says n_layer=100000"),
    ("n_embd", 65536, r"does not match config.json: size mismatch for .*the config gives \[.*65536"),
    ("vocab_size", 10**9, r"size mismatch for lm_head.weight: the config gives \[1000000000, 16\]"),
    ("block_size", 10**9, "elements of position tables"),  # sinusoidal: no tensor of the file says it
])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_minillm_config_size_bomb_is_refused_before_building(field, value, match, command, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ck = step_folder(copy, 2)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"][field] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    write_manifest(ck)  # a consistent manifest: the header check must be what catches it
    before = snapshot(copy)
    args = (["eval", str(copy), "--device=cpu"] if command == "eval" else
            ["train", "--resume=true", f"--out_dir={copy}", "--max_iters=4", "--sample_tokens=0"])
    t0 = time.perf_counter()
    code = main(args)
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    one_line(code, err, args[0], "config.json" if field == "block_size" else "model.safetensors", match)
    assert snapshot(copy) == before
