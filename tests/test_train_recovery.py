"""Nothing lost: a kill at any file boundary of a save, Ctrl-C, re-runs into the same out_dir.

A save writes train_state, model, tokenizer and config into a fresh step folder, then manifest.json,
which commits them (minillm/weights/checkpoint.py). Faults are injected by patching the one writer
(minillm.files.atomic_write renames with os.replace) to die before its k-th rename, not by timing.
"""

import json
import os

import pytest

import minillm.files
import minillm.train.loop
from minillm.weights.checkpoint import CHECKPOINTS_DIR, MANIFEST_FILE, latest_checkpoint, load_model, step_folders
from minillm.cli import main
from minillm.model.config import ModelConfig
from minillm.train import TrainConfig, train

TEXT = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n") * 10
STEPS, EVERY = 12, 4

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the library catches it."""


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def configs(tmp_path, out="out", **kw):
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    tc = TrainConfig(**{**dict(max_iters=STEPS, eval_interval=EVERY, eval_iters=1, log_interval=1, batch_size=4,
                               learning_rate=1e-2, warmup_iters=2, device="cpu", out_dir=str(tmp_path / out),
                               cache_dir=str(tmp_path / "cache")), **kw})
    return model, tc


def losses(out_dir):
    lines = (json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")))
    return [r["loss"] for r in lines if "loss" in r]


def test_a_kill_at_every_file_boundary_of_a_save_resumes_bit_for_bit(tmp_path, corpus, monkeypatch):
    model, tc = configs(tmp_path, "reference")
    train(model, tc, corpus, progress=False)
    reference = losses(tc.out_dir)
    assert len(reference) == STEPS

    real_replace, resumed_ok = os.replace, 0
    boundaries = 6  # renames in the step-8 save: train_state, model, tokenizer, config, manifest; then the plot
    for k in range(boundaries):
        state = {"armed": False, "renames": 0}

        def dying_replace(src, dst, state=state, k=k):
            if state["armed"]:
                if state["renames"] == k:
                    raise Killed(f"killed before rename {k} ({dst})")
                state["renames"] += 1
            return real_replace(src, dst)

        def arm(step, _model, state=state):
            if step == 2 * EVERY - 1:  # the next thing the loop does is the step-8 evaluation and save
                state["armed"] = True

        monkeypatch.setattr(minillm.files.os, "replace", dying_replace)
        model, tc = configs(tmp_path, f"killed-{k}")
        with pytest.raises(Killed):
            train(model, tc, corpus, progress=False, on_step=arm)
        monkeypatch.setattr(minillm.files.os, "replace", real_replace)

        # the previous checkpoint survives until the new one is complete: never nothing to resume
        newest = latest_checkpoint(tc.out_dir)
        assert newest is not None and newest.name == (f"step-{2 * EVERY:07d}" if k >= 5 else f"step-{EVERY:07d}")
        model, tc = configs(tmp_path, f"killed-{k}", resume=True)
        train(model, tc, corpus, progress=False)
        assert losses(tc.out_dir) == reference, f"kill before rename {k}"
        assert [s for s, _ in step_folders(tc.out_dir)] == [STEPS]  # older and broken folders pruned
        resumed_ok += 1
    assert resumed_ok == boundaries


def test_an_incomplete_newest_folder_is_ignored_and_stale_temporaries_removed(tmp_path, corpus):
    model, tc = configs(tmp_path, max_iters=EVERY)
    train(model, tc, corpus, progress=False)
    out = tmp_path / "out"
    broken = out / CHECKPOINTS_DIR / "step-0000099"  # as a kill leaves it: files, no manifest
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    (out / ".metrics.jsonl.abc123.tmp").write_text("half")
    assert latest_checkpoint(out).name == f"step-{EVERY:07d}"
    assert load_model(out)[2]["step"] == EVERY  # load_model(out_dir) takes the newest complete one
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the torn last line of a killed run: skipped, not fatal
    model, tc = configs(tmp_path, max_iters=2 * EVERY, resume=True)
    train(model, tc, corpus, progress=False)
    assert not broken.exists() and not (out / ".metrics.jsonl.abc123.tmp").exists()
    assert (out / CHECKPOINTS_DIR / f"step-{2 * EVERY:07d}" / MANIFEST_FILE).exists()


def cli_train(tmp_path, corpus, *extra):
    return main(["train", "--preset=tiny", f"--data={corpus}", "--sample_tokens=0", "--n_layer=2", "--n_head=2",
                 "--n_embd=32", "--block_size=16", f"--max_iters={EVERY}", f"--eval_interval={EVERY}",
                 "--eval_iters=1", "--batch_size=4", f"--out_dir={tmp_path / 'run'}",
                 f"--cache_dir={tmp_path / 'cache'}", *extra])


def test_an_existing_run_is_never_silently_replaced(tmp_path, corpus, capsys):
    assert cli_train(tmp_path, corpus) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli_train(tmp_path, corpus) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume=true" in err and "--overwrite=true" in err
    # --overwrite with a data error: the error comes before anything is removed
    assert cli_train(tmp_path, str(tmp_path / "missing.txt"), "--overwrite=true") == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert cli_train(tmp_path, corpus, "--overwrite=true", "--seed=7") == 0
    assert load_model(tmp_path / "run")[2]["train"]["seed"] == 7


def test_resuming_a_finished_run_says_so_and_a_longer_one_continues(tmp_path, corpus, capsys):
    assert cli_train(tmp_path, corpus) == 0
    capsys.readouterr()
    assert main(["train", "--resume=true", f"--out_dir={tmp_path / 'run'}", "--sample_tokens=0"]) == 0
    assert f"already trained to step {EVERY}" in capsys.readouterr().out
    assert main(["train", "--resume=true", f"--out_dir={tmp_path / 'run'}", "--sample_tokens=0",
                 f"--max_iters={2 * EVERY}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step {EVERY}" in out and f"done: {2 * EVERY} steps" in out


def test_ctrl_c_is_one_line_that_says_what_survived(tmp_path, corpus, capsys, monkeypatch):
    real_step = minillm.train.loop.train_step

    def interrupted_at_6(run):
        if run.step == 6:
            raise KeyboardInterrupt
        return real_step(run)

    monkeypatch.setattr(minillm.train.loop, "train_step", interrupted_at_6)
    assert cli_train(tmp_path, corpus, f"--max_iters={2 * EVERY}") == 130
    err = capsys.readouterr().err  # the progress bars, then one line: no traceback
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minillm train: stopped at step 6; last checkpoint at step 4") and "--resume=true" in last
    monkeypatch.setattr(minillm.train.loop, "train_step", real_step)
    assert main(["train", "--resume=true", f"--out_dir={tmp_path / 'run'}", "--sample_tokens=0"]) == 0
    assert load_model(tmp_path / "run")[2]["step"] == 2 * EVERY
