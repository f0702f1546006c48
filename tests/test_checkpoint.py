"""Checkpoint folders: exact round trip, atomic writes, clear errors."""

import json
import os

import pytest
import torch

from minillm import CausalLM, ModelConfig
from minillm.weights.checkpoint import CONFIG_FILE, CheckpointError, load_model, save_model
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


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_write_gives_the_mode_open_would(tmp_path):
    """Not mkstemp's 0600: a checkpoint mounted into a container runs as another user there."""
    path = tmp_path / "x.json"
    with atomic_write(path) as tmp:
        tmp.write_text("{}")
    model = CausalLM(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    folder = save_model(tmp_path / "ckpt", model)  # safetensors writes the weights itself
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [path, *folder.iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


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


# --- the encoder–decoder goes through the same format ---------------------------------------------

def _tiny_seq2seq():
    from minillm.data.tokenizer import CharTokenizer
    from minillm.data.translation import SPECIALS
    from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig

    tok = CharTokenizer.from_text("0123456789- abcdefghijklmnopqrstuvwxyz", special_tokens=SPECIALS)
    pad, bos, eos = (tok.special_tokens[s] for s in SPECIALS)
    cfg = Seq2SeqConfig(ModelConfig(vocab_size=tok.vocab_size, n_embd=32, n_head=4, block_size=32),
                        n_enc_layer=2, n_dec_layer=1, pad_id=pad, bos_id=bos, eos_id=eos, label_smoothing=0.05)
    torch.manual_seed(0)
    return Seq2Seq(cfg).eval(), tok


def test_seq2seq_round_trip(tmp_path):
    from minillm.model.seq2seq import Seq2Seq

    model, tok = _tiny_seq2seq()
    save_model(tmp_path, model, tok, step=7)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["seq2seq"] == dict(n_enc_layer=2, n_dec_layer=1, pad_id=model.cfg.pad_id, bos_id=model.cfg.bos_id,
                                   eos_id=model.cfg.eos_id, label_smoothing=0.05, output_bias=False)
    loaded, tok2, meta2 = load_model(tmp_path)
    assert isinstance(loaded, Seq2Seq) and loaded.cfg == model.cfg and meta2["step"] == 7
    assert tok2.to_dict() == tok.to_dict()
    # the tied matrix is still one Parameter after loading
    assert loaded.lm_head.weight is loaded.encoder.tok_emb.weight is loaded.tok_emb.weight
    src = torch.tensor([tok.encode("12 march 2021")])
    tgt = torch.tensor([[model.cfg.bos_id] + tok.encode("2021-03")])
    torch.testing.assert_close(loaded(src, tgt)[0], model(src, tgt)[0], rtol=0, atol=0)


@pytest.mark.parametrize("section, expect", [
    ("[1, 2]", "\"seq2seq\" should be an object"),
    ('{"n_enc_layer": "two", "n_dec_layer": 1, "pad_id": 0, "bos_id": 1, "eos_id": 2}', "n_enc_layer='two'"),
    ('{"n_enc_layer": 2, "n_dec_layer": 1, "pad_id": 0, "bos_id": 1, "eos_id": 2, "depth": 3}', "unknown seq2seq field"),
    ('{"n_enc_layer": 2, "n_dec_layer": 1, "pad_id": 999, "bos_id": 1, "eos_id": 2}', "outside the vocabulary"),
    ('{"n_enc_layer": 0, "n_dec_layer": 1, "pad_id": 0, "bos_id": 1, "eos_id": 2}', "n_enc_layer, n_dec_layer > 0"),
])
def test_seq2seq_corrupt_section_is_one_line_naming_config(tmp_path, section, expect):
    model, tok = _tiny_seq2seq()
    save_model(tmp_path, model, tok)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["seq2seq"] = json.loads(section)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    (tmp_path / "manifest.json").unlink()  # an edit by hand: only the config itself is judged
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and CONFIG_FILE in msg and expect in msg, msg


def test_seq2seq_layers_that_disagree_with_the_weights_are_named(tmp_path):
    model, tok = _tiny_seq2seq()
    save_model(tmp_path, model, tok)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["seq2seq"]["n_dec_layer"] = 2  # weights hold one decoder layer
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: does not match config.json"):
        load_model(tmp_path)
