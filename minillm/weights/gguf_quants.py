"""GGML's tensor types, decoded: how llama.cpp packs a float tensor into a few bits per weight.

A GGUF tensor is a row-major array whose rows are cut into *blocks* of consecutive weights; each
block is stored as a few bytes of scale (and sometimes minimum) followed by small integer codes,
and is decoded on its own: x = d·q (symmetric types) or x = d·q + m (types with a minimum).
Reading order, from the simplest to the most packed:

    F32, F16, BF16          plain floats, one element per "block"
    Q8_0                    32 weights: fp16 scale d, 32 int8 codes             (8.5 bits/weight)
    Q4_0, Q4_1              32 weights: d (and min m), 32 four-bit codes       (4.5 / 5.0)
    Q5_0, Q5_1              as Q4_*, plus a fifth bit per code kept apart      (5.5 / 6.0)
    Q4_K, Q5_K, Q6_K        "K-quants": 256-weight super-blocks whose sub-blocks have their own
                            6- or 8-bit scales, themselves scaled by one fp16  (4.5 / 5.5 / 6.56)

Every decoder takes a (n_blocks, type_size) uint8 array and returns (n_blocks, block_size) float32,
vectorized over blocks (no Python loop per block). The arithmetic is done in float32 in the same
order as ggml's reference (dequantize_row_* in ggml-quants.c), so results are bit-exact against
the `gguf` package's gguf.quants.dequantize, which tests/test_gguf.py checks type by type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

QK = 32  # weights per block of the "legacy" types (Q4_0 ... Q8_0)
QK_K = 256  # weights per super-block of the K-quants


class GGMLType(NamedTuple):
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    decode: Callable[[np.ndarray], np.ndarray]  # (n_blocks, type_size) uint8 -> (n_blocks, block_size) f32


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte `at` of every block, as a (n_blocks, 1) float32 column."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) packed bytes -> (n, 2k) codes 0..15: all the low nibbles first, then all the high ones.

    ggml packs weight j of a 2k-weight group into the low nibble of byte j and weight j + k into the
    high nibble of byte j (not j and j+1 together), so a SIMD unit can split a register in two."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, n: int) -> np.ndarray:
    """(n_blocks, n/8) little-endian bytes -> (n_blocks, n) bits 0/1: bit j is bit j%8 of byte j//8."""
    return np.unpackbits(packed, axis=-1, count=n, bitorder="little")


# --- plain floats ---------------------------------------------------------------------------------

def decode_f32(blocks):
    return blocks.copy().view("<f4")


def decode_f16(blocks):
    return blocks.copy().view("<f2").astype(np.float32)


def decode_bf16(blocks):
    # bfloat16 is the top half of a float32 (same 8-bit exponent, 7-bit mantissa): shift it back up
    return (blocks.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)


# --- 32-weight blocks -----------------------------------------------------------------------------

def decode_q8_0(blocks):
    # | d: fp16 | q[32]: int8 |                                   x_j = d · q_j
    d = _f16(blocks, 0)  # (n, 1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)
    return q * d


def decode_q4_0(blocks):
    # | d: fp16 | qs[16]: two 4-bit codes per byte |              x_j = d · (q_j - 8),  q_j in 0..15
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)  # (n, 32) in -8..7
    return d * q.astype(np.float32)


def decode_q4_1(blocks):
    # | d: fp16 | m: fp16 | qs[16] |                               x_j = d · q_j + m,    q_j in 0..15
    # (asymmetric: m is the block's minimum, so the 16 levels cover [min, max] instead of [-amax, amax])
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)  # (n, 32)
    return d * q + m


def decode_q5_0(blocks):
    # | d: fp16 | qh: 32 bits | qs[16] |    q_j = nibble_j | (bit j of qh) << 4 in 0..31,  x_j = d · (q_j - 16)
    d = _f16(blocks, 0)
    high = _bits(blocks[:, 2:6], QK)  # (n, 32): the fifth bit of every code, stored apart
    q = (_nibbles(blocks[:, 6:]) | (high << 4)).astype(np.int8) - np.int8(16)  # (n, 32) in -16..15
    return d * q.astype(np.float32)


def decode_q5_1(blocks):
    # | d: fp16 | m: fp16 | qh: 32 bits | qs[16] |                 x_j = d · q_j + m,    q_j in 0..31
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    high = _bits(blocks[:, 4:8], QK)
    q = (_nibbles(blocks[:, 8:]) | (high << 4)).astype(np.float32)
    return d * q + m


# --- K-quants: 256-weight super-blocks of sub-blocks ----------------------------------------------

def _scales_mins_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, (n, 8) each.

    Sub-blocks 0-3 keep their scale in the low 6 bits of bytes 0-3 and their min in bytes 4-7; the
    top 2 bits of those 8 bytes are the high bits of sub-blocks 4-7, whose low 4 bits sit in the
    nibbles of bytes 8-11 (scale low, min high):
        byte 0..3   EEAAAAAA  (A = scale of sub-block 0, EE = top bits of scale 4) ...
        byte 4..7   eeaaaaaa  (a = min of sub-block 0,   ee = top bits of min 4)   ...
        byte 8..11  eeeeEEEE  (low 4 bits of min 4 | low 4 bits of scale 4)        ...
    """
    lo_sc, lo_m, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # (n, 4) each
    scales = np.concatenate([lo_sc & 63, (mix & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)  # (n, 8)
    mins = np.concatenate([lo_m & 63, (mix >> 4) | ((lo_m >> 6) << 4)], axis=-1)  # (n, 8)
    return scales, mins


def _k4_codes(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> (n, 8, 32) four-bit codes: byte group g (32 bytes) holds sub-block 2g in its low
    nibbles and sub-block 2g+1 in its high nibbles."""
    return _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)  # (n, 4, 64) -> (n, 8, 32)


def decode_q4_k(blocks):
    # | d: fp16 | dmin: fp16 | scales[12]: 8 × (6-bit scale, 6-bit min) | qs[128]: 256 four-bit codes |
    # sub-block j (32 weights):  x = (d · scale_j) · q - (dmin · min_j),  q in 0..15
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, m = _scales_mins_k4(blocks[:, 4:16])  # (n, 8)
    scale = (d * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
    minimum = (dmin * m.astype(np.float32))[:, :, None]  # (n, 8, 1)
    q = _k4_codes(blocks[:, 16:]).astype(np.float32)  # (n, 8, 32)
    return (scale * q - minimum).reshape(-1, QK_K)


def decode_q5_k(blocks):
    # | d | dmin | scales[12] | qh[32]: the fifth bits | qs[128]: the low four bits |
    # bit j of qh[l] is the fifth bit of weight l of sub-block j; then as Q4_K with q in 0..31
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _scales_mins_k4(blocks[:, 4:16])
    scale = (d * sc.astype(np.float32))[:, :, None]
    minimum = (dmin * m.astype(np.float32))[:, :, None]
    high = _bits(blocks[:, 16:48, None], 8).transpose(0, 2, 1)  # (n, 32, 8) bits -> (n, 8 sub-blocks, 32)
    q = (_k4_codes(blocks[:, 48:]) | (high << 4)).astype(np.float32)  # (n, 8, 32)
    return (scale * q - minimum).reshape(-1, QK_K)


def decode_q6_k(blocks):
    # | ql[128]: low 4 bits | qh[64]: high 2 bits | scales[16]: int8 | d: fp16 |
    # 16 sub-blocks of 16 weights:  x = (d · scale_j) · (q - 32),  q in 0..63
    # Each 128-weight half h uses ql[64h : 64h+64] and qh[32h : 32h+32]; weight l + 32i (i = 0..3,
    # l = 0..31) of the half takes its low bits from nibble (i // 2) of ql[l + 32·(i % 2)] and its
    # high bits from bits 2i, 2i+1 of qh[l].
    d = _f16(blocks, 208)  # (n, 1)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # (n, half, which 32 bytes, l)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2)  # (n, half, nibble, 2, 32): i = 2·nibble + (i % 2)
    low = low.reshape(-1, 2, 4, 32)  # (n, half, i, l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (n, half, 1, l)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n, half, i, l)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(-1, 16, 16)  # (n, sub-block, 16)
    scale = (d * sc)[:, :, None]  # (n, 16, 1)
    return (scale * q.astype(np.float32)).reshape(-1, QK_K)


# --- the table: GGML type id (as stored in a GGUF tensor info) -> layout and decoder ---------------

GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4, decode_f32),
    1: GGMLType("F16", 1, 2, decode_f16),
    2: GGMLType("Q4_0", QK, 2 + QK // 2, decode_q4_0),
    3: GGMLType("Q4_1", QK, 4 + QK // 2, decode_q4_1),
    6: GGMLType("Q5_0", QK, 2 + 4 + QK // 2, decode_q5_0),
    7: GGMLType("Q5_1", QK, 4 + 4 + QK // 2, decode_q5_1),
    8: GGMLType("Q8_0", QK, 2 + QK, decode_q8_0),
    12: GGMLType("Q4_K", QK_K, 4 + 12 + QK_K // 2, decode_q4_k),
    13: GGMLType("Q5_K", QK_K, 4 + 12 + QK_K // 8 + QK_K // 2, decode_q5_k),
    14: GGMLType("Q6_K", QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, decode_q6_k),
    30: GGMLType("BF16", 1, 2, decode_bf16),
}

# Types ggml has that minillm does not decode, named so an error can say which one a file uses.
OTHER_GGML_TYPES = {4: "Q4_2 (removed)", 5: "Q4_3 (removed)", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
                    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64",
                    28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` (PyTorch order, last dim = ggml's ne[0]) from a tensor's raw bytes.

    raw: 1-D uint8 view of exactly the tensor's bytes (a slice of the memory-mapped file; not copied
    before decoding). Blocks never straddle rows: each row of shape[-1] weights is a whole number
    of blocks, which the GGUF reader has checked."""
    t = GGML_TYPES[type_id]
    blocks = raw.reshape(-1, t.type_size)  # (n_blocks, type_size)
    return t.decode(blocks).reshape(shape)
