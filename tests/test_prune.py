"""Pruning (minillm/compress/prune.py, jobs.py): exact sparsity, masks that survive training, the 2:4
pattern, structured pruning equal to its masked twin, and pruned checkpoints usable everywhere."""

import copy
import dataclasses

import pytest
import torch

import minillm.cli as cli
from minillm.weights.checkpoint import load_model, save_model
from minillm.compress import prune as P
from minillm.compress.jobs import prune_checkpoint, prune_model
from minillm.compress.quant import QuantLinear
from minillm.compress.quantize import quantize_checkpoint
from minillm.data.tokenizer import CharTokenizer
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model, count_parameters
from minillm.train.fit import finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU
TINY = dict(block_size=16, n_layer=2, n_head=4, n_embd=32, positional="learned")


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{"vocab_size": 24, **TINY, **kw})).eval()


def tiny_checkpoint(folder, tmp_path, seed=0, **kw):
    """A saved random model with a char tokenizer and a recorded text file (what prune/eval read)."""
    g = torch.Generator().manual_seed(seed)
    words = ["the ", "king ", "and ", "queen ", "of ", "rome ", "said ", "so.\n"]
    text = "".join(words[i] for i in torch.randint(len(words), (3000,), generator=g).tolist())
    (tmp_path / "text.txt").write_text(text)
    tok = CharTokenizer.from_text(text)
    model = tiny_model(seed, vocab_size=tok.vocab_size, **kw)
    save_model(folder, model, tok, data=str(tmp_path / "text.txt"))
    return folder


def register_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + [
        m for m in ("minillm.cli.prune", "minillm.cli.distill", "minillm.cli.compress_report")
        if m not in cli.COMMAND_MODULES])


# --- unstructured magnitude pruning ----------------------------------------------------------

@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_layerwise_magnitude_reaches_sparsity_exactly_and_drops_the_smallest(s):
    model = tiny_model()
    weights = P.prunable_weights(model)
    before = {n: w.detach().clone() for n, w in weights.items()}
    P.apply_masks(model, P.magnitude_masks(weights, s))
    for n, w in weights.items():
        assert int((w == 0).sum()) == round(s * w.numel())
        if 0 < s:  # every kept |w| is ≥ every pruned |w|
            kept, gone = before[n][w != 0].abs(), before[n][w == 0].abs()
            assert kept.min() >= gone.max()


def test_global_magnitude_exact_in_total_and_prunes_small_layers_more():
    model = tiny_model()
    weights = P.prunable_weights(model)
    with torch.no_grad():
        weights["transformer.blocks.0.ffn.up.weight"].mul_(10)  # one layer of large weights
    P.apply_masks(model, P.magnitude_masks(weights, 0.5, scope="global"))
    total = sum(w.numel() for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) == round(0.5 * total)
    big = weights.pop("transformer.blocks.0.ffn.up.weight")
    assert P.sparsity_of([big]) < 0.05 and P.sparsity_of(weights) > 0.5  # one ranking: the big layer is spared


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_an_error(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        P.magnitude_masks(P.prunable_weights(tiny_model()), bad)


def _tokens(n=2000, vocab=24, seed=0):
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_masks_survive_optimizer_steps_and_the_rest_still_trains():
    model = tiny_model()
    weights = P.prunable_weights(model)
    masks = P.magnitude_masks(weights, 0.6)
    P.apply_masks(model, masks)
    start = {n: w.detach().clone() for n, w in weights.items()}
    finetune(model, _tokens(), 5, batch_size=4, learning_rate=1e-2, warmup_iters=0,
             after_step=lambda m, t: P.apply_masks(m, masks))
    for n, w in weights.items():
        assert torch.equal(w == 0, ~masks[n])  # same zeros, exactly
        assert not torch.equal(w[masks[n]], start[n][masks[n]])  # the kept weights moved
    # without re-applying the masks AdamW moves the pruned weights again (what the masks prevent)
    finetune(model, _tokens(), 2, batch_size=4, learning_rate=1e-2, warmup_iters=0)
    assert P.sparsity_of(weights) < 0.1


def test_gradual_schedule_is_zhu_and_gupta_cubic():
    s = lambda t: P.gradual_sparsity(t, final=0.8, initial=0.1, start=10, n_steps=5, interval=4)  # noqa: E731
    assert s(0) == s(10) == pytest.approx(0.1)
    assert s(30) == s(100) == pytest.approx(0.8)
    assert s(20) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - 10 / 20) ** 3)
    values = [s(t) for t in range(0, 40)]
    assert values == sorted(values)


def test_gradual_fine_tune_ends_at_the_final_sparsity_exactly():
    model = tiny_model()
    pruned, record = prune_model(model, "magnitude", 0.7, _tokens(), finetune_iters=8, schedule="gradual",
                                 batch_size=4, warmup_iters=0)
    for w in P.prunable_weights(pruned).values():
        assert int((w == 0).sum()) == round(0.7 * w.numel())
    assert record["weight_sparsity"] == pytest.approx(0.7, abs=1e-3)


# --- 2:4 ----------------------------------------------------------------------------------------

def test_two_four_keeps_the_two_largest_of_every_four():
    model = tiny_model()
    weights = P.prunable_weights(model)
    before = {n: w.detach().clone() for n, w in weights.items()}
    P.apply_masks(model, P.two_four_masks(weights))
    for n, w in weights.items():
        assert P.is_two_four(w) and P.sparsity_of([w]) == 0.5
        g, g0 = w.reshape(w.shape[0], -1, 4), before[n].reshape(w.shape[0], -1, 4)  # (N, K/4, 4)
        assert torch.equal((g != 0).sum(-1), torch.full(g.shape[:2], 2))
        kept = g0.abs().sort(-1, descending=True).values[..., :2]  # the two largest magnitudes per group
        assert torch.equal(g.abs().sort(-1, descending=True).values[..., :2], kept)
    assert not P.is_two_four(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse tensor cores need CUDA")
def test_semi_structured_matches_masked_dense_on_cuda():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=128, block_size=64, n_layer=1, n_head=4, n_embd=128,
                                    positional="learned", bias=False)).cuda().half().eval()
    P.apply_masks(model, P.two_four_masks(P.prunable_weights(model)))
    x = torch.randint(128, (16, 64), device="cuda")
    want = model(x)[0]
    got = P.to_semi_structured(model)(x)[0]
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# --- structured -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(activation="swiglu", bias=True, positional="rotary")])
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_shrunk_model_equals_the_masked_model(kw, importance):
    model = tiny_model(**kw)
    x = torch.randint(24, (3, 16), generator=torch.Generator().manual_seed(1))
    batches = [(x, torch.roll(x, -1, 1))] if importance == "taylor" else ()
    plan = P.choose_structure(model, heads=0.5, neurons=0.25, importance=importance, batches=batches)
    masked = copy.deepcopy(model)
    P.apply_masks(masked, P.structure_masks(masked, plan))
    small = P.shrink_model(model, plan)
    assert (small.cfg.n_head, small.cfg.head_size, small.cfg.ffn_hidden) == (2, 8, 3 * model.cfg.ffn_dim // 4)
    assert count_parameters(small) < count_parameters(model)
    torch.testing.assert_close(small(x)[0], masked(x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(small(x)[0], model(x)[0], atol=1e-3)  # something was removed


def test_structure_keeps_the_most_important_heads():
    model = tiny_model()
    with torch.no_grad():  # make head 2 of block 0 clearly the largest: it must be kept
        model.transformer.blocks[0].attn.proj.weight[:, 16:24].mul_(10)
    plan = P.choose_structure(model, heads=0.75)
    assert plan["heads"][0] == [2]


def test_head_pruning_of_grouped_query_attention_is_refused():
    model = tiny_model(n_kv_head=2)
    with pytest.raises(ValueError, match="grouped-query"):
        P.choose_structure(model, heads=0.5)
    small = P.shrink_model(model, P.choose_structure(model, neurons=0.5))  # neurons still work
    assert small.cfg.n_kv_head == 2 and small.cfg.ffn_hidden == model.cfg.ffn_dim // 2


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method,s", [("magnitude", 0.5), ("global", 0.5), ("2:4", None), ("heads", 0.5),
                                      ("neurons", 0.5), ("structured", 0.25)])
def test_every_pruned_form_round_trips_and_loads_in_generate_and_eval(method, s, tmp_path, monkeypatch, capsys):
    src = tiny_checkpoint(tmp_path / "dense", tmp_path)
    register_commands(monkeypatch)
    out = tmp_path / "pruned"
    args = ["prune", str(src), f"--method={method}", "--finetune_iters=2", "--eval_iters=2", f"--out={out}"]
    assert cli.main(args + ([f"--sparsity={s}"] if s is not None else [])) == 0
    model, tok, meta = load_model(out)
    assert meta["pruning"]["method"] == method and len(meta["pruning"]["val_ppl"]) == 2
    if method in ("magnitude", "global", "2:4"):
        assert P.sparsity_of(P.prunable_weights(model)) == pytest.approx(0.5, abs=1e-3)
    else:
        assert meta["pruning"]["params"][1] == count_parameters(model) < meta["pruning"]["params"][0]
    again = load_model(out)[0]
    x = torch.randint(tok.vocab_size, (2, 16))
    torch.testing.assert_close(again(x)[0], model(x)[0], atol=0, rtol=0)
    assert cli.main(["generate", str(out), "--max_new_tokens=5", "--prompt=the"]) == 0
    assert cli.main(["eval", str(out), "--eval_iters=2", "--batch_size=2", f"--cache_dir={tmp_path / 'cache'}"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_pruning_a_quantized_checkpoint_is_refused_and_int8_keeps_the_zeros(tmp_path, monkeypatch, capsys):
    src = tiny_checkpoint(tmp_path / "dense", tmp_path)
    prune_checkpoint(src, tmp_path / "sparse", "magnitude", 0.5, eval_iters=2)
    quantize_checkpoint(tmp_path / "sparse", tmp_path / "sparse-int8", "int8", eval_iters=2, gen_tokens=0)
    sparse = load_model(tmp_path / "sparse")[0]
    q, _, meta = load_model(tmp_path / "sparse-int8")
    assert meta["pruning"]["method"] == "magnitude"  # the record travels with the quantized copy
    for name, w in P.prunable_weights(sparse).items():  # int8's code 0 is exactly 0.0: zeros stay zeros
        ql = q.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(ql, QuantLinear) and torch.equal(ql.dequantized_weight() == 0, w == 0)
    register_commands(monkeypatch)
    assert cli.main(["prune", str(tmp_path / "sparse-int8"), "--sparsity=0.5", f"--out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized" in err and "prune the float checkpoint" in err
    assert cli.main(["prune", str(src), "--sparsity=1", f"--out={tmp_path / 'x'}"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_structured_and_quantized_combination_loads(tmp_path):
    src = tiny_checkpoint(tmp_path / "dense", tmp_path, n_embd=64)  # int4 groups of 32: H'·D = 2·16 = 32
    prune_checkpoint(src, tmp_path / "small", "structured", 0.5, eval_iters=2)
    quantize_checkpoint(tmp_path / "small", tmp_path / "small-int4", "int4", group_size=32, eval_iters=2,
                        gen_tokens=0)
    model, _, meta = load_model(tmp_path / "small-int4")
    assert meta["model"]["n_head"] == 2 and meta["quantization"]["scheme"] == "int4"
    assert dataclasses.asdict(model.cfg)["head_size"] == 16
