"""Checkpoint folders: exact round trip, atomic writes, clear errors."""

import json

import pytest
import torch

from minillm import CausalLM, ModelConfig
from minillm.checkpoint import CONFIG_FILE, CheckpointError, load_model, save_model
from minillm.files import atomic_write


def test_round_trip_keeps_weights_and_tying(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    save_model(tmp_path, model, step=7)
    loaded, tokenizer, meta = load_model(tmp_path, attention="sdpa")
    assert meta["step"] == 7 and tokenizer is None and loaded.cfg.attention == "sdpa"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.transformer.tok_emb.weight


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash mid-save")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_not_a_checkpoint_and_incomplete_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a minillm checkpoint"):
        load_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": {}, "quantization": {"scheme": "int8"}}))
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_model(tmp_path)


def test_new_cache_takes_dtype_from_the_embedding():
    model = CausalLM(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)).to(torch.float64)
    cache = model.new_cache(batch_size=3)
    assert cache.k.dtype == torch.float64 and cache.k.shape == (1, 3, 2, 8, 8)
