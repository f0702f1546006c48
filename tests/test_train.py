"""Training: optimizer groups, schedule, exact resume, divergence handling, accumulation, MLM, CLI."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from minillm.model.builtin_ops import builtin_loss, use_builtin_ops
from minillm.weights.checkpoint import load_model, read_config
from minillm.cli import main
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.train.optim import clip_grad_norm, lr_at, make_optimizer, param_groups
from minillm.train import TrainConfig, TrainingDiverged, evaluate, train
from minillm.train.state import STATE_FILE, load_train_state, save_train_state

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def small_model(**kw):
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **kw})


def small_train(tmp_path, name="out", **kw):
    args = dict(max_iters=20, eval_interval=5, eval_iters=2, log_interval=1, batch_size=4,
                learning_rate=1e-2, warmup_iters=3, lr_decay_iters=20, out_dir=str(tmp_path / name),
                cache_dir=str(tmp_path / "cache"))
    return TrainConfig(**{**args, **kw})


def read_metrics(out_dir):
    records = [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return train, evals


# --- optimizer and schedule ---------------------------------------------------------------------

def test_weight_decay_groups_skip_norms_biases_and_tied_embeddings():
    model = CausalLM(small_model(positional="learned", vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    named = dict(model.named_parameters())
    expected = {n for n, p in named.items() if n.endswith(("qkv.weight", "proj.weight", "up.weight", "down.weight"))}
    assert {n for n, p in named.items() if id(p) in decay_ids} == expected
    assert id(model.lm_head.weight) not in decay_ids  # tied: it is the token embedding
    assert id(model.transformer.pos_emb.emb.weight) not in decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    untied = CausalLM(small_model(vocab_size=50, tie_weights=False))
    assert id(untied.lm_head.weight) in {id(p) for p in param_groups(untied, 0.1)[0]["params"]}


def test_lr_schedule_warmup_then_cosine_to_floor():
    lr = [lr_at(s, 1e-3, 1e-4, 10, 110) for s in range(130)]
    assert lr[0] == pytest.approx(1e-3 / 11) and lr[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))  # rising warm-up
    assert lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half-way down the cosine
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111]))
    assert lr[110] == pytest.approx(1e-4) and lr[129] == 1e-4


def test_clip_grad_norm_bounds_the_global_norm():
    model = CausalLM(small_model(vocab_size=30))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = clip_grad_norm(model, 1.0)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 1.0
    torch.testing.assert_close(after, torch.tensor(1.0), rtol=1e-5, atol=1e-6)


def test_train_state_round_trip_without_pickle(tmp_path):
    model = CausalLM(small_model(vocab_size=30))
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    model(torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8)))[1].backward()
    opt.step()
    gen = torch.Generator().manual_seed(7)
    save_train_state(tmp_path, opt, gen, step=3, best_val_loss=1.5)
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:  # a plain safetensors file
        assert "rng/batches" in f.keys() and "state" in f.metadata()
    opt2 = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    gen2 = torch.Generator()
    scalars = load_train_state(tmp_path, opt2, gen2)
    assert scalars == {"step": 3, "best_val_loss": 1.5}
    assert torch.equal(gen2.get_state(), gen.get_state())
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k in a["state"][pid]:
            torch.testing.assert_close(a["state"][pid][k], b["state"][pid][k], rtol=0, atol=0)


# --- the loop -------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, corpus):
    cfg = small_model(dropout=0.1)  # dropout: the resumed run must also restore the torch RNG
    full = train(cfg, small_train(tmp_path, "full"), corpus, progress=False)
    assert full["step"] == 20

    def crash(step, model):
        if step == 13:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, small_train(tmp_path, "part"), corpus, on_step=crash, progress=False)
    assert read_config(tmp_path / "part")["step"] == 10  # the last checkpoint before the crash
    train(cfg, small_train(tmp_path, "part", resume=True), corpus, progress=False)

    train_full, evals_full = read_metrics(tmp_path / "full")
    train_part, evals_part = read_metrics(tmp_path / "part")
    assert [s for s, _ in train_full] == list(range(20))
    assert train_part == train_full  # exact float equality, every step
    assert evals_part == evals_full and [s for s, _ in evals_full] == [0, 5, 10, 15, 20]
    assert evals_full[-1][1] < evals_full[0][1] - 0.3  # and it learned something
    (tmp_path / "full" / "loss.png").stat()  # the plot exists next to the checkpoint


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    def poison(step, model):
        if step == 7:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="loss is nan at step 8"):
        train(small_model(), small_train(tmp_path), corpus, on_step=poison, progress=False)
    model, _, meta = load_model(tmp_path / "out")
    assert meta["step"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_accumulation_equals_the_large_batch(tmp_path, corpus):
    big = train(small_model(), small_train(tmp_path, "big", batch_size=8, max_iters=6), corpus, progress=False)
    acc = train(small_model(), small_train(tmp_path, "acc", batch_size=4, gradient_accumulation_steps=2,
                                           max_iters=6), corpus, progress=False)
    losses_big, _ = read_metrics(big["out_dir"])
    losses_acc, _ = read_metrics(acc["out_dir"])
    torch.testing.assert_close(torch.tensor([loss for _, loss in losses_acc]), torch.tensor([loss for _, loss in losses_big]),
                               rtol=1e-5, atol=1e-5)


def test_masked_lm_training_reports_accuracy(tmp_path, corpus):
    cfg = small_model(causal=False)
    out = train(cfg, small_train(tmp_path, objective="mlm", max_iters=10, learning_rate=3e-3), corpus,
                progress=False)
    ev = out["eval"]
    assert 0.0 <= ev["val_acc"] <= 1.0 and math.isfinite(ev["val_loss"])
    model, tok, _ = load_model(out["out_dir"])
    assert "[MASK]" in tok.special_tokens and not model.cfg.causal
    with pytest.raises(ValueError, match="causal"):
        train(small_model(), small_train(tmp_path, "bad", objective="mlm"), corpus, progress=False)


def test_evaluate_uses_fixed_batches():
    model = CausalLM(small_model(vocab_size=20)).eval()
    tokens = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(0))
    a = evaluate(model, tokens, 4, 16, 3, "cpu", torch.Generator().manual_seed(1))
    b = evaluate(model, tokens, 4, 16, 3, "cpu", torch.Generator().manual_seed(1))
    assert a == b and a["ppl"] == pytest.approx(math.exp(a["loss"]))


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="gpt")
    with pytest.raises(ValueError, match="max_iters"):
        TrainConfig(max_iters=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")


@pytest.mark.parametrize("arch", [dict(), dict(norm="rmsnorm", activation="swiglu", bias=False),
                                  dict(activation="gelu_tanh", positional="learned"), dict(activation="relu")])
def test_builtin_ops_swap_computes_the_same_loss(arch):
    torch.manual_seed(0)
    model = CausalLM(small_model(vocab_size=30, **arch))
    x, y = torch.randint(0, 30, (3, 16)), torch.randint(0, 30, (3, 16))
    logits, ref = model(x, y)
    keys = list(model.state_dict())
    use_builtin_ops(model)
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    assert not any(type(m).__module__ == "minillm.model.layers" and "Norm" in type(m).__name__ for m in model.modules())
    logits2, _ = model(x)
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(builtin_loss(logits2, y), ref, rtol=1e-5, atol=1e-5)


def test_training_with_builtin_ops_follows_the_readable_path(tmp_path, corpus):
    runs = [train(small_model(), small_train(tmp_path, f"b{flag}", builtin_ops=flag, max_iters=6), corpus,
                  progress=False) for flag in (False, True)]
    (a, _), (b, _) = (read_metrics(r["out_dir"]) for r in runs)
    torch.testing.assert_close(torch.tensor([loss for _, loss in b]), torch.tensor([loss for _, loss in a]), rtol=1e-4, atol=1e-4)


# --- the command line -------------------------------------------------------------------------------

def test_cli_train_eval_generate(tmp_path, corpus, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", corpus, "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
            "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--batch_size=2", f"--out_dir={out}",
            f"--cache_dir={tmp_path / 'cache'}", "--sample_tokens=20"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "done: 4 steps" in printed and "--- sample" in printed
    assert main(["eval", str(out)]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt=To be", "--max_new_tokens=12", "--temperature=0"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main(["train", "--resume=true", f"--out_dir={out}", "--max_iters=6", "--sample_tokens=0"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out  # configs and data came from the checkpoint
    assert main(["train", "--data", corpus, "--max_iter=4"]) == 2
    assert "did you mean --max_iters" in capsys.readouterr().err
