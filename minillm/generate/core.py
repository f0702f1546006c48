"""One decode core: the functions every loop that produces tokens calls (after gpt-fast's generate.py).

    prefill(model, tokens, cache)        run the prompt (B, T) into an empty cache -> logits (B, V)
    decode_step(model, token, cache)     one new token per row (B, 1) through the cache -> logits (B, V)
    extend(model, tokens, cache)         T new tokens per row at once -> logits at each (B, T, V):
                                         how speculative decoding checks a draft
    WithSource(seq2seq, src)             an encoder–decoder's decoder, called like a CausalLM

Autoregressive decoding repeats "run the model, pick the next token from the last position's
distribution, append it". Without a cache each step re-runs the whole prefix (nanoGPT's sample.py:
O(T²) attention work per token); with one the prompt runs once (`prefill`) and each new token costs
one position (`decode_step`). Both compute the same function, so under a fixed seed they pick the
same tokens (tests/test_generate.py). `prefill` with cache=None is that uncached step.

The cache is any object with the verbs of minillm/generate/cache.py; it tells each row's positions
and which keys a row may see (`positions_and_mask`), so left-padded prompts (KVCache) and rows of
different lengths (the batching engine's SlotKVCache) go through the same two functions. Choosing
the next token is the caller's business (sampling.py's `sample_next`, beam search's top-k), and so
is what to do when the context is full.

The fast path is a branch inside `decode_step`, never a second loop: given a FlatDecoder
(minillm/generate/flat.py; `FlatDecoder.build(model)` returns one only for layers whose types it
knows), the step runs the same ops without the module tree — the same logits, bit for bit.

    >>> cache = model.new_cache(B)
    >>> logits = prefill(model, idx, cache)                        # (B, V)
    >>> for _ in range(n):
    ...     nxt = sample_next(logits, temperature=0.8)              # (B,)
    ...     logits = decode_step(model, nxt[:, None], cache, flat)  # flat: a FlatDecoder or None
"""

from __future__ import annotations

import torch

from minillm.model.transformer import CausalLM


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True = real token -> (B, T) positions counting real tokens from 0 (pads get 0)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def prefill(model, tokens: torch.Tensor, cache=None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt tokens (B, T) into `cache` (empty, or rewound to 0); logits of the last position (B, V).

    key_padding_mask (B, T), True = real token: left-padded rows, each numbered from its first real
    token (the cache remembers the padding for the decode steps). cache None: no cache, the whole
    context runs every time — what an uncached loop calls on every step."""
    last = {"last_only": True} if isinstance(model, CausalLM) else {}  # the head for one position, not T
    if cache is None:
        if key_padding_mask is None:  # every row starts at position 0: the plainest call, model(idx)
            logits, _ = model(tokens, **last)
        else:
            positions = positions_from_mask(key_padding_mask)  # (B, T): each row from its first real token
            logits, _ = model(tokens, positions=positions, key_padding_mask=key_padding_mask, **last)
        return logits[:, -1]  # (B, V): the last position predicts the next token
    if key_padding_mask is not None:
        cache.pad_left(key_padding_mask)
    positions, kpm = cache.positions_and_mask(tokens.shape[1])  # None, None: the model's defaults
    logits, _ = model(tokens, positions=positions, key_padding_mask=kpm, cache=cache, **last)
    return logits[:, -1]  # (B, V)


def extend(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Run T new tokens per row (B, T) after what `cache` holds; logits at every position (B, T, V).

    Logits at position t score token t+1, so one call checks a whole draft of T tokens (speculative
    decoding); `cache.rewind(n)` then forgets the rejected ones."""
    positions, kpm = cache.positions_and_mask(tokens.shape[1])  # None, None: the model's defaults
    logits, _ = model(tokens, positions=positions, key_padding_mask=kpm, cache=cache)
    return logits  # (B, T, V)


def decode_step(model, token: torch.Tensor, cache, flat=None) -> torch.Tensor:
    """One new token per row, token (B, 1), through `cache`; logits for the next one (B, V).

    flat: a FlatDecoder for `model` (or None): the fast branch, the same ops without the module tree."""
    positions, kpm = cache.positions_and_mask(1)
    if flat is not None:
        return flat.step(token, cache, positions, kpm)  # (B, V)
    logits, _ = model(token, positions=positions, key_padding_mask=kpm, cache=cache)
    return logits[:, -1]  # (B, V)


class WithSource:
    """A Seq2Seq's decoder bound to one batch of sources, called as the core calls a CausalLM.

    The core runs `model(tokens, positions=, key_padding_mask=, cache=)`; an encoder–decoder's
    decoder also needs the source's cross-attention k, v (`Seq2Seq.cross_kv`, computed once) and its
    padding mask. Beam search reorders rows: `reorder(index)` moves the sources with the cache's rows
    (cache.reorder(index)). Target rows are never padded, so the cache's positions are its own."""

    def __init__(self, model, src: torch.Tensor, src_mask: torch.Tensor | None = None):
        self.model, self.cfg = model, model.cfg
        self.src_mask = src != model.cfg.pad_id if src_mask is None else src_mask.bool()  # (B, S)
        self.kv = model.cross_kv(model.encode(src, self.src_mask))  # per layer (B, H_kv, S, D) k, v

    def __call__(self, tokens, positions=None, key_padding_mask=None, cache=None):
        if positions is not None or key_padding_mask is not None:
            raise ValueError("an encoder–decoder's target rows are not padded: use an unpadded cache")
        return self.model.decode(tokens, self.kv, self.src_mask, None, cache), None  # (B, T, V), no loss

    def reorder(self, index: torch.Tensor) -> None:
        self.kv = [(k[index], v[index]) for k, v in self.kv]
        self.src_mask = self.src_mask[index]
