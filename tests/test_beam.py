"""Greedy and beam search (minillm/generate/beam.py) for Seq2Seq and CausalLM: beam 1 is greedy, the KV
cache changes nothing, and a beam wide enough to keep every prefix finds the best output a brute-force
enumeration finds."""

import itertools
import math
import string

import pytest
import torch
import torch.nn.functional as F

import minillm.cli.translate as translate_cli
import minillm.generate.beam as beam_module
from minillm.cli import main
from minillm.data.tokenizer import CharTokenizer
from minillm.data.translation import SPECIALS
from minillm.generate.beam import beam_search, greedy_search, length_penalty
from minillm.model.config import ModelConfig
from minillm.model.seq2seq import CrossAttention, Seq2Seq, Seq2SeqConfig
from minillm.model.transformer import CausalLM
from minillm.weights.checkpoint import save_model

EOS = 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster (conftest.py)


def boost_eos(embedding: torch.Tensor) -> None:
    """A random model rarely picks EOS. Doubling EOS's (tied) embedding row makes its logit larger in
    magnitude, so that some outputs end early and others run to max length: both paths get tested."""
    with torch.no_grad():
        embedding[EOS] *= 2


def seq2seq(seed=0, V=7):
    torch.manual_seed(seed)
    # init_std 0.3: a random model with peaked next-token distributions, so outputs differ
    cfg = Seq2SeqConfig(ModelConfig(vocab_size=V, n_embd=16, n_head=2, block_size=32, init_std=0.3),
                        n_enc_layer=1, n_dec_layer=2, eos_id=EOS)
    model = Seq2Seq(cfg).eval()
    boost_eos(model.encoder.tok_emb.weight)
    src = torch.randint(3, V, (4, 6), generator=torch.Generator().manual_seed(seed))
    src[1, 3:] = 0  # a padded source
    return model, src


def causal_lm(seed=0, V=9):
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(vocab_size=V, n_embd=16, n_head=2, n_layer=2, block_size=32, init_std=0.3)).eval()
    boost_eos(model.transformer.tok_emb.weight)
    prompt = torch.randint(3, V, (4, 3), generator=torch.Generator().manual_seed(seed))
    return model, prompt


MODELS = {"seq2seq": seq2seq, "causal": causal_lm}


def test_length_penalty_is_gnmts():
    assert length_penalty(1, 0.6) == 1.0  # ((5+1)/6)^α
    assert length_penalty(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert length_penalty(30, 0.0) == 1.0


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_size_one_is_greedy(kind, alpha):
    model, inputs = MODELS[kind](seed=2)
    g_tokens, g_scores = greedy_search(model, inputs, 10, eos_id=EOS, alpha=alpha)
    b_tokens, b_scores = beam_search(model, inputs, beam_size=1, max_new_tokens=10, eos_id=EOS, alpha=alpha,
                                     early_stopping=True)
    assert b_tokens == g_tokens
    torch.testing.assert_close(b_scores, g_scores, rtol=1e-6, atol=1e-6)
    assert any(len(t) < 10 for t in g_tokens)  # some outputs did stop at EOS (the EOS path is exercised)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("seed", [1, 2, 4])
def test_beam_scores_at_least_greedys_on_these_examples(kind, seed):
    """Not a theorem for every model (a wider beam can lose the greedy path), but with early_stopping=False
    it should hold on ordinary examples; these fixed seeds are checked one by one."""
    model, inputs = MODELS[kind](seed)
    _, g = greedy_search(model, inputs, 8, eos_id=EOS, alpha=0.6)
    _, b = beam_search(model, inputs, beam_size=4, max_new_tokens=8, eos_id=EOS, alpha=0.6, early_stopping=False)
    assert (b >= g - 1e-9).all(), (b, g)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("early_stopping", [True, False])
def test_cached_decoding_equals_uncached(kind, early_stopping):
    model, inputs = MODELS[kind](seed=2)
    for search, kw in ((greedy_search, {}), (beam_search, {"beam_size": 3, "early_stopping": early_stopping})):
        cached = search(model, inputs, max_new_tokens=7, eos_id=EOS, alpha=0.6, use_cache=True, **kw)
        plain = search(model, inputs, max_new_tokens=7, eos_id=EOS, alpha=0.6, use_cache=False, **kw)
        assert cached[0] == plain[0]
        torch.testing.assert_close(cached[1], plain[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.6, 3.0])
def test_stopping_early_by_the_bound_loses_nothing(kind, alpha):
    """early_stopping=False stops once no live beam can beat the finished ones; running on to the
    maximum length ("never") must therefore return the same outputs and scores. (A large α rewards
    length strongly: a bound that forgot lp grows, dividing by lp(t) instead, fails there.)"""
    for seed in (0, 1, 2, 4):
        model, inputs = MODELS[kind](seed)
        kw = dict(beam_size=3, max_new_tokens=10, eos_id=EOS, alpha=alpha)
        by_bound, never = beam_search(model, inputs, early_stopping=False, **kw), \
            beam_search(model, inputs, early_stopping="never", **kw)
        assert by_bound[0] == never[0]
        torch.testing.assert_close(by_bound[1], never[1])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_wide_beam_is_exact_search(alpha):
    """With the beam wider than the number of prefixes (V=4 tokens, 3 steps) and early_stopping=False,
    beam search must return the best of ALL outputs of ≤ 3 tokens, found here by enumerating them."""
    V, L = 4, 3
    model, src = seq2seq(seed=4, V=V)
    src = src[:2].clamp_max(V - 1)
    # (V-1)^L beams: even at the last step no candidate is dropped before it is scored
    tokens, scores = beam_search(model, src, beam_size=(V - 1) ** L, max_new_tokens=L, eos_id=EOS, alpha=alpha,
                                 early_stopping=False, use_cache=False)
    body = [t for t in range(V) if t != EOS]
    outputs = [list(y) + [EOS] for n in range(L) for y in itertools.product(body, repeat=n)]  # ended by EOS
    outputs += [list(y) for y in itertools.product(body, repeat=L)]  # cut off at max_new_tokens
    for b in range(2):
        best = (float("-inf"), None)
        for n in range(1, L + 1):  # score all outputs of length n in one teacher-forced batch
            ys = torch.tensor([y for y in outputs if len(y) == n])  # (N, n)
            tgt_in = torch.cat([torch.full((len(ys), 1), model.cfg.bos_id), ys[:, :-1]], dim=1)  # (N, n)
            logits, _ = model(src[b:b + 1].expand(len(ys), -1), tgt_in)  # (N, n, V)
            logp = F.log_softmax(logits.double(), -1).gather(-1, ys[..., None]).squeeze(-1).sum(-1)  # (N,)
            score, i = (logp / length_penalty(n, alpha)).max(0)
            if score.item() > best[0]:
                best = (score.item(), [t for t in ys[i].tolist() if t != EOS])
        assert scores[b].item() == pytest.approx(best[0], abs=1e-5)
        assert tokens[b] == best[1]


def test_errors():
    model, prompt = causal_lm()
    with pytest.raises(ValueError, match="eos_id"):
        beam_search(model, prompt, beam_size=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, prompt, beam_size=0, max_new_tokens=3, eos_id=EOS)


def test_cross_attention_keys_and_values_are_computed_once_per_source(monkeypatch):
    model, src = seq2seq(seed=2)
    calls = []
    original = CrossAttention.memory_kv

    def counting(self, memory):
        calls.append(memory.shape[0])
        return original(self, memory)

    monkeypatch.setattr(CrossAttention, "memory_kv", counting)
    beam_search(model, src, beam_size=3, max_new_tokens=8, eos_id=EOS)
    # once per decoder layer, on the B sources (not on the B·K beams, not at every step)
    assert calls == [src.shape[0]] * model.cfg.n_dec_layer


# --- which candidates finish (the rule Hugging Face's generate follows), and HF's length penalty ---------

class TableLM(torch.nn.Module):
    """A causal LM whose next-token probabilities are looked up by the tokens generated after the
    one-token prompt: a hand-made search problem. Tokens a row leaves out share what is left; a
    prefix not in the table ends (EOS, p = 0.99)."""

    def __init__(self, table: dict, V: int = 5):
        super().__init__()
        self.table, self.V = table, V

    def forward(self, x, cache=None):  # x: (N, T), the whole prefix (use_cache=False)
        rows = []
        for generated in x[:, 1:].tolist():
            p = self.table.get(tuple(generated), {EOS: 0.99})
            rest = (1 - sum(p.values())) / (self.V - len(p))
            rows.append([math.log(p.get(v, rest)) for v in range(self.V)])
        return torch.tensor(rows)[:, None, :].expand(-1, x.shape[1], -1), None  # (N, T, V); the last is read


@pytest.mark.parametrize("style", ["gnmt", "hf"])
def test_an_eos_ranked_k_or_lower_does_not_finish_a_hypothesis(style):
    """K = 2. Step 2 ranks [3 3] (live), [4 EOS] (finished), then [3 EOS] third. The old rule finished
    [3 EOS] too: two hypotheses, so early_stopping=True stopped and returned [4] (log P -1.021), though
    [3 3 EOS] (-0.991) comes next step. An EOS ranked K or lower lost to K better extensions: dropped."""
    model = TableLM({(): {3: 0.5, 4: 0.4, EOS: 0.05}, (3,): {3: 0.75, EOS: 0.2}, (4,): {EOS: 0.9},
                     (3, 3): {EOS: 0.99}})
    tokens, scores = beam_search(model, torch.tensor([[0]]), beam_size=2, max_new_tokens=5, eos_id=EOS, alpha=0.0,
                                 early_stopping=True, use_cache=False, length_penalty_style=style)
    assert tokens == [[3, 3]]
    assert scores[0].item() == pytest.approx(math.log(0.5 * 0.75 * 0.99))


def test_outputs_cut_off_at_the_maximum_length_compete_even_when_the_beam_fills():
    """K = 2, at most 2 tokens. [EOS] finishes at step 1; at step 2, the last, [4 EOS] is the second
    hypothesis, which fills the beam (early_stopping=True), and [3 3], cut off, ranks first. It must
    still count: with HF's |Y|^1 it scores log(0.45·0.99)/2 = -0.404 and beats [EOS]'s log 0.5 = -0.693."""
    model = TableLM({(): {EOS: 0.5, 3: 0.45, 4: 0.03}, (3,): {3: 0.99}, (4,): {EOS: 0.99}})
    tokens, scores = beam_search(model, torch.tensor([[0]]), beam_size=2, max_new_tokens=2, eos_id=EOS, alpha=1.0,
                                 early_stopping=True, use_cache=False, length_penalty_style="hf")
    assert tokens == [[3, 3]]
    assert scores[0].item() == pytest.approx(math.log(0.45 * 0.99) / 2)


def test_length_penalty_styles():
    assert length_penalty(7, 0.6, "hf") == pytest.approx(7 ** 0.6)  # |Y|^α, Hugging Face's
    assert length_penalty(7, 0.6, "gnmt") == length_penalty(7, 0.6) == pytest.approx(2.0 ** 0.6)
    assert length_penalty(7, 0.0, "hf") == length_penalty(7, 0.0, "gnmt") == 1.0
    model, prompt = causal_lm()
    for call in (lambda: length_penalty(3, 1.0, "fairseq"),
                 lambda: beam_search(model, prompt, 2, 3, eos_id=EOS, length_penalty_style="HF"),
                 lambda: greedy_search(model, prompt, 3, eos_id=EOS, length_penalty_style="")):
        with pytest.raises(ValueError, match="length_penalty_style must be 'gnmt' .* or 'hf'"):
            call()


def small_translation_checkpoint(folder):
    """A random Seq2Seq with a char tokenizer, saved as `minillm train --objective=seq2seq` would."""
    tok = CharTokenizer.from_text(string.ascii_letters + string.digits + " -,", special_tokens=SPECIALS)
    pad, bos, eos = (tok.special_tokens[s] for s in SPECIALS)
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(ModelConfig(vocab_size=tok.vocab_size, n_embd=16, n_head=2, block_size=32, init_std=0.3),
                        n_enc_layer=1, n_dec_layer=1, pad_id=pad, bos_id=bos, eos_id=eos)
    save_model(folder, Seq2Seq(cfg).eval(), tok, data="dates", step=0)
    return str(folder)


def test_cli_threads_the_length_penalty_style_through(tmp_path, monkeypatch, capsys):
    out = small_translation_checkpoint(tmp_path / "ckpt")
    seen = []
    real = beam_module.translate

    def spy(*args, **kw):
        seen.append(kw["length_penalty_style"])
        return real(*args, **kw)

    monkeypatch.setattr(beam_module, "translate", spy)  # eval imports it from here when it runs
    monkeypatch.setattr(translate_cli, "translate", spy)
    assert main(["translate", out, "3 March 2021", "--beam=3", "--length_penalty=1",
                 "--length_penalty_style=hf", "--max_new_tokens=6"]) == 0
    assert main(["eval", out, "--metric=bleu", "--beam=2", "--length_penalty_style=hf", "--max_sentences=2"]) == 0
    assert "beam 2, length penalty 0.6 (hf)" in capsys.readouterr().out
    assert main(["translate", out, "3 March 2021", "--beam=2"]) == 0
    assert seen == ["hf", "hf", "gnmt"]
    for argv in (["translate", out, "x", "--length_penalty_style=fairseq"],
                 ["eval", out, "--metric=bleu", "--beam=2", "--length_penalty_style=HF"],
                 ["translate", str(tmp_path / "missing"), "x", "--length_penalty_style=gnmt2"]):  # before any file
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--length_penalty_style must be gnmt" in err, err
