"""The int8 and int4 weight formats, written out: how a float matrix becomes codes and back.

This is the reference that QuantLinear (quant.py) runs in PyTorch and that the Triton kernel
(kernels/quant_matmul.py) reads in its load path; it imports nothing from minillm, so both can.

int8, symmetric, one scale per output channel (row n of W, shape (N, K)):
    s[n]      = max_k |W[n, k]| / 127
    q[n, k]   = round(W[n, k] / s[n])            in -127..127 (-128 unused: keeps the grid symmetric)
    Ŵ[n, k]   = q[n, k] · s[n]                   |W - Ŵ| ≤ s[n] / 2
  or, with group_size=G, one scale per group of G consecutive inputs, scales (N, K/G):
    s[n, g]   = max over the group |W| / 127,   Ŵ[n, k] = q[n, k] · s[n, k // G]
  This is GGUF's Q8_0 (blocks of 32 with an fp16 scale), so such weights load without re-quantizing.

int4, asymmetric, one scale and one zero per group of G consecutive inputs (G = 32/64/128/256):
    lo, hi    = min and max of the group
    s         = (hi - lo) / 15                   16 levels span the group's range exactly
    z         = lo + 8·s                         the real value that the middle code 8 stands for
    q         = round((W - z) / s) + 8           in 0..15
    Ŵ         = (q - 8)·s + z                    |W - Ŵ| ≤ s / 2
The zero is a float in the weights' units (as torch's tinygemm `_weight_int4pack_mm` and HQQ), not
Jacob et al.'s (2018) integer zero point: weight-only kernels never do integer arithmetic with it,
and a float zero lets the 16 levels hit lo and hi exactly. Centred on code 8, |z| stays within half
the group's range, so storing it in bf16 loses almost nothing.

int4 packing, two codes per byte, neighbours along K share a byte:
    packed[n, j] = q[n, 2j] | (q[n, 2j+1] << 4)          packed: (N, K/2) uint8, row-major
so a K-tile of a row is one contiguous run of bytes, and code k is (packed[n, k // 2] >> 4·(k % 2)) & 0xF.
Scales and zeros are (N, K/G), in the weights' float dtype by default; any float dtype is accepted
(a GGUF-kept Q4_1 stores them in fp32 so that (q - 8)·s + z equals the file's d·q + m bit for bit).
"""

from __future__ import annotations

import torch

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)


# --- int8: symmetric, per output channel (or per group of G inputs) ---------------------------

def quantize_int8(w: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype | None = None):
    """W (N, K) float -> (q (N, K) int8, scales). Scales are (N,) per output channel when group_size is
    None, else (N, K/G), one per group of G inputs; kept in `scale_dtype` (default W's)."""
    _check_weight(w)
    N, K = w.shape
    if group_size is not None:
        check_group(K, group_size)
    G = group_size or K  # per channel = one group spanning the whole row
    wg = w.float().reshape(N, K // G, G)  # (N, K/G, G)
    amax = wg.abs().amax(dim=-1)  # (N, K/G)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero group gets scale 1
    # round the scale to the dtype it is stored in *before* computing q, so q matches what is kept
    scale = scale.to(scale_dtype or w.dtype).float()
    q = torch.round(wg / scale[..., None]).clamp(-127, 127).to(torch.int8).reshape(N, K)  # (N, K)
    scale = scale if group_size else scale[:, 0]  # (N, K/G) or (N,)
    return q, scale.to(scale_dtype or w.dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(q (N, K) int8, scales (N,) or (N, K/G)) -> Ŵ (N, K) = q · s, computed in fp32, returned in `dtype`."""
    if scales.dim() == 1:
        return (q.float() * scales.float()[:, None]).to(dtype)
    N, K = q.shape
    n_groups = scales.shape[1]
    qg = q.float().reshape(N, n_groups, K // n_groups)  # (N, K/G, G)
    return (qg * scales.float()[..., None]).reshape(N, K).to(dtype)


# --- int4: asymmetric, per group of G inputs, packed two per byte ----------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) with values 0..15 -> (N, K/2) uint8, packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4."""
    if q.dim() != 2 or q.shape[1] % 2 != 0:
        raise ValueError(f"pack_int4 needs a 2-D (N, K) tensor with K even, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 needs integer codes, got {q.dtype}")
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"int4 codes must be in 0..15, got values in {q.min().item()}..{q.max().item()}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)  # even k in the low nibble, odd k in the high nibble


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> codes (N, K) uint8 in 0..15; the exact inverse of pack_int4."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    lo, hi = packed & 0xF, packed >> 4  # (N, K/2) each
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)  # (N, K/2, 2) -> (N, K)


def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype | None = None):
    """W (N, K) float -> (packed (N, K/2) uint8, scales (N, K/G), zeros (N, K/G))."""
    _check_weight(w)
    N, K = w.shape
    check_group(K, group_size)
    dtype = scale_dtype or w.dtype
    wg = w.float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, K/G)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))  # a constant group: any scale
    scale = scale.to(dtype).float()  # as stored (see quantize_int8)
    zero = (lo + 8 * scale).to(dtype).float()
    q = torch.round((wg - zero[..., None]) / scale[..., None]) + 8  # (N, K/G, G)
    q = q.clamp(0, 15).to(torch.uint8).reshape(N, K)  # (N, K)
    return pack_int4(q), scale.to(dtype), zero.to(dtype)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ (N, K) = (q - 8)·s + z per group; the group size is K / scales.shape[1]."""
    q = unpack_int4(packed).float()  # (N, K)
    N, K = q.shape
    n_groups = scales.shape[1]
    qg = q.reshape(N, n_groups, K // n_groups)  # (N, K/G, G)
    w = (qg - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K).to(dtype)


def quantize(w: torch.Tensor, scheme: str, group_size: int | None = 128, *,
             int8_groups: bool = False) -> dict[str, torch.Tensor]:
    """W -> the tensors a QuantLinear stores, by name: weight_q, scales (+ zeros for int4).

    `group_size` is int4's group (None = 128). int8 stays per output channel and ignores it unless
    `int8_groups=True` (callers have long passed one group size for both schemes)."""
    if scheme == "int8":
        q, s = quantize_int8(w, group_size if int8_groups else None)
        return {"weight_q": q, "scales": s}
    if scheme == "int4":
        q, s, z = quantize_int4(w, group_size or 128)
        return {"weight_q": q, "scales": s, "zeros": z}
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def dequantize(scheme: str, weight_q, scales, zeros=None, dtype=torch.float32) -> torch.Tensor:
    """The stored tensors (as `quantize` names them) -> Ŵ (N, K) in `dtype`; groups are read off the
    shape of `scales` (int8: (N,) per channel or (N, K/G); int4: (N, K/G))."""
    if scheme == "int8":
        return dequantize_int8(weight_q, scales, dtype)
    return dequantize_int4(weight_q, scales, zeros, dtype)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"expected a 2-D float weight (N, K), got {w.dtype} {tuple(w.shape)}")


def check_group(K: int, group_size: int) -> None:
    """Groups (int4, grouped int8): G is one of GROUP_SIZES and divides the K input features."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if K % group_size != 0:
        raise ValueError(f"K={K} input features are not divisible by group_size={group_size}; "
                         f"pick a group size dividing {K}")
