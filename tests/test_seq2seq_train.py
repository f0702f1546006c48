"""Training, translating and scoring the encoder–decoder end to end (tiny, generated data)."""

import json
import math

import pytest
import torch

from minillm.weights.checkpoint import latest_checkpoint, load_model
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


def _evals(out_dir):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_each_evaluation_records_greedy_bleu_and_plots_it(tmp_path):
    train_seq2seq(ModelConfig(**TINY), _tc(tmp_path, bleu_sentences=20), "dates", progress=False)
    evals = _evals(tmp_path / "out")
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert all(0.0 <= r["val_bleu"] <= 100.0 for r in evals)
    # the same 20 sentences, decoded and scored the way `minillm eval --metric=bleu` does it
    model, tok, _ = load_model(tmp_path / "out")
    pairs = translation_pairs("dates", "val")[:20]
    expected = score_translations(translate(model, tok, [s for s, _ in pairs]), [t for _, t in pairs], ["bleu"])
    assert evals[-1]["val_bleu"] == pytest.approx(expected["bleu"])
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    train_seq2seq(ModelConfig(**TINY), _tc(tmp_path, max_iters=10, eval_interval=10, bleu_sentences=0,
                                          overwrite=True), "dates", progress=False)
    assert not any("val_bleu" in r for r in _evals(tmp_path / "out"))


def test_a_resumed_run_continues_the_exact_loss_curve(tmp_path):
    full = _tc(tmp_path, max_iters=40, eval_interval=10, log_interval=1, bleu_sentences=8,
               out_dir=str(tmp_path / "full"))
    train_seq2seq(ModelConfig(**TINY), full, "dates", progress=False)
    half = _tc(tmp_path, max_iters=20, eval_interval=10, log_interval=1, bleu_sentences=8,
               out_dir=str(tmp_path / "half"))
    train_seq2seq(ModelConfig(**TINY), half, "dates", progress=False)
    (tmp_path / "half" / "metrics.jsonl").write_text("")  # the resumed run may not copy the answer from here
    train_seq2seq(ModelConfig(**TINY), _tc(tmp_path, max_iters=40, eval_interval=10, log_interval=1,
                                          bleu_sentences=8, out_dir=str(tmp_path / "half"), resume=True),
                  "dates", progress=False)

    def curve(out, start):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return ([(r["step"], r["loss"]) for r in records if "loss" in r and r["step"] >= start],
                [(r["step"], r["val_loss"], r["val_bleu"]) for r in records if "val_loss" in r and r["step"] > start])

    (train_ref, eval_ref), (train_got, eval_got) = curve(tmp_path / "full", 20), curve(tmp_path / "half", 20)
    assert [s for s, _ in train_got] == list(range(20, 40)) and [e[0] for e in eval_got] == [30, 40]
    for (s1, a), (s2, b) in zip(train_ref, train_got):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-6)
    for ref, got in zip(eval_ref, eval_got):
        assert got == pytest.approx(ref, abs=1e-6)
    a, _, _ = load_model(tmp_path / "full")
    b, _, _ = load_model(tmp_path / "half")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    # a finished run resumed with the same max_iters has nothing to do, and says so
    done = train_seq2seq(ModelConfig(**TINY), _tc(tmp_path, max_iters=40, out_dir=str(tmp_path / "half"),
                                                  resume=True), "dates", progress=False)
    assert done["already_done"] and done["step"] == 40


def test_encoder_and_decoder_depths_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--objective=seq2seq", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=24",
            "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--batch_size=8", "--bleu_sentences=4",
            "--n_enc_layer=3", "--n_dec_layer=2", f"--out_dir={out}", "--sample_tokens=0"]
    assert main(args) == 0
    model, _, meta = load_model(out)
    assert (meta["seq2seq"]["n_enc_layer"], meta["seq2seq"]["n_dec_layer"]) == (3, 2)
    assert len(model.encoder.blocks) == 3 and len(model.blocks) == 2
    assert "val BLEU" in capsys.readouterr().out
    # resuming keeps the saved depths without repeating them
    assert main(["train", "--resume=true", f"--out_dir={out}", "--max_iters=6", "--eval_interval=2",
                 "--sample_tokens=0"]) == 0
    model, _, meta = load_model(out)
    assert meta["step"] == 6 and len(model.encoder.blocks) == 3 and len(model.blocks) == 2
    capsys.readouterr()
    assert main(["train", "--n_enc_layer=2", f"--out_dir={tmp_path / 'lm'}"]) != 0
    assert "--n_enc_layer need --objective=seq2seq" in capsys.readouterr().err
    assert main(["train", "--objective=seq2seq", "--pad_id=3", f"--out_dir={tmp_path / 'x'}"]) != 0
    assert "--pad_id cannot be set" in capsys.readouterr().err
    assert not (tmp_path / "lm").exists() and not (tmp_path / "x").exists()
