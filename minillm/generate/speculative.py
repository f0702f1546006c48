"""Speculative decoding: guess k tokens cheaply, let the target model check them all in one forward.

A decode step of a large model costs about as much for k+1 tokens as for one: on a GPU it is bound
by reading the weights, on a CPU (for small models) by per-call overhead. So if something cheap
guesses the next k tokens, one `extend` of the target scores all of them at once, and every guess
it agrees with is a token that cost no step of its own (Leviathan et al., 2023, "Fast Inference
from Transformers via Speculative Decoding"; Chen et al., 2023, "speculative sampling"; the loop
follows gpt-fast's `speculative_decode`). Two guessers:

    a draft model   any smaller causal LM with the target's tokenizer: it samples k tokens itself
                    (its own cache, the same prefill/decode_step/extend of core.py)
    prompt lookup   no second model (Saxena, 2023, "prompt lookup decoding"): find the context's last
                    n-gram (n = 3, 2, 1) earlier in the context and propose the k tokens that
                    followed it there. Summaries, quotes and code edits copy long spans of their input.

The verdict (`accept`). The target's distributions p_0..p_k come from one extend over
[last token, d_1..d_k]; guess d_i was drawn from the draft's q_i. Keep d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection, draw from the residual max(0, p_i - q_i)
normalised, and stop; if all k stand, draw a bonus token from p_k. Each emitted token then follows
p exactly: P(x) = q(x)·min(1, p(x)/q(x)) + (1 - Σ_y min(p(y), q(y)))·(p(x) - q(x))⁺ / Σ_y (p(y) - q(y))⁺
= min(p(x), q(x)) + (p(x) - q(x))⁺ = p(x), since Σ (p - q)⁺ = 1 - Σ min(p, q). Prompt lookup is a
draft whose q is a point mass on d_i: keep it with probability p_i(d_i), else draw from p_i with
d_i removed. Both distributions are filtered alike (`sampling.probs`: temperature, top-k, top-p).
Greedy (temperature 0) keeps a guess while it equals the target's argmax: the same tokens as
plain greedy decoding, however good or bad the guesses (tests/test_speculative.py).

Rejected guesses are forgotten with `cache.rewind` (a sliding-window cache keeps `spare` = k extra
keys for that). Rewind is one length for all rows, so this runs one sequence: batch size 1, as in
gpt-fast. Near block_size it stops guessing and hands the rest to `generate_tokens`, whose
fall-back past block_size it must match token for token.

    >>> for t in speculative_generate(model, idx, 100, draft="lookup", temperature=0, stats=stats):
    ...     print(tokenizer.decode(t.tolist()), end="")
    >>> stats["accepted"] / stats["drafted"]                       # acceptance rate
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from minillm.generate.core import decode_step, extend, prefill
from minillm.generate.flat import FlatDecoder
from minillm.generate.sampling import generate_tokens, probs, sample_next
from minillm.generate.text import StopText

__all__ = ["DraftModel", "PromptLookup", "accept", "speculative_generate", "speculative_text"]


def _draw(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id (0-d) from weights p (V,) (not necessarily normalised), on the generator's device."""
    device = generator.device if generator is not None else p.device
    return torch.multinomial(p.to(device), 1, generator=generator)[0].to(p.device)


class PromptLookup:
    """Guess by copying: the tokens that followed an earlier occurrence of the context's final n-gram."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, seq: torch.Tensor, k: int, *sampling) -> tuple[torch.Tensor, None]:
        """seq (n,) the context -> up to k guessed tokens (g,), and q = None (a point mass on each)."""
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            windows = seq[:-1].unfold(0, n, 1)  # (len - n, n): every n-gram that has a successor
            hits = (windows == seq[-n:]).all(dim=1).nonzero().flatten()
            if len(hits):
                # the most recent occurrence that k tokens follow (what a copy is most likely copying),
                # else the earliest (the longest continuation: in a run "a a a a" the latest has one)
                full = hits[hits + n + k <= len(seq)]
                start = int(full[-1] if len(full) else hits[0]) + n
                return seq[start:start + k], None
        return seq[:0], None  # no match: no guess, a plain decode step this round

    def keep(self, n: int) -> None:
        """The first n tokens of the context are final (nothing to forget: lookup keeps no state)."""


class DraftModel:
    """Guess by sampling from a smaller causal LM that shares the target's tokenizer.

    Its cache holds seq[start : start + cache.length]; each round first feeds what it has not seen
    (the target's last verdict), then samples k tokens with k - 1 decode steps. When its own
    block_size is full it starts again from the last half of the context: a draft only changes how
    many guesses are accepted, never which tokens come out."""

    def __init__(self, model, k: int, flat_decode: bool = False):
        self.model, self.block_size = model, model.cfg.block_size
        self.cache = model.new_cache(1, spare=k)  # rewinds go back up to k - 1
        self.flat = FlatDecoder.build(model) if flat_decode else None
        self.start = 0

    def propose(self, seq, k, temperature, top_k, top_p, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """seq (n,) -> k guesses (k,) and the draft distributions they were drawn from, q (k, V)."""
        if k == 0:
            return seq[:0], None
        if len(seq) - self.start + k - 1 > self.block_size:  # the draft's context is full:
            self.start = len(seq) - self.block_size // 2  # start again from the last half of it
            self.cache.rewind(0)
        logits = extend(self.model, seq[None, self.start + self.cache.length:], self.cache)[:, -1]  # (1, V)
        guess, q = [], []
        for i in range(k):
            q.append(probs(logits, temperature, top_k, top_p))  # (1, V)
            guess.append(q[-1][0].argmax() if temperature == 0 else _draw(q[-1][0], generator))
            if i < k - 1:
                logits = decode_step(self.model, guess[-1].view(1, 1), self.cache, self.flat)  # (1, V)
        return torch.stack(guess), torch.cat(q)  # (k,), (k, V)

    def keep(self, n: int) -> None:
        """The first n tokens of the context are final: forget the guesses after them."""
        self.cache.rewind(min(self.cache.length, n - self.start))


def accept(logits: torch.Tensor, guess: torch.Tensor, q: torch.Tensor | None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
    """The target's verdict on g guesses: logits (g + 1, V) from extend over [last, guess (g,)].

    q (g, V): the draft's distributions, or None for point masses (prompt lookup). Returns
    (a, token): the first a guesses stand, and `token` (0-d) comes after them (see the docstring)."""
    g = len(guess)
    if temperature == 0:  # greedy: a guess stands while it is the target's own argmax
        best = sample_next(logits, 0.0)  # (g + 1,)
        a = int((best[:g] == guess).long().cumprod(0).sum())  # leading matches
        return a, best[a]
    p = probs(logits, temperature, top_k, top_p)  # (g + 1, V): the target's distributions
    rows = torch.arange(g, device=p.device)
    q_guess = torch.ones(g, device=p.device) if q is None else q[rows, guess]  # q_i(d_i); > 0, d_i came from q_i
    u = torch.rand(g, generator=generator,
                   device=p.device if generator is None else generator.device).to(p.device)
    a = int((u * q_guess < p[rows, guess]).long().cumprod(0).sum())  # keep d_i w.p. min(1, p/q)
    if a == g:
        return g, _draw(p[g], generator)  # every guess stood: a bonus token from the target
    q_a = F.one_hot(guess[a], p.shape[-1]).float() if q is None else q[a]
    residual = (p[a] - q_a).clamp_min(0)  # (V,) multinomial normalises it
    return a, _draw(residual if residual.sum() > 0 else p[a], generator)  # (p = q: rounding only)


def _check(target, idx: torch.Tensor, draft, k: int):
    """A guesser for `draft` ("lookup" or a model), after refusing what cannot work, in one line each."""
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise ValueError(f"speculative decoding runs one sequence: idx must be (1, T) with T >= 1, got "
                         f"{tuple(idx.shape)} (run the rows one at a time)")
    if not getattr(target.cfg, "causal", False):
        raise ValueError("speculative decoding needs a causal LM")
    sizes = [target.cfg.block_size] + ([] if isinstance(draft, str) else [draft.cfg.block_size])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(sizes) // 2:
        raise ValueError(f"k (tokens guessed per round) must be an int in 1..{min(sizes) // 2}, got {k!r}")
    if isinstance(draft, str):
        if draft != "lookup":
            raise ValueError(f"draft must be a causal LM or 'lookup', got {draft!r}")
        return PromptLookup()
    if not getattr(draft.cfg, "causal", False) or draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"the draft must be a causal LM with the target's tokenizer: vocab_size "
                         f"{draft.cfg.vocab_size} vs the target's {target.cfg.vocab_size}")
    return None  # a DraftModel, built once the model is in eval mode


@torch.inference_mode()
def speculative_generate(target, idx: torch.Tensor, max_new_tokens: int, draft="lookup", k: int = 4,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None, stats: dict | None = None,
                         window_stride: int | None = None, flat_decode: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token, (1,), `max_new_tokens` times: generate_tokens' output distribution (its
    very tokens when greedy), fewer target forwards.

    draft: a smaller causal LM with the same tokenizer, or "lookup" (prompt lookup). k: tokens
    guessed per round. stats (a dict) accumulates rounds, drafted (guesses), accepted, tokens (made
    by the rounds) and plain (tokens made by plain decoding once the context was full).
    window_stride, flat_decode: as in generate_tokens."""
    guesser = _check(target, idx, draft, k)
    stats = {} if stats is None else stats
    for key in ("rounds", "drafted", "accepted", "tokens", "plain"):
        stats[key] = stats.get(key, 0)  # counts add up over calls (several prompts)
    training = [m for m in (target, draft) if not isinstance(m, str) and m.training]
    for m in training:
        m.eval()  # no dropout while decoding
    try:
        guesser = guesser or DraftModel(draft, k, flat_decode)
        block_size = target.cfg.block_size
        seq = idx[0, -block_size:]  # (n,) the context: the prompt, cropped as generate_tokens crops it
        cache, flat = target.new_cache(1, spare=k), FlatDecoder.build(target) if flat_decode else None
        if 1 < len(seq) < block_size:
            prefill(target, seq[None, :-1], cache)  # the last token goes in with the first guesses
        made = 0
        while made < max_new_tokens:
            room = block_size - len(seq) - 1  # guesses that fit: a round ends with <= block_size tokens
            if room < 0:  # full: the rest as generate_tokens makes it past block_size (its fall-back)
                stats["plain"] += max_new_tokens - made
                yield from generate_tokens(target, seq[None], max_new_tokens - made, temperature, top_k, top_p,
                                           generator=generator, window_stride=window_stride,
                                           flat_decode=flat_decode)
                return
            guess, q = guesser.propose(seq, min(k, room, max_new_tokens - made - 1),
                                       temperature, top_k, top_p, generator)
            n, tokens = cache.length, torch.cat([seq[-1:], guess])[None]  # (1, 1 + g)
            # one target forward scores every guess (a plain step when there is none)
            logits = extend(target, tokens, cache)[0] if len(guess) else decode_step(target, tokens, cache, flat)
            a, nxt = accept(logits, guess, q, temperature, top_k, top_p, generator)  # logits (1 + g, V)
            cache.rewind(n + 1 + a)  # keep the last token and the guesses that stood
            guesser.keep(len(seq) + a)
            new = torch.cat([guess[:a], nxt[None]])  # (a + 1,)
            seq, made = torch.cat([seq, new]), made + len(new)
            for key, add in (("rounds", 1), ("drafted", len(guess)), ("accepted", a), ("tokens", len(new))):
                stats[key] += add
            yield from new[:, None]  # each (1,)
    finally:
        for m in training:
            m.train()


def speculative_text(target, tokenizer, prompts: list[str] | str, max_new_tokens: int,
                     stop: list[str] | str | None = None, stream: Callable[[int, str], None] | None = None,
                     token_counts: list[int] | None = None, **kw) -> list[str]:
    """generate_text's contract (sampling.py), each prompt on its own through speculative_generate
    (**kw: draft, k, temperature, top_k, top_p, generator, stats, window_stride, flat_decode)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    rows = [StopText(tokenizer, stop, context=p) for p in prompts]  # checks the stop strings before any work
    device = next(target.parameters()).device
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("every prompt must have at least one token (pass e.g. a newline)")
        for nxt in speculative_generate(target, torch.tensor([ids], device=device), max_new_tokens, **kw):
            row.add(int(nxt))
            if stream is not None and (piece := row.take()):
                stream(i, piece)
            if row.stopped:
                break
        if stream is not None and (piece := row.take(final=True)):
            stream(i, piece)  # what was held back, now that nothing can follow it
    if token_counts is not None:
        token_counts[:] = [len(r.ids) for r in rows]
    return [r.text for r in rows]
