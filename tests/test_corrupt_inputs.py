"""Every broken checkpoint, through every command that loads one: one line, exit 2, nothing touched.

A table of corruptions (a config that is not JSON, weights of other shapes, a tokenizer with more
tokens than the model has rows, a bit flip only the manifest can see, ...) is applied to copies of
one small trained run, and each copy is handed to each loading command of the CLI:

    generate  eval  serve  resume (train --resume=true)  quantize (--out=NEW)  export (--onnx=NEW)

For each pair the rule is the one minillm/weights/checkpoint.py promises: exit status 2, no traceback, one
`minillm CMD: error: ...` line that names the broken file (and says what is wrong with it), and
the checkpoint folder exactly as it was (bytes and mtimes), with no output folder or file created.

Most corruptions rewrite the manifest afterwards (`remanifest`), so that the check meant to catch
them (JSON parsing, field types, tensor shapes, the vocabulary) is the one that does, not the
manifest's sha256. A few corruptions concern only the train state, which only resume reads: the
table says which commands must fail; the others must succeed (serve then reaches uvicorn.run,
which is replaced by a stub here, so no server ever starts).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minillm.weights.checkpoint import MANIFEST_FILE, step_folder, write_manifest
from minillm.cli import main
from minillm.model.config import ModelConfig
from minillm.train import TrainConfig, train

TEXT = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n") * 10
STEP = 4  # the run's only checkpoint
COMMANDS = ("generate", "eval", "serve", "resume", "quantize", "export")
ALL = frozenset(COMMANDS)
RESUME_ONLY = frozenset({"resume"})
READ_TRAIN = frozenset({"resume", "eval"})  # the commands that read config.json's "train" (the TrainConfig)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# --- the base run, trained once for the module -----------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny model trained for STEP steps: OUT/checkpoints/step-0000004/ with train state."""
    root = tmp_path_factory.mktemp("corrupt-base")
    corpus = root / "corpus.txt"  # stays for the module: the checkpoint records it as its data
    corpus.write_text(TEXT)
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    tc = TrainConfig(max_iters=STEP, eval_interval=STEP, eval_iters=1, log_interval=1, batch_size=2,
                     device="cpu", out_dir=str(root / "run"), cache_dir=str(root / "cache"))
    train(model, tc, str(corpus), progress=False)
    return root / "run"


# --- corruptions: each changes a copy of the run; `ck` is its checkpoint (step) folder ----------------

def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def edit_model(ck: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(ck / "model.safetensors")
    change(tensors)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})


def edit_train_state(ck: Path, change: Callable[[dict], None]) -> None:
    path = ck / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state, tensors = json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(tensors, path, metadata={"state": json.dumps(state)})


def edit_train_state_tensor(ck: Path, suffix: str) -> None:
    """Give the first optimizer tensor named */suffix another shape (and keep the metadata)."""
    path = ck / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sorted(tensors) if k.endswith("/" + suffix))
    tensors[key] = tensors[key].flatten()[:3].clone()
    save_file(tensors, path, metadata=metadata)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin: 8 bytes of header length, then the JSON header."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def replace_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def direct(ck: Path, corrupt: Callable, *args) -> Path:
    """Drop the manifest, corrupt, and hand the commands the checkpoint folder itself."""
    (ck / MANIFEST_FILE).unlink()
    corrupt(*args)
    return ck


def set_model_field(key, value):
    return lambda ck: edit_json(ck / "config.json", lambda d: d["model"].__setitem__(key, value))


def write(name: str, content: bytes | str):
    def corrupt(ck: Path) -> None:
        path = ck / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return corrupt


@dataclass
class Case:
    id: str
    corrupt: Callable[[Path], object]  # may return a path to hand the commands instead of the run folder
    file: str  # the file name the error must name
    match: str  # and what it must say about it (a regular expression)
    remanifest: bool = True  # rewrite manifest.json afterwards, so that a deeper check must catch it
    fails: frozenset = ALL  # the commands that must fail; the others must succeed
    skip: dict = field(default_factory=dict)  # command -> why it is not run for this case


CASES = [
    # config.json
    Case("config-empty", write("config.json", ""), "config.json", "empty file"),
    Case("config-not-json", write("config.json", '{"model": {"n_layer": 1,'), "config.json", "not valid JSON"),
    Case("config-a-list", write("config.json", "[1, 2, 3]"), "config.json", "expected an object"),
    Case("config-no-model", lambda ck: edit_json(ck / "config.json", lambda d: d.pop("model")),
         "config.json", '"model" object'),
    Case("config-model-a-string", lambda ck: edit_json(ck / "config.json", lambda d: d.__setitem__("model", "gpt2")),
         "config.json", '"model" object'),
    Case("config-unknown-field", set_model_field("n_layers", 1), "config.json", "unknown model field 'n_layers'"),
    Case("config-n_layer-a-string", set_model_field("n_layer", "four"), "config.json", "n_layer='four' should be int"),
    Case("config-n_layer-a-float", set_model_field("n_layer", 2.5), "config.json", "n_layer=2.5 should be int"),
    Case("config-bias-a-string", set_model_field("bias", "yes"), "config.json", "bias='yes' should be bool"),
    Case("config-n_head-not-dividing", set_model_field("n_head", 3), "config.json", "n_head"),
    Case("config-n_layer-negative", set_model_field("n_layer", -1), "config.json", "must be positive"),
    Case("config-nested-deeply", write("config.json", '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}"),
         "config.json", "nested too deeply"),
    Case("config-not-utf8", write("config.json", b'{"model": {"n_layer": "\xff\xfe"}}'), "config.json", "not UTF-8"),
    Case("config-a-folder", lambda ck: ((ck / "config.json").unlink(), (ck / "config.json").mkdir()),
         "config.json", "not a file", remanifest=False),
    Case("config-quantization-a-string",
         lambda ck: edit_json(ck / "config.json", lambda d: d.__setitem__("quantization", "int8")),
         "config.json", "quantization|quantized checkpoint cannot be resumed"),
    Case("config-quantization-unknown-scheme",
         lambda ck: edit_json(ck / "config.json", lambda d: d.__setitem__("quantization", {"scheme": "int3"})),
         "config.json", "int3|quantized checkpoint cannot be resumed"),
    Case("config-train-a-string", lambda ck: edit_json(ck / "config.json", lambda d: d.__setitem__("train", "fast")),
         "config.json", '"train" should be an object', fails=READ_TRAIN),
    Case("config-train-unknown-field",
         lambda ck: edit_json(ck / "config.json", lambda d: d["train"].__setitem__("warp_speed", 9)),
         "config.json", "warp_speed", fails=READ_TRAIN),
    Case("config-edited-after-save",  # same size, still valid, another model (4 heads): only the sha256 can tell
         lambda ck: replace_text(ck / "config.json", '"n_head": 2', '"n_head": 4'), "config.json",
         "differs from what manifest.json", remanifest=False),
    # model.safetensors
    Case("model-missing", lambda ck: (ck / "model.safetensors").unlink(), "model.safetensors", "missing"),
    Case("model-missing-manifest-lists-it", lambda ck: (ck / "model.safetensors").unlink(), "model.safetensors",
         "missing, but manifest.json lists it", remanifest=False),
    Case("model-empty", write("model.safetensors", b""), "model.safetensors", "empty file"),
    Case("model-truncated", lambda ck: truncate(ck / "model.safetensors"), "model.safetensors", "safetensors"),
    Case("model-truncated-manifest-stale", lambda ck: truncate(ck / "model.safetensors"), "model.safetensors",
         "manifest.json recorded", remanifest=False),
    Case("model-header-length-flipped", lambda ck: flip_byte(ck / "model.safetensors", 3), "model.safetensors",
         "not a readable safetensors file"),
    Case("model-header-json-flipped", lambda ck: flip_byte(ck / "model.safetensors", 9), "model.safetensors",
         "not a readable safetensors file"),
    Case("model-garbage", write("model.safetensors", random.Random(0).randbytes(4096)), "model.safetensors",
         "not a readable safetensors file"),
    Case("model-other-shapes",  # config.json parses (n_embd 32 is valid) but the weights are 16 wide
         set_model_field("n_embd", 32), "model.safetensors", "does not match config.json: .*size mismatch"),
    Case("model-a-tensor-missing",
         lambda ck: edit_model(ck, lambda t: t.pop("transformer.blocks.0.norm1.weight")),
         "model.safetensors", "does not match config.json: Missing key.*norm1.weight"),
    Case("model-an-extra-tensor",
         lambda ck: edit_model(ck, lambda t: t.__setitem__("extra.weight", t["lm_head.weight"].clone())),
         "model.safetensors", "does not match config.json: Unexpected key.*extra.weight"),
    # tokenizer.json
    Case("tokenizer-empty", write("tokenizer.json", ""), "tokenizer.json", "empty file"),
    Case("tokenizer-not-json", write("tokenizer.json", '{"type": "char", "chars": ['), "tokenizer.json",
         "not valid JSON"),
    Case("tokenizer-a-list", write("tokenizer.json", '["a", "b"]'), "tokenizer.json", "expected a JSON object"),
    Case("tokenizer-unknown-type", write("tokenizer.json", '{"type": "wordpiece", "vocab": {}}'), "tokenizer.json",
         "unknown tokenizer type 'wordpiece'"),
    Case("tokenizer-missing-fields", write("tokenizer.json", '{"type": "char"}'), "tokenizer.json", "chars"),
    Case("tokenizer-bad-chars", write("tokenizer.json", '{"type": "char", "chars": ["ab", 7]}'), "tokenizer.json",
         "single characters"),
    Case("tokenizer-larger-than-vocabulary",  # a consistent manifest: the vocabulary check must catch it
         lambda ck: edit_json(ck / "tokenizer.json", lambda d: d["chars"].extend("0123456789")),
         "tokenizer.json", "vocabulary has only|different tokenizer"),  # resume compares it with the data's
    Case("tokenizer-missing", lambda ck: (ck / "tokenizer.json").unlink(), "tokenizer.json", "tokenizer.json: missing",
         fails=ALL - {"quantize", "export"}),  # the weights alone can be quantized and exported
    # train_state.safetensors (only resume reads it; the manifest makes every command check it)
    Case("train-state-missing", lambda ck: (ck / "train_state.safetensors").unlink(), "train_state.safetensors",
         "cannot be resumed", fails=RESUME_ONLY),
    Case("train-state-missing-manifest-lists-it", lambda ck: (ck / "train_state.safetensors").unlink(),
         "train_state.safetensors", "missing, but manifest.json lists it", remanifest=False),
    Case("train-state-truncated", lambda ck: truncate(ck / "train_state.safetensors"), "train_state.safetensors",
         "not a readable train state", fails=RESUME_ONLY),
    Case("train-state-garbage", write("train_state.safetensors", random.Random(1).randbytes(999)),
         "train_state.safetensors", "not a readable train state", fails=RESUME_ONLY),
    Case("train-state-other-step",
         lambda ck: edit_train_state(ck, lambda s: s["scalars"].__setitem__("step", STEP - 1)),
         "train_state.safetensors", f"at step {STEP - 1} but the weights at step {STEP}", fails=RESUME_ONLY),
    Case("train-state-no-optimizer", lambda ck: edit_train_state(ck, lambda s: s.pop("optimizer")),
         "train_state.safetensors", "not a readable train state", fails=RESUME_ONLY),
    Case("train-state-moments-of-another-shape", lambda ck: edit_train_state_tensor(ck, "exp_avg"),
         "train_state.safetensors", "exp_avg of shape", fails=RESUME_ONLY),
    # manifest.json
    Case("manifest-not-json", write(MANIFEST_FILE, '{"format": 1, "files": {'), "manifest.json",
         "not a valid manifest", remanifest=False),
    Case("manifest-a-list", write(MANIFEST_FILE, "[]"), "manifest.json", "not a valid manifest", remanifest=False),
    Case("manifest-bit-flip-in-weights",  # header still valid: only the sha256 can tell
         lambda ck: flip_byte(ck / "model.safetensors", data_start(ck / "model.safetensors") + 100),
         "model.safetensors", "differs from what manifest.json recorded", remanifest=False),
    Case("manifest-lists-a-missing-file",
         lambda ck: edit_json(ck / MANIFEST_FILE, lambda d: d["files"].__setitem__(
             "vocab.bin", {"bytes": 1, "sha256": "0" * 64})), "vocab.bin", "missing, but manifest.json lists it",
         remanifest=False),
    Case("manifest-names-a-path", lambda ck: edit_json(ck / MANIFEST_FILE, lambda d: d["files"].__setitem__(
        "../../corpus.txt", {"bytes": 1, "sha256": "0" * 64})), "manifest.json", "not a valid manifest",
        remanifest=False),
    Case("interrupted-save-no-manifest", lambda ck: (ck / MANIFEST_FILE).unlink(), "manifest.json",
         "no complete checkpoint", remanifest=False),
    # a checkpoint folder named directly, without a manifest (written by hand, or by an older minillm):
    # nothing to check sizes and hashes against, so the readers themselves must catch it
    Case("direct-config-a-folder", lambda ck: direct(ck, lambda: ((ck / "config.json").unlink(),
                                                                 (ck / "config.json").mkdir())),
         "config.json", "cannot be read", remanifest=False),
    Case("direct-model-a-folder", lambda ck: direct(ck, lambda: ((ck / "model.safetensors").unlink(),
                                                                (ck / "model.safetensors").mkdir())),
         "model.safetensors", "not a file", remanifest=False),
    Case("direct-model-truncated", lambda ck: direct(ck, lambda: truncate(ck / "model.safetensors")),
         "model.safetensors", "not a readable safetensors file", remanifest=False),
    Case("direct-tokenizer-not-utf8", lambda ck: direct(ck, write("tokenizer.json", b"\x80\x81"), ck),
         "tokenizer.json", "not UTF-8", remanifest=False),
    # the path itself
    Case("path-does-not-exist", lambda ck: ck.parents[1] / "no-such-run", "no-such-run", "does not exist",
         remanifest=False),
    Case("path-an-empty-folder", lambda ck: shutil.rmtree(ck.parents[1] / "checkpoints"), "config.json",
         "not a minillm checkpoint", remanifest=False),
]


# --- running one command ------------------------------------------------------------------------------

def argv(command: str, path: Path, tmp: Path) -> list[str]:
    return {
        "generate": ["generate", str(path), "--max_new_tokens=2", "--device=cpu"],
        "eval": ["eval", str(path), "--device=cpu"],
        "serve": ["serve", str(path), "--device=cpu"],
        # two steps more than saved: a corruption that slipped past loading would train (and show)
        "resume": ["train", "--resume=true", f"--out_dir={path}", f"--max_iters={STEP + 2}", "--sample_tokens=0"],
        "quantize": ["quantize", str(path), f"--out={tmp / 'quantized'}", "--device=cpu", "--eval_iters=1",
                     "--batch_size=2", "--gen_tokens=0"],
        "export": ["export", str(path), f"--onnx={tmp / 'model.onnx'}", "--exporter=torchscript", "--no-verify"],
    }[command]


def snapshot(folder: Path) -> dict:
    """Every file's bytes and mtime (and every folder) under `folder`."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_server(monkeypatch):
    """serve stops where it would start listening: uvicorn.run records its call instead."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    return started


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, names: str, match: str) -> None:
    name = "train" if command == "resume" else command
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"minillm {name}")]
    assert len(lines) == 1, err
    # progress bars (tqdm) may also write to stderr; nothing else may
    others = [line for line in err.splitlines() if line.strip() and line not in lines and "it/s" not in line
              and "s/it" not in line and "%|" not in line]
    assert not others, err
    assert lines[0].startswith(f"minillm {name}: error: "), lines[0]
    assert names in lines[0], f"the error does not name {names}: {lines[0]}"
    assert re.search(match, lines[0]), f"expected {match!r} in: {lines[0]}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_broken_checkpoint_is_one_line_naming_the_file(case, command, base_run, tmp_path, capsys, no_server):
    if command in case.skip:
        pytest.skip(case.skip[command])
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    ck = step_folder(run, STEP)
    target = case.corrupt(ck)
    if case.remanifest:
        write_manifest(ck)
    path = target if isinstance(target, Path) else run
    before = snapshot(run)

    code, err = run_cli(argv(command, path, tmp_path), capsys)

    if command in case.fails:
        assert_one_line_error(code, err, command, case.file, case.match)
        assert not (tmp_path / "quantized").exists() and not (tmp_path / "model.onnx").exists()
        assert not no_server, "serve started a server on a broken checkpoint"
    else:  # this command does not read what is broken
        assert code == 0, err
        assert "Traceback" not in err
        if command == "serve":
            assert len(no_server) == 1
    assert snapshot(run) == before, "the checkpoint folder was modified"


# --- a device this machine does not have ---------------------------------------------------------------

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["generate", "eval", "serve", "quantize", "train"])
def test_device_cuda_without_a_gpu_is_one_line(command, base_run, tmp_path, capsys, no_server):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(run)
    if command == "train":
        args = ["train", f"--out_dir={tmp_path / 'new-run'}", f"--data={tmp_path / 'corpus.txt'}", "--device=cuda",
                "--max_iters=1", "--n_layer=1", "--n_embd=16", "--n_head=2", "--sample_tokens=0"]
        (tmp_path / "corpus.txt").write_text(TEXT)
    else:
        args = [a.replace("--device=cpu", "--device=cuda") for a in argv(command, run, tmp_path)]
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, command, "cuda", "no GPU")
    assert not (tmp_path / "new-run").exists() and not (tmp_path / "quantized").exists()
    assert snapshot(run) == before
    assert not no_server
