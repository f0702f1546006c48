"""Positional encodings: how a permutation-invariant attention layer learns word order.

- sinusoidal ("Attention Is All You Need", §3.5), the default:
      PE[pos, 2i]   = sin(pos / 10000^(2i/C))
      PE[pos, 2i+1] = cos(pos / 10000^(2i/C))
  added to the token embeddings. For any fixed offset k, PE[pos+k] is a linear function (a rotation
  per frequency) of PE[pos], which lets attention pick out relative positions.
- learned absolute (GPT-2, BERT): one trained vector per position, added the same way.
- rotary, RoPE (Su et al., 2021; Llama): nothing is added; instead each (query, key) channel pair
  (x0, x1), (x2, x3), … is rotated by the angle pos·θ_i with θ_i = base^(-2i/D). A dot product of
  a rotated query at m with a rotated key at n then depends only on m - n. Context extension
  ("rope_scaling" in Hugging Face configs) changes only the θ_i: see `rope_frequencies`.
  Hugging Face Llama pairs channel i with i + D/2 ("rotate_half") instead of i with i+1; that is the
  same rotation on permuted channels, so weights/huggingface.py permutes q/k weights once at load time and
  this file keeps one layout.
- none: no positional signal (a causal mask alone still leaks some order).

Positions are passed explicitly as a (B, T) or (T,) tensor of integers, so the KV cache (positions
continue after the cached ones) and left-padded batches (each row starts at its own offset) work.
"""

from __future__ import annotations

import math

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


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """θ_i = base^(-2i/D) for each channel pair i, (D/2,), rescaled as cfg.rope_scaling asks.

    A model trained on contexts up to L has only seen angles pos·θ_i < L·θ_i. To run it on s = factor
    times longer contexts without retraining from scratch:
      - "linear" (position interpolation, Chen et al. 2023): θ_i / s for every i, so position s·L
        looks like L did. Simple, but it also blurs the fast-rotating pairs that encode word order.
      - "llama3" (Llama 3.1): judge each pair by its wavelength λ_i = 2π/θ_i. Pairs that turn many
        times within the original context (λ < L/high_freq_factor) are kept; pairs that never
        complete a turn (λ > L/low_freq_factor) are divided by s; in between, blend
        (1 - a)·θ/s + a·θ with a = (L/λ - low) / (high - low), so the frequencies stay continuous.
    The formulas and their edge cases follow Hugging Face's modeling_rope_utils, which parity tests hold.
    """
    D = cfg.head_dim
    theta = cfg.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    if cfg.rope_scaling is None:
        return theta
    s = cfg.rope_factor
    if cfg.rope_scaling == "linear":
        return theta / s
    # llama3
    L, low, high = cfg.rope_original_context, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / theta  # (D/2,) tokens per full turn of each pair
    scaled = torch.where(wavelen > L / low, theta / s, theta)  # slow pairs: interpolate fully
    a = (L / wavelen - low) / (high - low)  # 0 at λ = L/low, 1 at λ = L/high
    blended = (1 - a) * scaled / s + a * scaled
    medium = (wavelen >= L / high) & (wavelen <= L / low)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """RoPE on interleaved pairs: (x0, x1) -> (x0 cosφ - x1 sinφ, x0 sinφ + x1 cosφ), φ = pos·θ_i."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        theta = rope_frequencies(cfg)  # (D/2,)
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
