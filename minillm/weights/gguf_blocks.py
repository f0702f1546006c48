"""Block quantizers: float32 weights -> ggml's F32, F16, Q8_0, Q4_0 and Q4_1 bytes, as a GGUF file stores them.

The inverse of gguf_quants.py's decoders, for the writer (gguf_write.py). A row of weights is cut
into blocks of 32 consecutive values; each block gets its own scale (and, for Q4_1, minimum):

    Q8_0   | d: fp16 | q[32]: int8 |        d = amax / 127,        q = round(x / d)       x ≈ d·q
    Q4_0   | d: fp16 | qs[16]: nibbles |    d = max / -8,          q = trunc(x / d + 8.5)  x ≈ d·(q - 8)
    Q4_1   | d: fp16 | m: fp16 | qs[16] |   d = (max - min) / 15,  q = trunc((x - m) / d + 0.5)
                                                                                          x ≈ d·q + m

Q4_0's "max" is the value of largest magnitude *with its sign*: dividing by -8 puts that value at
code 0 exactly (x/d = -8), and the other side of zero gets the 15 remaining levels up to +7·|d|.
Q4_1 spends 2 more bytes per block on the minimum, so its 16 levels span [min, max] instead of
[-amax, amax]: better for a block whose values are not centred on zero.

Everything is float32 and in the order of ggml's reference quantizers (quantize_row_q8_0_ref,
quantize_row_q4_0_ref, quantize_row_q4_1_ref in ggml-quants.c): the codes are computed from the
float32 scale before it is rounded to fp16 for storage, and C's `(int8_t)` cast truncates toward
zero. tests/test_gguf_write.py checks the bytes equal the `gguf` package's gguf.quants.quantize.
"""

from __future__ import annotations

import numpy as np

from minillm.weights.gguf_quants import GGML_TYPES, QK

F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8  # ggml type ids, as in a GGUF tensor info


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: to the nearest integer, halves away from zero (np.round rounds halves to even).

    floor(|x| + 0.5) would be wrong for |x| = 0.49999997, where the float32 sum rounds up to 1.0;
    |x| - floor(|x|) is exact, so comparing it with 0.5 is not."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + (a - whole >= 0.5))


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) little-endian fp16 bytes (round to nearest even, as ggml's FP32_TO_FP16)."""
    return v.astype("<f2").view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..15 -> (n, 16) bytes: weight j in the low nibble of byte j, weight j + 16 in
    its high nibble (the layout gguf_quants._nibbles unpacks)."""
    return (q[:, :QK // 2] | (q[:, QK // 2:] << 4)).astype(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is 0 (an all-zero block: every code then encodes 0)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """(n, 32) float32 blocks -> (n, 34) bytes: fp16 d, then 32 int8 codes."""
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1)
    q = roundf(x * _inverse(d)).astype(np.int8)  # (n, 32) in -127..127
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """(n, 32) float32 blocks -> (n, 18) bytes: fp16 d, then 16 bytes of 4-bit codes."""
    at = np.abs(x).argmax(axis=1)[:, None]  # the first value of largest magnitude, as ggml's `<` scan
    d = np.take_along_axis(x, at, axis=1) / np.float32(-8)  # (n, 1), signed
    q = np.trunc(x * _inverse(d) + np.float32(8.5)).clip(0, 15).astype(np.uint8)  # MIN(15, (int8_t)(...))
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """(n, 32) float32 blocks -> (n, 20) bytes: fp16 d, fp16 min, then 16 bytes of 4-bit codes."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)  # (n, 1) each
    d = (hi - lo) / np.float32(15)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).clip(0, 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)


QUANTIZERS = {Q8_0: quantize_q8_0, Q4_0: quantize_q4_0, Q4_1: quantize_q4_1}
WRITABLE = (F32, F16, *QUANTIZERS)  # the ggml types this file encodes


def n_bytes(shape: tuple[int, ...], type_id: int) -> int:
    """Bytes a tensor of `shape` (PyTorch order) takes as ggml type `type_id`."""
    t = GGML_TYPES[type_id]
    return int(np.prod(shape, dtype=np.int64)) // t.block_size * t.type_size


def encode(w: np.ndarray, type_id: int) -> np.ndarray:
    """A float tensor as the 1-D uint8 bytes of ggml type `type_id` (row-major, rows cut into blocks).

    The last dimension (ggml's ne[0]) must be a whole number of blocks for the block types."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if type_id == F32:
        return w.astype("<f4").reshape(-1).view(np.uint8)
    if type_id == F16:
        return w.astype("<f2").reshape(-1).view(np.uint8)
    if type_id not in QUANTIZERS:
        raise ValueError(f"ggml type {type_id} is not one minillm writes ({', '.join(GGML_TYPES[t].name for t in WRITABLE)})")
    if w.shape[-1] % QK:
        raise ValueError(f"rows of {w.shape[-1]} weights are not whole {GGML_TYPES[type_id].name} blocks of {QK}")
    return QUANTIZERS[type_id](w.reshape(-1, QK)).reshape(-1)  # (n_blocks, QK) -> bytes
