"""The decode cache protocol, and the cache whose rows each keep their own length (the batching engine's).

A decode cache is an object with a few verbs (nanochat's KV cache; gpt-fast keeps its own in the
model). The model calls the first two from inside its forward; the decode core
(minillm/generate/core.py) and the loops around it call the rest:

    update(layer, k, v)      a layer appends its new k, v (B, H_kv, T, D) and gets back every key and
                             value it may attend over, (B, H_kv, Tk, D)
    advance(T)               after the last layer: T more tokens are cached
    length                   tokens cached (the longest row's, where rows differ)
    positions_and_mask(T)    each row's positions for its T next tokens, and the key padding mask
                             (B, length + T) that hides what a row does not own; (None, None) when
                             the model's defaults (positions from `length`, every key real) are right
    rewind(n)                forget all but the first n tokens (a rejected speculative draft, a
                             re-prefill); a sliding-window cache refuses when the keys are gone
    reorder(index)           row i becomes old row index[i] (beam search's survivors)

Two caches speak it:
    KVCache (minillm/model/attention.py)   one length for all rows; ragged prompts are left padded
                                           (`pad_left`), a sliding window keeps only the last W-1
                                           tokens. generate_tokens and beam search use it; so does
                                           Seq2Seq's decoder.
    SlotKVCache (below)                    one length per row, so that requests can join and leave
                                           a running batch (minillm/generate/batching.py).
"""

from __future__ import annotations

from typing import Protocol

import torch


class DecodeCache(Protocol):
    """What the decode core and the model need of a cache (see the module docstring)."""

    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, T: int) -> None: ...

    def positions_and_mask(self, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def rewind(self, length: int) -> None: ...

    def reorder(self, index: torch.Tensor) -> None: ...


class SlotKVCache:
    """Keys/values for `n_slots` independent rows, each with its own length (cf. attention.KVCache).

    Row b's new token goes at position lengths[b]; attention over a shared Tk = max(lengths)+1 hides
    each row's unused tail with a key padding mask, exactly as left padding does for KVCache — so a
    row computes what it would alone. `select(first, count)` chooses which rows the next forward
    (and every verb below) works on: the engine keeps its active rows packed in slots 0..A-1, so a
    step works on a view and never gathers. Rows of different lengths advance one token at a time
    (a causal mask per row would be needed for more); rows of one length take any number.
    """

    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, n_slots, n_kv_head, max_len, head_dim)  # H_kv heads, as attention.KVCache
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * n_slots  # on the host: reading them never waits for the GPU
        self._rows, self._starts, self._max = slice(0, 0), None, 0
        self.uniform = True  # do the selected rows all have the same length?

    def select(self, first: int, count: int) -> torch.Tensor:
        """Work on rows first..first+count-1 next; returns their lengths (B,) = the new tokens' positions."""
        self._rows = slice(first, first + count)
        lens = self.lengths[self._rows]
        self._max, self.uniform = max(lens), len(set(lens)) == 1
        self._starts = torch.tensor(lens, device=self.k.device)  # (B,)
        return self._starts

    @property
    def length(self) -> int:
        return self._max  # the longest selected row: Tk = length + T keys are attended over

    def positions_and_mask(self, T: int):
        """Positions (B, 1) = each row's length, and for ragged rows the mask (B, length + 1) that hides
        keys past a row's own length; T > 1 tokens (rows of one length only): positions (T,)."""
        if T > 1:
            if not self.uniform:
                raise ValueError("rows of different lengths can only advance one token at a time")
            return torch.arange(self._max, self._max + T, device=self.k.device), None  # (T,)
        if self.uniform:
            return self._starts[:, None], None  # (B, 1)
        kpm = torch.arange(self._max + 1, device=self.k.device)[None, :] <= self._starts[:, None]  # (B, Tk)
        return self._starts[:, None], kpm

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at each row's own length; return (B, H_kv, max_len_used, D) views."""
        B, H, T, D = k.shape
        end = self._max + T
        if end > self.max_len:
            raise ValueError(f"KV cache row is full: {self._max} cached + {T} new > max_len {self.max_len}")
        if self.uniform:  # all rows equally long (a prefill, or n samples of one prompt): a slice write
            self.k[layer, self._rows, :, self._max:end] = k
            self.v[layer, self._rows, :, self._max:end] = v
        else:  # ragged rows decode one token each, written at (row b, position starts[b])
            if T != 1:
                raise ValueError("rows of different lengths can only advance one token at a time")
            b = torch.arange(B, device=k.device)
            self.k[layer, self._rows][b, :, self._starts] = k[:, :, 0]  # (B, H, D) scattered
            self.v[layer, self._rows][b, :, self._starts] = v[:, :, 0]
        return self.k[layer, self._rows, :, :end], self.v[layer, self._rows, :, :end]  # (B, H, Tk, D)

    def advance(self, T: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lengths[i] += T

    def rewind(self, length: int | list[int]) -> None:
        """The selected rows forget all but their first `length` tokens (one int, or one per row)."""
        rows = range(self._rows.start, self._rows.stop)
        new = [length] * len(rows) if isinstance(length, int) else list(length)
        if len(new) != len(rows) or any(not 0 <= n <= self.lengths[i] for i, n in zip(rows, new)):
            raise ValueError(f"cannot rewind rows of lengths {self.lengths[self._rows]} to {new}")
        self.lengths[self._rows] = new
        self.select(self._rows.start, len(rows))

    def reorder(self, index: torch.Tensor) -> None:
        """Selected row i becomes selected row index[i] (index within the selection)."""
        rows = self._rows
        self.k[:, rows], self.v[:, rows] = self.k[:, rows][:, index], self.v[:, rows][:, index]
        lens = self.lengths[rows]
        self.lengths[rows] = [lens[int(i)] for i in index]
        self.select(rows.start, rows.stop - rows.start)

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src (a forked sample, or packing rows after one leaves)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
