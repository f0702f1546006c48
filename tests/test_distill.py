"""Distillation (minillm/compress/distill.py) and the compression report (minillm/compress/report.py):
the loss against a hand computation, the teacher checks, and every compressed form in one table."""

import math

import pytest
import torch
import torch.nn.functional as F

import minillm.cli as cli
from minillm.weights.checkpoint import load_model
from minillm.compress.distill import TopKCache, check_compatible, distill, distillation_loss, load_teacher
from minillm.compress.jobs import distill_checkpoint, prune_checkpoint
from minillm.compress.quantize import quantize_checkpoint
from minillm.compress.report import pareto_front
from minillm.data.tokenizer import CharTokenizer
from minillm.model.config import ModelConfig
from minillm.model.losses import IGNORE_INDEX
from minillm.model.transformer import build_model

from test_prune import TINY, register_commands, tiny_checkpoint, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


def hand_distillation_loss(zs, zt, y, alpha, tau):
    """The formula written with exp/log over python floats: α·τ²·mean KL + (1-α)·mean CE."""
    kl, ce, n = 0.0, 0.0, 0
    for s_row, t_row, target in zip(zs.reshape(-1, zs.shape[-1]).tolist(), zt.reshape(-1, zt.shape[-1]).tolist(),
                                    y.reshape(-1).tolist()):
        if target == IGNORE_INDEX:
            continue
        n += 1
        zs_tau, zt_tau = [v / tau for v in s_row], [v / tau for v in t_row]
        ps = [math.exp(v) / sum(math.exp(u) for u in zs_tau) for v in zs_tau]
        pt = [math.exp(v) / sum(math.exp(u) for u in zt_tau) for v in zt_tau]
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        ce += -math.log(math.exp(s_row[target]) / sum(math.exp(v) for v in s_row))
    return alpha * tau ** 2 * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_distillation_loss_equals_hand_computation(tau, alpha):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 3, 5, generator=g) * 2, torch.randn(2, 3, 5, generator=g) * 2
    y = torch.tensor([[1, 4, IGNORE_INDEX], [0, 2, 3]])
    loss, parts = distillation_loss(zs, zt, y, alpha, tau)
    assert loss.item() == pytest.approx(hand_distillation_loss(zs, zt, y, alpha, tau), rel=1e-5)
    # the soft part against PyTorch's own KL (input log p_S, target p_T), on the 5 labelled positions
    keep = y.reshape(-1) != IGNORE_INDEX
    kl = F.kl_div(F.log_softmax(zs.reshape(-1, 5)[keep] / tau, -1), F.log_softmax(zt.reshape(-1, 5)[keep] / tau, -1),
                  reduction="batchmean", log_target=True)
    torch.testing.assert_close(parts["soft"], kl * tau ** 2)


def test_soft_weight_zero_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 7, generator=g, requires_grad=True), torch.randn(2, 4, 7, generator=g)
    y = torch.tensor([[1, 2, IGNORE_INDEX, 6], [0, IGNORE_INDEX, 3, 3]])
    loss, _ = distillation_loss(zs, zt, y, alpha=0.0, temperature=3.0)
    want = F.cross_entropy(zs.reshape(-1, 7), y.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, want)
    (g1,) = torch.autograd.grad(loss, zs)
    (g2,) = torch.autograd.grad(want, zs)
    torch.testing.assert_close(g1, g2)


def test_soft_loss_is_zero_for_the_teacher_itself_and_top_k_of_everything_is_exact():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(2, 3, 6, generator=g), torch.randint(6, (2, 3), generator=g)
    assert distillation_loss(z, z, y, 1.0, 2.0)[0].item() == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(2, 3, 6, generator=g)
    vals, idx = zt.topk(6, dim=-1)  # k = V: the "top-k" teacher is the whole teacher
    torch.testing.assert_close(distillation_loss(z, vals, y, 0.7, 2.0, idx)[0], distillation_loss(z, zt, y, 0.7, 2.0)[0])
    vals, idx = zt.topk(2, dim=-1)  # k < V: another (approximate) value
    assert not torch.allclose(distillation_loss(z, vals, y, 1.0, 2.0, idx)[0], distillation_loss(z, zt, y, 1.0, 2.0)[0])


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(alpha=-0.1), dict(temperature=0.0)])
def test_bad_alpha_or_temperature_is_an_error(bad):
    z, y = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError):
        distillation_loss(z, z, y, **{"alpha": 0.5, "temperature": 2.0, **bad})


def test_distilling_moves_the_student_towards_the_teacher():
    teacher, student = tiny_model(seed=1), tiny_model(seed=2)
    tokens = torch.randint(24, (3000,), generator=torch.Generator().manual_seed(0))
    x = tokens[:64].reshape(4, 16)
    kl = lambda: distillation_loss(student(x)[0], teacher(x)[0], torch.zeros_like(x), 1.0, 1.0)[0].item()  # noqa: E731
    before = kl()
    distill(student, teacher, tokens, 20, alpha=1.0, temperature=1.0, batch_size=8, learning_rate=3e-3,
            warmup_iters=0)
    assert kl() < 0.5 * before


def test_top_k_cache_runs_the_teacher_once_per_step():
    teacher, tokens = tiny_model(seed=1), torch.randint(24, (2000,), generator=torch.Generator().manual_seed(0))
    cache = TopKCache(4)
    first = distill(tiny_model(seed=2), teacher, tokens, 3, topk=4, cache=cache, batch_size=4, warmup_iters=0)
    assert sorted(cache.steps) == [0, 1, 2] and cache.nbytes() == 3 * 4 * 16 * 4 * (2 + 4)

    class NoTeacher(torch.nn.Module):  # the second student must never call the teacher
        cfg = teacher.cfg

        def forward(self, x):
            raise AssertionError("the teacher ran although its logits were cached")

    second = distill(tiny_model(seed=2), NoTeacher(), tokens, 3, cache=cache, batch_size=4, warmup_iters=0)
    assert second["losses"] == pytest.approx(first["losses"])  # same batches, same cached targets


def test_masked_lm_student_distils_on_masked_positions():
    tok = CharTokenizer.from_text("abcdefgh ", special_tokens=["[PAD]", "[MASK]"])
    cfg = dict(vocab_size=tok.vocab_size, causal=False, **TINY)
    torch.manual_seed(0)
    teacher, student = build_model(ModelConfig(**cfg)), build_model(ModelConfig(**{**cfg, "n_layer": 1}))
    tokens = torch.tensor(tok.encode("abc defgh " * 200))
    out = distill(student, teacher, tokens, 3, objective="mlm", tokenizer=tok, batch_size=4, warmup_iters=0)
    assert len(out["losses"]) == 3 and all(math.isfinite(v) and v > 0 for v in out["soft"])


def test_vocabulary_mismatch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="vocabulary has 24 tokens and the student's 30"):
        check_compatible(tiny_model(), tiny_model(vocab_size=30))
    teacher = tiny_checkpoint(tmp_path / "teacher", tmp_path)
    other = CharTokenizer.from_text("xyz")
    other.save(tmp_path / "other.json")
    register_commands(monkeypatch)
    assert cli.main(["distill", f"--teacher={teacher}", f"--tokenizer={tmp_path / 'other.json'}",
                     f"--out_dir={tmp_path / 's'}", "--max_iters=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocabulary" in err


def test_hugging_face_gpt2_teacher_loads_and_a_different_vocabulary_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    teacher, tok = load_teacher(tmp_path / "hf")
    assert tok is None and teacher.cfg.vocab_size == 40 and teacher.cfg.causal
    with pytest.raises(ValueError, match="same tokens"):
        check_compatible(teacher, tiny_model())


# --- every compressed form: round trip, CLI, report ---------------------------------------------

@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """dense, magnitude-pruned, structured-pruned + int4, distilled, distilled + int8: saved checkpoints."""
    tmp_path = tmp_path_factory.mktemp("compressed")
    dense = tiny_checkpoint(tmp_path / "dense", tmp_path, n_embd=64)
    prune_checkpoint(dense, tmp_path / "sparse", "magnitude", 0.5, finetune_iters=2, eval_iters=2)
    prune_checkpoint(dense, tmp_path / "small", "structured", 0.5, eval_iters=2)
    quantize_checkpoint(tmp_path / "small", tmp_path / "small-int4", "int4", 32, eval_iters=2, gen_tokens=0)
    student = ModelConfig(**{**TINY, "n_layer": 1, "n_embd": 32})
    distill_checkpoint(dense, tmp_path / "student", student, 3, eval_iters=2, batch_size=4, warmup_iters=0)
    quantize_checkpoint(tmp_path / "student", tmp_path / "student-int8", "int8", eval_iters=2, gen_tokens=0)
    return [tmp_path / n for n in ("dense", "sparse", "small", "small-int4", "student", "student-int8")]


def test_distilled_checkpoint_round_trips_and_records_the_run(compressed):
    model, tok, meta = load_model(compressed[4])
    d = meta["distillation"]
    assert d["alpha"] == 0.5 and d["temperature"] == 2.0 and d["params"][1] < d["params"][0]
    x = torch.randint(tok.vocab_size, (2, 16))
    torch.testing.assert_close(load_model(compressed[4])[0](x)[0], model(x)[0], atol=0, rtol=0)


def test_generate_eval_serve_and_report_accept_every_compressed_checkpoint(compressed, tmp_path, monkeypatch,
                                                                           capsys):
    import uvicorn

    register_commands(monkeypatch)
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))  # build the app, do not listen
    for path in compressed:
        assert cli.main(["generate", str(path), "--max_new_tokens=4", "--prompt=the"]) == 0
        assert cli.main(["eval", str(path), "--eval_iters=2", "--batch_size=2",
                         f"--cache_dir={tmp_path / 'cache'}"]) == 0
        assert cli.main(["serve", str(path)]) == 0
    assert len(served) == len(compressed)
    capsys.readouterr()
    plot = tmp_path / "pareto.png"
    assert cli.main(["compress", "report", *map(str, compressed), f"--plot={plot}", "--eval_iters=2",
                     "--gen_tokens=4", "--rounds=1", "--batch_sizes", "1", "4"]) == 0
    out = capsys.readouterr().out
    assert sum(str(p)[-27:] in out for p in compressed) == len(compressed)  # one row each
    assert "magnitude 50%" in out and "structured 50% + int4" in out and "distilled + int8" in out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_pareto_front():
    # (cost, ppl): the third is beaten by the first on both; the last ties the first's cost, worse ppl
    assert pareto_front([(1.0, 5.0), (2.0, 4.0), (3.0, 6.0), (1.0, 7.0), (4.0, 3.0)]) == [0, 1, 4]


def test_compress_without_a_subcommand_prints_help(monkeypatch, capsys):
    register_commands(monkeypatch)
    assert cli.main(["compress"]) == 2
    assert "report" in capsys.readouterr().out
