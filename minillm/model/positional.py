"""Positional encodings: how a permutation-invariant attention layer learns word order.

- sinusoidal ("Attention Is All You Need", §3.5), the default:
      PE[pos, 2i]   = sin(pos / 10000^(2i/C))
      PE[pos, 2i+1] = cos(pos / 10000^(2i/C))
  added to the token embeddings. For any fixed offset k, PE[pos+k] is a linear function (a rotation
  per frequency) of PE[pos], which lets attention pick out relative positions.
- learned absolute (GPT-2, BERT): one trained vector per position, added the same way.
- rotary, RoPE (Su et al., 2021; Llama): nothing is added; instead each (query, key) channel pair
  (x0, x1), (x2, x3), … is rotated by the angle pos·θ_i with θ_i = base^(-2i/D). A dot product of
  a rotated query at m with a rotated key at n then depends only on m - n.
- none: no positional signal (a causal mask alone still leaks some order).

Positions are passed explicitly as a (B, T) or (T,) tensor of integers, so the KV cache (positions
continue after the cached ones) and left-padded batches (each row starts at its own offset) work.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.model.config import ModelConfig


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The (n_positions, dim) sinusoid table: even channels sin, odd channels cos."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,) = 1/10000^(2i/C)
    angles = pos * inv_freq  # (T, dim/2)
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class SinusoidalPositions(nn.Module):
    """Fixed sinusoid table, looked up by position and added to the token embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # a buffer, not a parameter: it is not trained, and not saved (it is recomputed)
        self.register_buffer("table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # (B, T) or (T,) -> (..., T, C)
        return self.table[positions]


class LearnedPositions(nn.Module):
    """One trainable C-vector per position (GPT-2's wpe, BERT's position_embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


class Rotary(nn.Module):
    """RoPE on interleaved pairs: (x0, x1) -> (x0 cosφ - x1 sinφ, x0 sinφ + x1 cosφ), φ = pos·θ_i."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.head_dim
        theta = cfg.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
        angles = torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * theta  # (T, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (T,) or (B, T). Returns x rotated, same shape and dtype."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, D/2) or (B, T, D/2)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): same rotation for every head
        pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2): channel pairs (x0,x1),(x2,x3)..
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, D/2, 2)
        return out.flatten(-2).to(x.dtype)  # (B, H, T, D)


def make_additive_positions(cfg: ModelConfig) -> nn.Module | None:
    """The module added to token embeddings, or None (rotary acts inside attention instead)."""
    if cfg.positional == "sinusoidal":
        return SinusoidalPositions(cfg)
    if cfg.positional == "learned":
        return LearnedPositions(cfg)
    return None
