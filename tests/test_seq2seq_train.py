"""Training, translating and scoring the encoder–decoder end to end (tiny, generated data)."""

import json
import math

import pytest
import torch

from minillm.checkpoint import latest_checkpoint, load_model
from minillm.cli import main
from minillm.data.translation import translation_pairs
from minillm.evaluate.translation import parse_metrics, score_translations
from minillm.generate.beam import greedy_search, translate
from minillm.model.config import ModelConfig
from minillm.model.seq2seq import Seq2Seq, transformer_lr
from minillm.train import TrainConfig
from minillm.train.seq2seq import encode_pairs, make_tokenizer, seq2seq_lr, train_seq2seq

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=24, dropout=0.0)


def _tc(tmp_path, **kw):
    return TrainConfig(**{**dict(max_iters=40, eval_interval=20, eval_iters=2, log_interval=10, batch_size=16,
                                 learning_rate=3e-3, warmup_iters=10, out_dir=str(tmp_path / "out")), **kw})


def test_schedule_is_the_papers_shape_with_a_chosen_peak():
    for step in (1, 5, 10, 11, 100, 1000):
        expected = 1e-3 * transformer_lr(step, 256, 10) / transformer_lr(10, 256, 10)
        assert math.isclose(seq2seq_lr(step, 1e-3, 10), expected, rel_tol=1e-12)
    assert seq2seq_lr(10, 1e-3, 10) == max(seq2seq_lr(s, 1e-3, 10) for s in range(1, 200))


def test_training_lowers_the_loss_and_saves_a_seq2seq_checkpoint(tmp_path):
    result = train_seq2seq(ModelConfig(**TINY), _tc(tmp_path), "dates", progress=False)
    evals = [r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    model, tok, meta = load_model(tmp_path / "out")
    assert isinstance(model, Seq2Seq) and meta["step"] == 40 and meta["data"] == "dates"
    assert meta["seq2seq"]["n_enc_layer"] == meta["seq2seq"]["n_dec_layer"] == 1
    assert latest_checkpoint(tmp_path / "out").name == "step-0000040"
    src = torch.tensor([tok.encode("3 March 2021")])
    torch.testing.assert_close(model(src, src)[0], result["model"](src, src)[0])


def test_long_sentences_are_cut_and_counted(tmp_path):
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("short\n" + "x" * 50 + "\nok\nfine\n")
    tgt.write_text("kurz\nlang\n" + "y" * 30 + "\ngut\n")
    pairs = translation_pairs(f"{src},{tgt}", "train")
    assert pairs == [("short", "kurz"), ("x" * 50, "lang"), ("ok", "y" * 30)]  # last 5% (one line) held out
    assert translation_pairs(f"{src},{tgt}", "val") == [("fine", "gut")]
    tok = make_tokenizer(pairs, _tc(tmp_path))
    ids, cut = encode_pairs(tok, pairs, block_size=24)
    assert cut == 2 and len(ids[1][0]) == 24 and len(ids[2][1]) == 23  # target: room for BOS/EOS


def test_translating_in_a_batch_equals_one_at_a_time(tmp_path):
    result = train_seq2seq(ModelConfig(**TINY), _tc(tmp_path, max_iters=10, eval_interval=10), "dates",
                           progress=False)
    model, tok = result["model"], result["tokenizer"]
    sentences = ["3 March 2021", "December 25, 1999", "1 Jan 1900"]
    batched = translate(model, tok, sentences, beam_size=1, max_new_tokens=12)
    assert batched == [translate(model, tok, [s], max_new_tokens=12)[0] for s in sentences]
    ids, _ = greedy_search(model, torch.tensor([tok.encode(sentences[0])]), 12)
    assert batched[0] == tok.decode([t for t in ids[0] if t not in tok.special_tokens.values()])
    assert len(translate(model, tok, sentences, beam_size=3, max_new_tokens=12)) == 3
    with pytest.raises(ValueError, match="beam size must be >= 1"):
        translate(model, tok, sentences, beam_size=0)


def test_metrics():
    assert parse_metrics("bleu, ROUGE") == ["bleu", "rouge"]
    with pytest.raises(ValueError, match="unknown metric meteor; choose from bleu, rouge"):
        parse_metrics("bleu,meteor")
    s = score_translations(["2021-03-03 x"], ["2021-03-03 x"], ["bleu", "rouge"])
    assert s["bleu"] == pytest.approx(100) and s["rouge1"] == s["rougeL"] == pytest.approx(100)


def test_cli_train_translate_eval(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--objective=seq2seq", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2",
                 "--eval_iters=1", "--batch_size=4", "--n_layer=1", "--n_embd=16", "--n_head=2",
                 "--block_size=20", "--sample_tokens=0"]) == 0
    assert "0 pairs longer than block_size=20 were truncated" in capsys.readouterr().out
    assert main(["translate", out, "3 March 2021", "1 May 1950", "--beam=2", "--max_new_tokens=5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["eval", out, "--metric=bleu,rouge", "--beam=2", "--max_sentences=4"]) == 0
    text = capsys.readouterr().out
    assert "dates val: 4 sentences, beam 2" in text and "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in text
    assert "ROUGE F1: rouge1" in text
    for argv, expect in ((["eval", out, "--metric=meteor"], "unknown metric meteor"),
                         (["eval", out, "--metric=bleu", "--beam=0"], "--beam must be >= 1"),
                         (["translate", out, "3 March 2021", "--beam=0"], "--beam must be >= 1"),
                         (["generate", out, "--prompt=1"], "use `minillm translate")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expect in err, err
