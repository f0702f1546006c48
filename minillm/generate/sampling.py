"""Sampling text from a causal LM: greedy / temperature / top-k / top-p, batches, streaming, past block_size.

Picking a token from logits z (one row of the vocabulary):
    greedy        argmax z                                    (temperature = 0)
    temperature   p = softmax(z / τ): τ < 1 sharpens, τ > 1 flattens
    top-k         keep the k largest logits, -inf the rest      (Fan et al., 2018)
    top-p         keep the smallest set of tokens whose probability adds up to ≥ p   ("nucleus",
                  Holtzman et al., 2019); the most likely token is always kept

`generate_tokens` is the single-prompt (or batch) loop: it samples from the logits of the decode
core (minillm/generate/core.py: `prefill`, then one `decode_step` per token). Several prompts of
different lengths run as one batch by LEFT padding: every row's last prompt token sits in the same
(last) column, so one step extends every row; the cache hides the pads and numbers each row from
its first real token, so a padded row computes exactly what it would alone.

Past block_size the context falls back by `window_stride` tokens and is re-prefilled (K = block_size
// 4 by default; 1 is nanoGPT's sliding window, token for token): see `_fall_back` for why and what
it costs. Cached and uncached decoding condition on the same contexts, so they pick the same tokens.

    >>> out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)
    >>> texts = generate_text(model, tokenizer, ["ROMEO:", "JULIET:"], 100, stream=print_piece)
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from minillm.generate.core import decode_step, positions_from_mask, prefill
from minillm.generate.flat import FlatDecoder
from minillm.generate.text import StopText

__all__ = ["generate", "generate_text", "generate_tokens", "left_pad", "positions_from_mask", "probs",
           "sample_next", "top_k_filter", "top_p_filter"]

# --- choosing the next token ------------------------------------------------------------------

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept), -inf the rest."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    if k >= logits.shape[-1]:
        return logits  # every token is among the k largest: nothing to filter
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches p."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # mass of the tokens strictly before each one; a token is dropped once that mass already ≥ p,
    # so the first (most likely) token is always kept and the kept set is the smallest reaching p
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
          top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> the distribution `sample_next` draws from, (..., V) float32.

    temperature 0 (greedy) is a point mass on the argmax. Speculative decoding compares two such
    distributions (minillm/generate/speculative.py), so both must be filtered exactly like this.

    Written so that no temperature > 0 can turn a row into NaN: softmax(z / τ) is computed as
    softmax((z - max z) / τ). The shift changes nothing mathematically (softmax is invariant to
    adding a constant), but it makes the best logit exactly 0, and 0 / τ = 0 for every τ > 0, so the
    most likely token always keeps a finite weight while the others go to -inf at worst. A τ so
    small or so large that float32 cannot divide by it safely (1e-300 is 0 in float32, and 0 / 0 is
    NaN; 1e300 is inf, and -inf / inf is NaN) is divided in float64. A row with no usable logit
    (NaN, +inf, or all -inf) has no distribution to sample from: ValueError, naming the rows.
    """
    logits, row_max = _checked(logits, temperature)
    if temperature == 0:  # greedy: top-k / top-p cannot change the argmax
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits - row_max  # (..., V), max 0 per row, the rest <= 0
    if temperature != 1.0:  # <= 0 or -inf after the division: never NaN, never +inf
        safe = 1e-30 < temperature < 1e30  # float32 holds τ and 1/τ with room to spare
        logits = logits / temperature if safe else (logits.double() / temperature).float()
    if top_k is not None:
        logits = top_k_filter(logits, top_k)  # keeps the 0 (the max), so a finite logit survives
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)  # always keeps the most likely token
    return torch.softmax(logits, dim=-1)  # (..., V): the max term is exp(0) = 1, so the sum is >= 1


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> next token ids (B,), drawn from `probs(logits, ...)`
    (which says why no temperature > 0 gives NaN and which rows raise ValueError)."""
    if temperature == 0:  # greedy: the argmax, without building the one-hot distribution
        return _checked(logits, temperature)[0].argmax(dim=-1)
    p = probs(logits, temperature, top_k, top_p)  # (B, V)
    # sample on the generator's device (a CPU generator cannot drive CUDA sampling)
    gen_device = generator.device if generator is not None else p.device
    if gen_device == p.device:
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)
    return torch.multinomial(p.to(gen_device), 1, generator=generator).squeeze(-1).to(logits.device)


def _checked(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse a bad temperature or an unusable row; logits as float32 and each row's max (..., 1)."""
    if not (0.0 <= temperature < float("inf")):  # also refuses NaN, which fails every comparison
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    logits = logits.float()
    row_max = logits.amax(dim=-1, keepdim=True)  # (..., 1)
    _check_rows(row_max)
    return logits, row_max


def _check_rows(row_max: torch.Tensor) -> None:
    """Raise ValueError if a row of logits cannot define a distribution, judged by its max (B, 1).

    NaN and +inf have no place among logits (they come from an overflowing model, and make
    z - max z NaN); a row that is all -inf gives every token probability 0. The max tells all
    three: it is NaN if any logit is (amax propagates NaN), +inf if any is, and -inf only if all
    are. So one reduction, which sampling needs anyway, checks the rows: finite max = usable row."""
    bad = ~torch.isfinite(row_max.squeeze(-1))  # (B,)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"logits of row(s) {rows[:8]} contain NaN or +inf, or are all -inf: "
                         f"nothing to sample from")


# --- the decoding loop ------------------------------------------------------------------------

def _fit_prompt(model, idx: torch.Tensor, key_padding_mask: torch.Tensor | None, window_stride: int | None):
    """Check the arguments of generate_tokens; returns idx, mask (cropped to block_size, columns
    that are padding in every row dropped; mask None when no row is padded) and the stride K."""
    if not getattr(model.cfg, "causal", False):
        raise ValueError("generation needs a causal LM; a masked LM (BERT-style) cannot continue text")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    block_size = model.cfg.block_size
    stride = max(1, block_size // 4) if window_stride is None else window_stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise ValueError(f"window_stride must be an int in 1..block_size={block_size}, got {window_stride!r}")
    mask = (torch.ones_like(idx, dtype=torch.bool) if key_padding_mask is None
            else key_padding_mask.to(idx.device, torch.bool))
    if mask.shape != idx.shape:
        raise ValueError(f"key_padding_mask {tuple(mask.shape)} must match idx {tuple(idx.shape)}")
    if not mask[:, -1].all():
        raise ValueError("every row's last token must be real: pad prompts on the LEFT")
    keep = int(mask.any(dim=0).nonzero()[0, 0])  # drop columns that are padding in every row
    idx, mask = idx[:, keep:][:, -block_size:], mask[:, keep:][:, -block_size:]  # crop to the context
    return idx, (None if bool(mask.all()) else mask), stride


def _fall_back(idx: torch.Tensor, mask: torch.Tensor | None, keep: int):
    """The context is full: keep its last `keep` = block_size - K + 1 columns, to be re-prefilled.

    The KV cache cannot simply slide: with learned or sinusoidal positions there is no position
    block_size, and dropping the oldest key would leave every other key at the wrong position.
    nanoGPT re-runs the last T = block_size tokens for EVERY new token, a whole forward P(T) per
    token where a cached step costs one position D. Re-prefilling every K tokens instead costs, per
    K tokens, P(T-K+1) + (K-1)·D, about P(T-K+1)/K + D per token: with P(n) ≈ n·D and K = T/4 ~4D
    instead of T·D (T = 256: ~60x less work; a tiny CPU model, bound by per-call overhead, gains
    less: bench/decode.py measures it). The price is context: right after a re-prefill the model
    sees T-K+1 tokens, growing back to T, where nanoGPT always sees T. So past block_size this is
    a different function from nanoGPT's, chosen explicitly: K = 1 IS nanoGPT's window, and the
    default K = T // 4 keeps at least 3/4 of the context. (A RoPE model could keep its cache past
    block_size, but only a model trained to extrapolate would make sense of those positions.)"""
    return idx[:, -keep:], (None if mask is None else mask[:, -keep:])


@torch.inference_mode()
def generate_tokens(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                    generator: torch.Generator | None = None,
                    key_padding_mask: torch.Tensor | None = None,
                    window_stride: int | None = None, flat_decode: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), `max_new_tokens` times. Stop early by breaking.

    idx (B, T) prompt ids, left-padded when key_padding_mask (B, T) (True = real token) is given.
    window_stride: K in 1..block_size, how far the context falls back when it is full (`_fall_back`):
    the model then conditions on the last block_size-K+1 .. block_size tokens.
    1 = nanoGPT's sliding window (always block_size tokens); None = block_size // 4.
    flat_decode: run cached one-token steps through minillm.generate.flat (the same ops without
    the module tree: the same tokens, less Python per token); prefills still run the modules.
    "compile": those steps through torch.compile (FlatDecoder's compile=True; not bit for bit).
    """
    idx, mask, stride = _fit_prompt(model, idx, key_padding_mask, window_stride)
    B, block_size = idx.shape[0], model.cfg.block_size
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        # invariant: idx (mask) + the tokens in `pending` are the context the model conditions on
        # (what the cache holds); n counts its columns, pads included
        cache = model.new_cache(B, block_size) if use_cache else None
        flat = (FlatDecoder.build(model, compile=flat_decode == "compile")  # None: the modules run
                if flat_decode and cache is not None else None)
        logits = prefill(model, idx, cache, mask)  # (B, V); uncached: the first whole-context step
        pending: list[torch.Tensor] = []  # tokens sampled since idx was last rebuilt, each (B,)
        n = idx.shape[1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            if i == max_new_tokens - 1:
                break  # no forward pass for a token nobody will sample
            pending.append(nxt)
            n += 1
            if n <= block_size and cache is not None:
                # only the new token goes in; the cache holds the rest. (No torch.cat of the whole
                # context per token: the tokens wait in `pending` until a rebuild.)
                logits = decode_step(model, nxt[:, None], cache, flat)
                continue
            idx = torch.cat([idx, torch.stack(pending, dim=1)], dim=1)  # (B, n)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, len(pending))], dim=1)
            pending = []
            if n > block_size:  # full: fall back, numbered from 0 again, room for K - 1 decodes
                n = block_size - stride + 1
                idx, mask = _fall_back(idx, mask, n)
                if cache is not None:
                    cache.rewind(0)  # empty it: the old keys sit at positions that are now wrong
            logits = prefill(model, idx, cache, mask)  # re-prefill, or (uncached) the whole context
    finally:
        model.train(was_training)


def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None,
             key_padding_mask: torch.Tensor | None = None,
             window_stride: int | None = None, flat_decode: bool = False) -> torch.Tensor:
    """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens)."""
    new = list(generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                               generator, key_padding_mask, window_stride, flat_decode))
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)


# --- text in, text out ----------------------------------------------------------------------

def left_pad(rows: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> idx (B, T) left-padded, mask (B, T) True = real token."""
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must have at least one token (an empty prompt has nothing "
                         "to condition on; pass e.g. a newline)")
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = True
    return idx.to(device), mask.to(device)


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                  generator: torch.Generator | None = None, stop: list[str] | str | None = None,
                  stream: Callable[[int, str], None] | None = None,
                  token_counts: list[int] | None = None, window_stride: int | None = None,
                  flat_decode: bool = False) -> list[str]:
    """Continue each prompt; returns the generated text of each (without the prompt).

    stop: strings that end a row's generation (the stop string itself is not returned); the batch
    ends when every row has stopped or max_new_tokens is reached.
    stream(row, piece): called with each new piece of text as it becomes final, so a terminal can
    print as tokens arrive. Text that might be the start of a stop string, or an incomplete UTF-8
    character of a byte-level tokenizer, is held back until it is decided (text.py: StopText).
    token_counts: a list that receives how many tokens each row generated (re-encoding the text
    would not tell: a BPE may merge the generated pieces differently).
    window_stride: how the context falls back past block_size (generate_tokens; 1 = nanoGPT's).
    flat_decode: decode steps without the module tree (generate_tokens; same tokens, faster).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [StopText(tokenizer, stop, context=p) for p in prompts]  # checks the stop strings before any work
    device = next(model.parameters()).device
    idx, mask = left_pad([tokenizer.encode(p) for p in prompts], device=device)

    def show(i: int, final: bool = False) -> None:
        if stream is not None:
            piece = rows[i].take(final)
            if piece:
                stream(i, piece)

    for nxt in generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                               generator, mask, window_stride, flat_decode):
        for i, t in enumerate(nxt.tolist()):
            if not rows[i].stopped:
                rows[i].add(t)
                show(i)
        if all(r.stopped for r in rows):
            break
    for i in range(len(rows)):
        show(i, final=True)  # what was held back, now that nothing can follow it
    if token_counts is not None:
        token_counts[:] = [len(r.ids) for r in rows]
    return [r.text for r in rows]
