"""Issue 29's probe of the training and compression commands, each case re-run as the probe ran it.

The rule is tests/test_corrupt_inputs.py's: a bad input is exit 2 (1 for a full disk), no traceback,
one `minillm CMD: ...` line that says what is wrong, and nothing written; a good input gives the
right result. Stopping signals are real signals (os.kill on this process, whose handler
minillm.cli.main installs), sent from inside the loop at a chosen step, not timed from outside.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillm.files
import minillm.train.fit
import minillm.train.loop
import minillm.weights.checkpoint
from minillm.cli import main
from minillm.evaluate.classification import classification_report, format_report
from minillm.finetune.config import FinetuneConfig
from minillm.model.config import ModelConfig
from minillm.train import TrainConfig, train
from minillm.weights.checkpoint import (MODEL_FILE, latest_checkpoint, load_model, step_folder,
                                        step_folders, write_manifest)

TEXT = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n") * 10
EVERY = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for 2 * EVERY steps (checkpoint at the end), its corpus beside it."""
    root = tmp_path_factory.mktemp("probe-run")
    (root / "corpus.txt").write_text(TEXT)
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    tc = TrainConfig(max_iters=2 * EVERY, eval_interval=EVERY, eval_iters=2, log_interval=1, batch_size=3,
                     device="cpu", out_dir=str(root / "run"), cache_dir=str(root / "cache"))
    train(model, tc, str(root / "corpus.txt"), progress=False)
    return root / "run"


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, command: str, match: str, exit_code: int = 2) -> str:
    """The rule for a refused input: the exit code, no traceback, one line (progress bars aside)."""
    assert code == exit_code, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "it/s" not in line and "s/it" not in line
             and "%|" not in line and "step/s" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"minillm {command}: "), lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in: {lines[0]}"
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def train_args(tmp_path, *extra) -> list[str]:
    (tmp_path / "corpus.txt").write_text(TEXT)
    return ["train", f"--data={tmp_path / 'corpus.txt'}", "--sample_tokens=0", "--n_layer=1", "--n_head=2",
            "--n_embd=16", "--block_size=16", f"--max_iters={2 * EVERY}", f"--eval_interval={EVERY}",
            "--eval_iters=1", "--batch_size=3", f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}",
            "--device=cpu", *extra]


# --- quantize's sizes, and which batches every perplexity is over -------------------------------------

def test_quantize_counts_the_model_file_only(run, tmp_path, capsys):
    """The folder also holds train_state.safetensors (twice the weights): it is not the model."""
    code, out, err = cli(["quantize", run, f"--out={tmp_path / 'q'}", "--gen_tokens=0", "--device=cpu"], capsys)
    assert code == 0, err
    ck = latest_checkpoint(run)
    before, after = (ck / MODEL_FILE).stat().st_size, (tmp_path / "q" / MODEL_FILE).stat().st_size
    line = next(line for line in out.splitlines() if line.startswith("model.safetensors (MB)"))
    assert line.split()[2:5] == [f"{before / 1e6:.3f}", f"{after / 1e6:.3f}", f"{after / before:.2f}x"]


def test_eval_quantize_and_prune_measure_the_same_batches_and_say_which(run, tmp_path, capsys):
    code, out, err = cli(["eval", run, "--device=cpu"], capsys)
    assert code == 0, err
    eval_ppl = re.search(r"perplexity ([\d.]+) \((.*?), seed (\d+);", out)
    assert eval_ppl and "2 batches of 3 x 16 = 96 tokens of" in eval_ppl.group(2)
    rows = {}
    for command in ("quantize", "prune"):
        extra = ["--gen_tokens=0"] if command == "quantize" else ["--sparsity=0.5"]
        code, out, err = cli([command, run, f"--out={tmp_path / command}", "--device=cpu", *extra], capsys)
        assert code == 0, err
        rows[command] = next(line for line in out.splitlines() if line.startswith("val perplexity"))
    for command, line in rows.items():
        assert "2 batches of 3 x 16 = 96 tokens of" in line and f"seed {eval_ppl.group(3)}" in line, line
        assert f"{float(line.split()[2]):.2f}" == eval_ppl.group(1), (command, line, eval_ppl.group(0))


# --- SIGTERM is Ctrl-C ------------------------------------------------------------------------------------

def sigterm_at(monkeypatch, module, name: str, step_of, at: int) -> None:
    """Make module.name send this process a real SIGTERM when it reaches step `at`."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if step_of(*args, **kwargs) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_sigterm_stops_training_with_one_line_naming_the_checkpoint(tmp_path, capsys, monkeypatch):
    sigterm_at(monkeypatch, minillm.train.loop, "train_step", lambda run: run.step, 6)
    code, _, err = cli(train_args(tmp_path), capsys)
    line = one_line(code, err, "train", r"stopped at step 6 by SIGTERM; last checkpoint at step 4 in .*out; "
                                        r"continue with: minillm train --resume=true", exit_code=143)
    assert "out" in line
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    monkeypatch.undo()
    code, out, err = cli(["train", "--resume=true", f"--out_dir={tmp_path / 'out'}", "--sample_tokens=0"], capsys)
    assert code == 0 and f"done: {2 * EVERY} steps" in out, err


def test_sigterm_before_the_first_checkpoint_says_to_start_again(tmp_path, capsys, monkeypatch):
    sigterm_at(monkeypatch, minillm.train.loop, "train_step", lambda run: run.step, 2)
    code, _, err = cli(train_args(tmp_path), capsys)
    one_line(code, err, "train", r"stopped at step 2 by SIGTERM; no checkpoint was written yet.*"
                                 r"--overwrite=true", exit_code=143)
    monkeypatch.undo()
    for extra, match in (([], "stopped before its first checkpoint.*--overwrite=true"),
                         (["--resume=true"], "stopped before its first save.*nothing to resume.*--overwrite=true")):
        code, _, err = cli(train_args(tmp_path, *extra), capsys)
        one_line(code, err, "train", match)
    code, out, err = cli(train_args(tmp_path, "--overwrite=true"), capsys)
    assert code == 0, err


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A tiny parallel corpus (SRC_FILE,TGT_FILE) for the encoder–decoder."""
    root = tmp_path_factory.mktemp("pairs")
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    src = [" ".join(words[(i + j) % 8] for j in range(3)) for i in range(80)]
    (root / "src.txt").write_text("\n".join(src) + "\n")
    (root / "tgt.txt").write_text("\n".join(s.upper() for s in src) + "\n")
    return f"{root / 'src.txt'},{root / 'tgt.txt'}"


def seq2seq_args(tmp_path, data, out="s2s", *extra) -> list[str]:
    return ["train", "--objective=seq2seq", f"--data={data}", "--sample_tokens=0", "--n_layer=1", "--n_head=2",
            "--n_embd=16", "--block_size=24", f"--max_iters={2 * EVERY}", f"--eval_interval={EVERY}",
            "--eval_iters=1", "--batch_size=4", "--bleu_sentences=2", f"--out_dir={tmp_path / out}",
            "--device=cpu", *extra]


def test_sigterm_stops_seq2seq_training_the_same_way(tmp_path, pairs, capsys, monkeypatch):
    sigterm_at(monkeypatch, minillm.train.fit, "fit_step", lambda model, opt, batch, step, *a, **k: step, 6)
    code, _, err = cli(seq2seq_args(tmp_path, pairs), capsys)
    one_line(code, err, "train", r"stopped at step 6 by SIGTERM; last checkpoint at step 4 .*"
                                 r"minillm train --objective=seq2seq --resume=true", exit_code=143)
    monkeypatch.undo()
    code, out, err = cli(["train", "--objective=seq2seq", "--resume=true", f"--out_dir={tmp_path / 's2s'}",
                          "--sample_tokens=0"], capsys)
    assert code == 0 and f"done: {2 * EVERY} steps" in out, err


def test_sigterm_stops_a_fine_tune_the_same_way(run, tmp_path, capsys, monkeypatch):
    data = tmp_path / "task.csv"
    data.write_text("text,label\n" + "".join(f"Shall I{' not' * (i % 2)} compare,{i % 2}\n" for i in range(40)))
    sigterm_at(monkeypatch, minillm.train.fit, "fit_step", lambda model, opt, batch, step, *a, **k: step, 3)
    code, _, err = cli(["finetune", run, f"--data={data}", "--max_iters=6", "--eval_interval=2", "--device=cpu",
                        f"--out_dir={tmp_path / 'ft'}", "--batch_size=4"], capsys)
    one_line(code, err, "finetune", r"stopped at step 3 by SIGTERM; last checkpoint at step 2", exit_code=143)


# --- a disk that fills up, a kill inside the first save ------------------------------------------------

def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_survives(tmp_path, capsys, monkeypatch):
    real, saves = minillm.weights.checkpoint.st_save_model, []

    def full_disk_on_second_save(model, filename, *a, **k):
        saves.append(filename)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(model, filename, *a, **k)

    monkeypatch.setattr(minillm.weights.checkpoint, "st_save_model", full_disk_on_second_save)
    code, _, err = cli(train_args(tmp_path), capsys)
    one_line(code, err, "train", r"no space left on the device writing .*step-0000008.*intact", exit_code=1)
    out = tmp_path / "out"
    assert [s for s, _ in step_folders(out)] == [EVERY]  # the half-written step-8 folder is gone
    assert latest_checkpoint(out).name == f"step-{EVERY:07d}"
    monkeypatch.undo()
    code, out_text, err = cli(["train", "--resume=true", f"--out_dir={out}", "--sample_tokens=0"], capsys)
    assert code == 0 and f"done: {2 * EVERY} steps" in out_text, err


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the library catches it."""


@pytest.mark.parametrize("k", [0, 2, 4])  # killed before the train state's, the tokenizer's, the manifest's rename
def test_a_kill_inside_the_first_save_explains_and_the_next_run_cleans_up(k, tmp_path, capsys, monkeypatch):
    real_replace, renames = os.replace, {"armed": False, "n": 0}

    def dying_replace(src, dst):
        if renames["armed"]:
            if renames["n"] == k:
                raise Killed(f"killed before rename {k}")
            renames["n"] += 1
        return real_replace(src, dst)

    real_begin = minillm.train.loop.begin_checkpoint

    def arm(out_dir, step):
        renames["armed"] = True
        return real_begin(out_dir, step)

    monkeypatch.setattr(minillm.files.os, "replace", dying_replace)
    monkeypatch.setattr(minillm.train.loop, "begin_checkpoint", arm)
    with pytest.raises(Killed):  # SIGKILL: no handler runs, the process is gone
        main(train_args(tmp_path))
    monkeypatch.undo()
    capsys.readouterr()
    out = tmp_path / "out"
    # what the kill left: a step folder without its manifest (the library's own cleanup ran here, as
    # it cannot under SIGKILL: put the orphan back as a real kill leaves it)
    folder = step_folder(out, EVERY)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".model.safetensors.abc123.tmp").write_bytes(b"\0" * 64)
    (out / ".metrics.jsonl.def456.tmp").write_text("half")
    before = snapshot(out)
    code, _, err = cli(train_args(tmp_path), capsys)
    one_line(code, err, "train", r"only an incomplete checkpoint \(step 4: its save was interrupted\).*"
                                 r"--overwrite=true")
    code, _, err = cli(train_args(tmp_path, "--resume=true"), capsys)
    one_line(code, err, "train", r"no complete checkpoint \(the run stopped inside its first save\).*"
                                 r"--overwrite=true")
    assert snapshot(out) == before  # explaining writes nothing
    code, _, err = cli(train_args(tmp_path, "--overwrite=true"), capsys)
    assert code == 0, err
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # the orphans are gone
    assert load_model(out)[2]["step"] == 2 * EVERY


def test_ctrl_c_inside_the_first_save_says_no_checkpoint_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(minillm.train.loop, "save_train_state", interrupted)
    code, _, err = cli(train_args(tmp_path), capsys)
    one_line(code, err, "train", r"stopped at step 4; no checkpoint was written yet.*"
                                 r"start again with: minillm train --overwrite=true", exit_code=130)
    assert not step_folders(tmp_path / "out")  # the half-made folder went with the interrupt


# --- non-finite hyper-parameters and checkpoints -----------------------------------------------------------

@pytest.mark.parametrize("command, option", [
    ("distill", "--temperature=nan"), ("distill", "--alpha=inf"), ("train", "--learning_rate=nan"),
    ("train", "--dropout=inf"), ("train", "--rope_base=-inf"), ("finetune", "--learning_rate=nan"),
    ("finetune", "--lora_alpha=nan"), ("quantize", "--val_fraction=nan"), ("prune", "--sparsity=nan"),
    ("translate", "--length_penalty=nan"), ("eval", "--length_penalty=nan"), ("generate", "--temperature=nan"),
    ("generate", "--top_p=nan"),
])
def test_a_non_finite_hyper_parameter_is_refused_and_nothing_written(command, option, run, tmp_path, capsys):
    args = {"distill": ["distill", f"--teacher={run}", f"--out_dir={tmp_path / 'new'}", "--max_iters=2"],
            "train": train_args(tmp_path), "finetune": ["finetune", run, f"--out_dir={tmp_path / 'new'}"],
            "quantize": ["quantize", run, f"--out={tmp_path / 'new'}"],
            "prune": ["prune", run, f"--out={tmp_path / 'new'}"], "translate": ["translate", run, "x"],
            "eval": ["eval", run], "generate": ["generate", run, "--max_new_tokens=2"]}[command]
    before = snapshot(run)
    code, _, err = cli(args + [option], capsys)
    one_line(code, err, command, rf"--{option[2:].split('=')[0]} (must be|expects) a finite number")
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()
    assert snapshot(run) == before


def test_the_config_dataclasses_refuse_non_finite_values():
    with pytest.raises(ValueError, match="TrainConfig.learning_rate must be a finite number"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="FinetuneConfig.min_lr must be a finite number"):
        FinetuneConfig(min_lr=float("inf"))


@pytest.mark.parametrize("command", ["eval", "generate", "quantize", "prune", "export", "finetune"])
def test_a_checkpoint_of_nan_weights_is_refused_at_load(command, run, tmp_path, capsys):
    nan_run = tmp_path / "nan-run"
    shutil.copytree(run, nan_run)
    ck = latest_checkpoint(nan_run)
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(ck / MODEL_FILE).items()}
    save_file(tensors, ck / MODEL_FILE, metadata={"format": "pt"})
    write_manifest(ck)
    before = snapshot(nan_run)
    args = {"eval": ["eval", nan_run], "generate": ["generate", nan_run, "--max_new_tokens=2"],
            "quantize": ["quantize", nan_run, f"--out={tmp_path / 'new'}"],
            "prune": ["prune", nan_run, "--sparsity=0.5", f"--out={tmp_path / 'new'}"],
            "export": ["export", nan_run, f"--onnx={tmp_path / 'new.onnx'}", "--exporter=torchscript"],
            "finetune": ["finetune", nan_run, f"--out_dir={tmp_path / 'new'}"]}[command]
    code, _, err = cli(args + ["--device=cpu"] * (command not in ("export", "finetune")), capsys)
    one_line(code, err, command, r"step-0000008.*outputs are not finite on a warm-up forward pass.*NaN")
    assert snapshot(nan_run) == before and not list(tmp_path.glob("new*"))


# --- the silently accepted and the tracebacks of probe 12 ------------------------------------------------------

@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, pairs):
    root = tmp_path_factory.mktemp("s2s-run")
    assert main(seq2seq_args(root, pairs, "s2s", f"--max_iters={EVERY}")) == 0
    return root / "s2s"


@pytest.mark.parametrize("args, command, match", [
    (lambda r, s, t: ["translate", s, "x", "--max_new_tokens=-1"], "translate", "--max_new_tokens must be >= 1"),
    (lambda r, s, t: ["eval", s, "--metric="], "eval", "unknown metric ''"),
    (lambda r, s, t: ["eval", s, "--max_sentences=-3"], "eval", "--max_sentences must be >= 1"),
    (lambda r, s, t: ["distill", f"--teacher={s}", f"--out_dir={t / 'new'}", "--max_iters=2"], "distill",
     "is an encoder–decoder .*a teacher is a language model"),
    (lambda r, s, t: ["finetune", r, "--lora_rank=1000000", f"--out_dir={t / 'new'}"], "finetune",
     "LoRA rank 1000000 is larger than the adapted layers allow"),
    (lambda r, s, t: train_args(t, f"--out_dir={t / 'a-file'}"), "train", "a-file is a file, not a folder"),
    (lambda r, s, t: ["finetune", r, f"--out_dir={t / 'a-file'}"], "finetune", "a-file is a file, not a folder"),
    (lambda r, s, t: ["quantize", r, f"--out={t / 'a-file' / 'q'}"], "quantize", "a-file is a file, not a folder"),
    (lambda r, s, t: ["prune", r, "--sparsity=0.5", f"--out={t / 'a-file'}"], "prune", "is a file, not a folder"),
    (lambda r, s, t: ["distill", f"--teacher={r}", f"--out_dir={t / 'a-file'}"], "distill", "is a file, not a folder"),
    (lambda r, s, t: ["quantize", r, f"--out={t / 'new'}", "--batch_size=-1"], "quantize", "--batch_size must be positive"),
])
def test_each_probe_12_case_is_one_line_and_writes_nothing(args, command, match, run, seq2seq_run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    argv = args(run, seq2seq_run, tmp_path)
    before = snapshot(tmp_path), snapshot(run), snapshot(seq2seq_run)
    code, _, err = cli(argv, capsys)
    one_line(code, err, command, match)
    assert (snapshot(tmp_path), snapshot(run), snapshot(seq2seq_run)) == before


def test_data_files_with_absurd_labels_or_nesting_are_one_line(run, tmp_path, capsys):
    huge = tmp_path / "huge.jsonl"
    huge.write_text("\n".join(json.dumps({"text": f"line {i}", "label": 10**30 if i == 3 else i % 2})
                              for i in range(10)))
    code, _, err = cli(["finetune", run, f"--data={huge}", f"--out_dir={tmp_path / 'new'}"], capsys)
    one_line(code, err, "finetune", r"huge.jsonl: row 4: label id 1000000000\.\.\.\(31 digits\) is above 9,999")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for task in ("classify", "instruct"):
        code, _, err = cli(["finetune", run, f"--data={deep}", f"--task={task}", f"--out_dir={tmp_path / 'new'}"],
                           capsys)
        one_line(code, err, "finetune", "deep.json: JSON nested too deeply")
    assert not (tmp_path / "new").exists()


# --- a collapsed classifier, an instruction model that writes "###" --------------------------------------------

def test_a_classifier_predicting_one_class_for_everything_says_so():
    report = classification_report([0, 1, 1, 0, 1], [1, 1, 1, 1, 1], ["neg", "pos"])
    assert report["collapsed_to"] == "pos" and report["accuracy"] == 0.6
    assert "every one of the 5 examples is predicted 'pos'" in format_report(report)
    healthy = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["neg", "pos"])
    assert healthy["collapsed_to"] is None and "warning" not in format_report(healthy)
    # a test set of one class predicted as that class has not collapsed: it is simply right
    assert classification_report([1, 1], [1, 1], ["neg", "pos"])["collapsed_to"] is None


def test_an_instruction_model_that_writes_hashes_stops_at_the_end_marker():
    """The model writes "#" forever; the prompt ends "### Response:\\n", so its first "###" completes the
    end marker "\\n###" (the newline is the prompt's): generation stops after 3 tokens, not 200."""
    from minillm.data.tokenizer import CharTokenizer
    from minillm.finetune.instruct import END, answer, format_prompt
    from minillm.generate.sampling import generate_text
    from minillm.model.transformer import CausalLM

    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz #:.\nIRS")))
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16,
                                 tie_weights=False)).eval()
    with torch.no_grad():  # every position: the final norm outputs its bias, the head picks "#"
        model.transformer.final_norm.weight.zero_()
        model.transformer.final_norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.encode("#")[0]] = 1.0
    prompt = format_prompt("say hi.", template="plain")
    counts = []
    assert generate_text(model, tok, [prompt], 200, temperature=0.0, stop=[END], token_counts=counts) == [""]
    assert counts == [3]
    assert answer(model, tok, "say hi.", template="plain", max_new_tokens=200) == ""
    # without the template's newline before it, "###" in a plain continuation is text, not a stop
    assert generate_text(model, tok, ["say hi."], 5, temperature=0.0, stop=[END]) == ["#####"]
