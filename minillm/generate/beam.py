"""Greedy and beam-search decoding for the encoder–decoder (`Seq2Seq`) and the causal LM (`CausalLM`).

Greedy decoding takes the most likely token at every step. Beam search (as in Sutskever et al. 2014,
"Attention Is All You Need" §6.1: beam 4, α = 0.6) keeps the K best partial outputs ("beams") by
total log-probability log P(Y) = Σ_t log p(y_t | y_<t, X), extends each by every token, and ranks
the K·V candidates. Of the top 2K, a candidate ending in EOS becomes a finished hypothesis only if it
ranks within the top K (an EOS ranked lower is dropped: it lost to K better extensions, as in Hugging
Face's `generate`); the K best candidates that do not end in EOS are the next beams. Finished
hypotheses are ranked by a length-normalised score

    score(Y) = log P(Y) / lp(Y)

with one of two length penalties, chosen by `length_penalty_style`:

    "gnmt" (default)  lp(Y) = ((5 + |Y|) / 6)^α    GNMT, Wu et al. 2016, eq. 14; the paper's α = 0.6
    "hf"              lp(Y) = |Y|^α                Hugging Face `generate(length_penalty=α)`

|Y| counts the generated tokens, EOS included (for Seq2Seq not the start token, for a CausalLM not
the prompt) — Hugging Face counts the same way. The two α are NOT interchangeable: lp(7) is 2^0.6 ≈
1.52 for GNMT at α = 0.6 but 7^0.6 ≈ 3.21 for HF, so α = 0.6 in one style is a much weaker push
towards long outputs than in the other. α = 0 gives the plain log-probability in both styles (which
favours short outputs, since every token adds a negative term). To reproduce Hugging Face's outputs
and `sequences_scores`, use length_penalty_style="hf" with HF's α (tests/test_beam_hf.py checks
this against a random-init BART for beams 1–5 and α ∈ {0, 0.6, 1, 2}).

Stopping, per example:
    early_stopping=True  — as soon as K hypotheses have finished (the classic rule; with K = 1 this is
                           exactly greedy decoding, which the tests check). Same as HF's True.
    early_stopping=False — only when no live beam can still beat the worst of the K finished ones.
                           That bound is exact: log P only falls as tokens are added (each log p ≤ 0)
                           and lp only grows, so a live beam's best reachable score is
                           log P / lp(max_new_tokens). This is HF's early_stopping="never"; HF's
                           False uses lp(current length) instead, a heuristic that for α > 0 can
                           stop before a longer beam would have won (for α = 0 the two agree).
    early_stopping="never" — run every example to max_new_tokens (the slow reference that
                           early_stopping=False must agree with, since its bound is exact).
At `max_new_tokens` the top K candidates of the last step finish as they stand, EOS or not.

Stepping. The search only needs log p(next token) for every beam; it gets them from the decode core
(minillm/generate/core.py), like every other loop that produces tokens. Uncached (`use_cache=False`,
the reference) each step runs the whole prefix through `prefill` with no cache; cached, the first
step prefills the model's KV cache and each later one runs only the newest token (`decode_step`);
tests hold the two equal. A Seq2Seq runs as its decoder bound to the sources (`core.WithSource`):
the cross-attention K/V are computed once per source and repeated K times. When beams are
reordered (a beam's survivors are copies of other beams), the cache's rows follow with
`cache.reorder(index)`; the sources need not, since a reorder only permutes beams *within* an
example and every beam of an example reads the same source.

    >>> tokens, scores = beam_search(model, src, beam_size=4, max_new_tokens=50, alpha=0.6)
    >>> tokens, scores = beam_search(model, src, beam_size=4, alpha=1.0, length_penalty_style="hf")
    >>> tokens, scores = greedy_search(model, src, max_new_tokens=50)
    >>> translate(model, tokenizer, ["ein Hund läuft"], beam_size=4)   # text in, text out
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.generate.core import WithSource, decode_step, prefill
from minillm.model.seq2seq import Seq2Seq

LENGTH_PENALTY_STYLES = ("gnmt", "hf")


def length_penalty(length: int, alpha: float, style: str = "gnmt") -> float:
    """lp(Y) for |Y| = `length` generated tokens: GNMT's ((5 + |Y|) / 6)^α, or Hugging Face's |Y|^α."""
    check_length_penalty_style(style)
    return ((5.0 + length) / 6.0) ** alpha if style == "gnmt" else float(length) ** alpha


def check_length_penalty_style(style: str) -> None:
    if style not in LENGTH_PENALTY_STYLES:
        raise ValueError(f"length_penalty_style must be 'gnmt' (((5+|Y|)/6)^alpha) or 'hf' (|Y|^alpha, as "
                         f"Hugging Face), got {style!r}")


class _Stepper:
    """Next-token log-probabilities for N = B·K rows of prefixes, through the decode core (core.py).

    Seq2Seq: the prefix is [BOS, y1, ...], and the model the core runs is its decoder bound to the
    sources (`WithSource`); CausalLM: [prompt..., y1, ...] (prompts of equal length). Uncached, every
    step runs the whole prefix (`prefill` with no cache); cached, the first step prefills the cache
    and each later one feeds only the newest token (`decode_step`)."""

    def __init__(self, model, inputs: torch.Tensor, n_rep: int, max_new_tokens: int, use_cache: bool,
                 src_mask: torch.Tensor | None = None):
        B = inputs.shape[0]
        rows = torch.arange(B, device=inputs.device).repeat_interleave(n_rep)  # (B·K,) row b -> b·K .. b·K+K-1
        if isinstance(model, Seq2Seq):
            self.model = WithSource(model, inputs, src_mask)  # the source is encoded once, B rows ...
            self.model.reorder(rows)  # ... and each example's K beams read copies of its cross-attention k, v
            self.prefix = torch.full((B * n_rep, 1), model.cfg.bos_id, dtype=torch.long, device=inputs.device)
        else:
            self.model, self.prefix = model, inputs[rows]  # (B·K, T0)
        max_len = self.prefix.shape[1] + max_new_tokens
        self.cache = model.new_cache(B * n_rep, max_len) if use_cache else None

    def logprobs(self) -> torch.Tensor:
        """log p(next token | prefix) for every row: (N, V)."""
        if self.cache is None or self.cache.length == 0:  # no cache, or the first step: the whole prefix
            logits = prefill(self.model, self.prefix, self.cache)  # (N, V)
        else:  # the cache holds all but the newest token
            logits = decode_step(self.model, self.prefix[:, -1:], self.cache)  # (N, V)
        return F.log_softmax(logits.float(), dim=-1)  # (N, V)

    def advance(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Row i of the next step continues old row rows[i] (None: row i) with tokens[i].

        The cache's rows follow the same index. The sources need not: beams are only reordered
        within an example, and every beam of an example reads the same source."""
        prefix = self.prefix if rows is None else self.prefix[rows]
        self.prefix = torch.cat([prefix, tokens[:, None]], dim=1)  # (N, t+1)
        if rows is not None and self.cache is not None:
            self.cache.reorder(rows)


@torch.no_grad()
def greedy_search(model, inputs: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                  alpha: float = 0.0, use_cache: bool = True, src_mask: torch.Tensor | None = None,
                  length_penalty_style: str = "gnmt"):
    """Argmax decoding. Returns (tokens: list of B lists of new ids, EOS left out; scores (B,) =
    log P(Y) / lp(|Y|, α)). For Seq2Seq `inputs` is the source (B, S); for CausalLM the prompt (B, T0)."""
    check_length_penalty_style(length_penalty_style)
    eos_id = _eos(model, eos_id)
    st = _Stepper(model, inputs, 1, max_new_tokens, use_cache, src_mask)
    B = inputs.shape[0]
    logp_sum = torch.zeros(B, dtype=torch.float64)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    lengths = [0] * B
    for _ in range(max_new_tokens):
        logp = st.logprobs()  # (B, V)
        best, tok = logp.max(dim=-1)  # (B,), (B,)
        for b in range(B):
            if done[b]:
                continue
            logp_sum[b] += best[b].item()
            lengths[b] += 1
            if tok[b].item() == eos_id:
                done[b] = True
            else:
                out[b].append(tok[b].item())
        if all(done):
            break
        st.advance(tok)  # finished rows keep going, ignored
    scores = torch.tensor([logp_sum[b].item() / length_penalty(lengths[b], alpha, length_penalty_style)
                           for b in range(B)])
    return out, scores


@torch.no_grad()
def beam_search(model, inputs: torch.Tensor, beam_size: int = 4, max_new_tokens: int = 50,
                eos_id: int | None = None, alpha: float = 0.6, early_stopping: bool | str = True,
                use_cache: bool = True, src_mask: torch.Tensor | None = None, length_penalty_style: str = "gnmt"):
    """Beam search (see the module docstring). Returns (tokens: B lists of new ids without EOS,
    scores (B,) = the best hypothesis' log P(Y) / lp(|Y|, α), lp as `length_penalty_style` says)."""
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if alpha < 0:  # lp would shrink with length, and the early_stopping=False bound would not hold
        raise ValueError(f"alpha must be >= 0 (GNMT uses 0.6-1.0; Hugging Face's default is 1.0), got {alpha}")
    check_length_penalty_style(length_penalty_style)
    eos_id = _eos(model, eos_id)
    K, B = beam_size, inputs.shape[0]

    def lp(n: int) -> float:
        return length_penalty(n, alpha, length_penalty_style)

    st = _Stepper(model, inputs, K, max_new_tokens, use_cache, src_mask)
    # log P of each live beam. Only beam 0 starts alive: the K copies are identical, and letting all
    # of them expand would fill the beam with K copies of the same candidate.
    beam_logp = torch.full((B, K), float("-inf"), dtype=torch.float64)
    beam_logp[:, 0] = 0.0
    beam_tokens: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (score, tokens), best first
    done = [False] * B
    for t in range(1, max_new_tokens + 1):  # t = |Y| of the candidates made in this step
        logp = st.logprobs().double().view(B, K, -1)  # (B, K, V)
        V = logp.shape[-1]
        cand = (beam_logp[..., None] + logp.cpu()).view(B, K * V)  # (B, K·V) log P of every extension
        # 2K candidates are enough: at most K of them end in EOS, so K live ones always remain
        top_logp, top_idx = cand.topk(min(2 * K, K * V), dim=-1)  # (B, 2K), best first
        rows, toks = [], []
        for b in range(B):
            new_beams: list[tuple[float, int, int]] = []  # (log P, old beam, token)
            for rank, (lp_, idx) in enumerate(zip(top_logp[b].tolist(), top_idx[b].tolist())):
                k, tok = divmod(idx, V)
                if lp_ == float("-inf") or done[b]:
                    break
                if rank < K and (tok == eos_id or t == max_new_tokens):
                    # a top-K candidate that ends, or is cut off at the maximum length, is finished.
                    # An EOS ranked K or lower is dropped, not finished: K live beams beat it, and
                    # with early_stopping=True it could fill the K slots before a better hypothesis.
                    _add(finished[b], lp_ / lp(t), beam_tokens[b][k] + ([] if tok == eos_id else [tok]), K)
                elif tok != eos_id:
                    new_beams.append((lp_, k, tok))
                if len(new_beams) == K:
                    break
            done[b] = done[b] or _is_done(finished[b], new_beams, K, t, max_new_tokens, lp, early_stopping)
            if done[b] or not new_beams:  # keep the rows shaped (B, K): dead rows copy beam 0
                done[b] = True
                new_beams = [(float("-inf"), 0, eos_id)] * K
            # fewer than K live candidates (a tiny vocabulary at the first step): fill with dead copies
            new_beams += [(float("-inf"), new_beams[0][1], new_beams[0][2])] * (K - len(new_beams))
            beam_tokens[b] = [beam_tokens[b][k] + [tok] for _, k, tok in new_beams]
            beam_logp[b] = torch.tensor([lp_ for lp_, _, _ in new_beams], dtype=torch.float64)
            rows += [b * K + k for _, k, _ in new_beams]
            toks += [tok for _, _, tok in new_beams]
        if all(done) or t == max_new_tokens:
            break
        st.advance(torch.tensor(toks, device=inputs.device), torch.tensor(rows, device=inputs.device))
    tokens = [finished[b][0][1] for b in range(B)]
    scores = torch.tensor([finished[b][0][0] for b in range(B)])
    return tokens, scores


def _add(hyps: list, score: float, tokens: list[int], K: int) -> None:
    """Insert a finished hypothesis, keeping the K best, best first (ties: the earlier one wins)."""
    hyps.append((score, list(tokens)))
    hyps.sort(key=lambda h: -h[0])  # stable: equal scores keep their order
    del hyps[K:]


def _is_done(hyps, live, K, t, max_new_tokens, lp, early_stopping) -> bool:
    if not live:  # every candidate ended: nothing left to extend
        return True
    if len(hyps) < K or early_stopping == "never":
        return False
    if early_stopping:
        return True
    # the best any live beam can still reach: log P can only fall, lp can only grow (to lp(max))
    best_live = max(lp_ for lp_, _, _ in live)
    reachable = best_live / lp(max_new_tokens if best_live < 0 else t)
    return reachable <= hyps[-1][0]


def _eos(model, eos_id):
    if eos_id is None:
        if not isinstance(model, Seq2Seq):
            raise ValueError("a CausalLM has no eos id of its own: pass eos_id=")
        eos_id = model.cfg.eos_id
    return eos_id


@torch.no_grad()
def translate(model: Seq2Seq, tokenizer, sentences: list[str], beam_size: int = 1, alpha: float = 0.6,
              max_new_tokens: int | None = None, batch_size: int = 32,
              length_penalty_style: str = "gnmt") -> list[str]:
    """Sentences in, translations out: encode with the shared tokenizer (cut to block_size), decode
    greedily (beam_size=1) or by beam search with length penalty α (GNMT's, or Hugging Face's with
    length_penalty_style="hf"), and turn ids back into text. Sentences are batched by source length,
    so little of each batch is padding."""
    if beam_size < 1:
        raise ValueError(f"beam size must be >= 1, got {beam_size}")
    check_length_penalty_style(length_penalty_style)
    cfg, T = model.cfg, model.cfg.model.block_size
    max_new = min(max_new_tokens or T - 1, T - 1)  # the decoder holds BOS + at most T-1 tokens
    device = next(model.parameters()).device
    specials = set(tokenizer.special_tokens.values())
    ids = [tokenizer.encode(s, allowed_special=())[:T] for s in sentences]
    for s, x in zip(sentences, ids):
        if not x:
            raise ValueError(f"cannot translate an empty sentence ({s!r})")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src = torch.full((len(chunk), max(len(ids[i]) for i in chunk)), cfg.pad_id, dtype=torch.long)  # (B, S)
        for row, i in enumerate(chunk):
            src[row, :len(ids[i])] = torch.tensor(ids[i])
        src = src.to(device)
        if beam_size == 1:
            tokens, _ = greedy_search(model, src, max_new)
        else:
            tokens, _ = beam_search(model, src, beam_size, max_new, alpha=alpha,
                                    length_penalty_style=length_penalty_style)
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode([t for t in tokens[row] if t not in specials])
    return out
