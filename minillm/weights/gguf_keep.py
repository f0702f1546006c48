"""GGUF weights kept quantized: llama.cpp's 32-weight blocks re-read as minillm's int4 / int8 formats.

    >>> model, info = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", keep_quantized=True)   # gguf_llama.py

Dequantizing a Q4_1 file to fp32 multiplies its size by six (98 MB -> 540 MB for SmolLM2-135M), and
a decoder at batch 1 is bound by the bytes it reads per token. llama.cpp's simplest block types are
already minillm's formats (compress/quant_format.py) in another order, so they can be kept as they are:

    Q4_1   | d: fp16 | m: fp16 | 16 bytes |   x = d·q + m,      q in 0..15
    -> int4 g32:  Ŵ = (q - 8)·s + z   with   s = d,   z = m + 8·d          (both stored in float32)
    Q4_0   | d: fp16 | 16 bytes |             x = d·(q - 8)
    -> int4 g32:  s = d, z = 0       (or int8 g32 with codes q - 8, when it shares a matrix with int8)
    Q8_0   | d: fp16 | 32 int8 |              x = d·q
    -> int8 g32:  Ŵ = q·s            with   s = d
    Q4_K   256-weight super-blocks: sub-block j of 32 is x = (d·sc_j)·q - dmin·m_j,  q in 0..15
    -> int4 g32:  s = d·sc_j,  z = 8·s - dmin·m_j
    Q5_0   x = d·(q - 16), q in 0..31  ->  int8 g32 with codes q - 16, s = d

Why these are exact, not just close: every product above is exact in float32 (d has 11 significant
bits, sc_j 6, the codes at most 5, so d·sc_j·q fits in 22 < 24 bits). Then
(q - 8)·s + z = d·q + m as real numbers, so both sides are the float32 rounding of one real number
and are equal bit for bit, *provided z is itself exact in float32*. For Q4_1, z = m + 8·d adds two
fp16 values, which float32 holds exactly unless m is ~2^13 times d (a nearly constant block): SmolLM2's
file has no such block. For Q4_K, z = 8·d·sc_j - dmin·m_j adds two 17-bit products, which float32
does not always hold: on random Q4_K blocks 0.1% (scales ~2e-3) to 5% (~0.05) of the groups round z,
and their weights then differ from llama.cpp's by at most one float32 rounding (1.6e-8 of max |x|
measured). Such groups are counted (Kept.inexact, "inexact_groups" in the report), never hidden.
The only other difference: Q4_0's code 8 gives llama.cpp -0.0 where d < 0 and us +0.0 (equal values).

Nibble order. ggml puts weight j of a block in the low nibble of byte j and weight j + 16 in the
high nibble (a SIMD unit splits a register in two); minillm packs neighbours, weight 2j low and 2j + 1
high (a K-tile is one run of bytes). The codes are unpacked to (N, K) and packed again our way.

Everything else is re-quantized from its float32 dequantization, tensor by tensor, to int8 g32
(quant_format.quantize): Q5_1, Q5_K and Q6_K (5 to 6.6 bits per weight: int4 would lose more than
the file kept). Measured on 4096 × 256 weights of each type (random blocks; Q5_1 from gguf's own
quantizer), on the 2-core x86_64 CPU shared with other jobs:

    type -> int8 g32     max |Ŵ - x| / max |x|    rms(Ŵ - x) / rms(x)    time per 1M weights
    Q5_1, Q5_K, Q6_K     3.9e-3 (≤ 1/254)          0.37% - 0.53%          0.4 - 0.5 s
    (to int4 g32 instead: 3-7% rms, which is why int8 is the choice)

F32/F16/BF16 linears stay float, unless they share a matrix (qkv) with quantized ones (then int8 g32,
the same cost). The report in info["gguf"]["kept"] lists, per tensor, what was exact and what was
re-quantized, with its max error and seconds.

Memory: the model's parameters are built on the meta device (no storage, _ParamsOnMeta), and each
weight goes from the memory-mapped file into its quantized buffers one tensor at a time, the file's
pages given back as they are converted; never an fp32 copy of the whole model. SmolLM2-135M Q4_1
(98 MB file, 106 MB kept model) measured in a fresh process on the 2-core CPU shared with other jobs,
peak RSS above `import torch, minillm`: load_model(keep_quantized=True) +147 MB in ~4.5 s (the
tokenizer included), load_model() to fp32 +784 MB in ~16 s.
"""

from __future__ import annotations

import mmap
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from minillm.compress.quant import QuantEmbedding, QuantLinear, default_backend
from minillm.compress.quant_format import quantize
from minillm.model.transformer import CausalLM
from minillm.weights.gguf import GGUFError, GGUFFile
from minillm.weights.gguf_quants import GGML_TYPES, QK, _bits, _f16, _k4_codes, _nibbles, _scales_mins_k4

G = 32  # minillm's group size for everything kept from GGUF: one group per ggml block (or sub-block)


class Kept(NamedTuple):
    """One (N, K) weight in a minillm format, as numpy arrays (converted to torch by the caller)."""
    scheme: str  # "int4" or "int8"
    codes: np.ndarray  # (N, K): uint8 0..15 (int4, not yet packed) or int8 (int8)
    scales: np.ndarray  # (N, K/32) float32
    zeros: np.ndarray | None  # (N, K/32) float32 for int4, None for int8
    exact: bool  # Ŵ equals the GGUF's dequantized values (but for `inexact` groups)
    inexact: int  # groups whose zero z was rounded when stored in float32 (see the module docstring)


# --- exact conversions: (n_blocks, type_size) uint8 -> codes (n_groups, 32), s, z per group ---------------

def _zero(offset: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, int]:
    """z = offset + 8·s in float32, and how many groups' z is not the exact real sum (checked in float64,
    where the sum of two such float32 values is exact)."""
    z = offset + np.float32(8) * s
    inexact = int(np.count_nonzero(z.astype(np.float64) != offset.astype(np.float64) + 8 * s.astype(np.float64)))
    return z, inexact


def q4_0_int4(blocks):
    d = _f16(blocks, 0)[:, 0]  # (n,)
    return _nibbles(blocks[:, 2:]), d, np.zeros_like(d), 0  # codes (n, 32) in weight order


def q4_0_int8(blocks):
    codes = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)  # (n, 32) in -8..7
    return codes, _f16(blocks, 0)[:, 0], None, 0


def q4_1_int4(blocks):
    d, m = _f16(blocks, 0)[:, 0], _f16(blocks, 2)[:, 0]  # (n,) each
    z, inexact = _zero(m, d)  # x = d·q + m = (q - 8)·d + (m + 8·d)
    return _nibbles(blocks[:, 4:]), d, z, inexact


def q4_k_int4(blocks):
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, m = _scales_mins_k4(blocks[:, 4:16])  # (n, 8) six-bit integers
    s = (d * sc.astype(np.float32)).reshape(-1)  # (n·8,) one scale per 32-weight sub-block
    minimum = (dmin * m.astype(np.float32)).reshape(-1)
    z, inexact = _zero(-minimum, s)  # x = s·q - minimum = (q - 8)·s + (8·s - minimum)
    return _k4_codes(blocks[:, 16:]).reshape(-1, QK), s, z, inexact  # (n, 8, 32) -> (n·8, 32)


def q8_0_int8(blocks):
    return blocks[:, 2:].view(np.int8), _f16(blocks, 0)[:, 0], None, 0  # codes are a view of the file


def q5_0_int8(blocks):
    high = _bits(blocks[:, 2:6], QK)  # (n, 32) fifth bits
    codes = (_nibbles(blocks[:, 6:]) | (high << 4)).astype(np.int8) - np.int8(16)  # (n, 32) in -16..15
    return codes, _f16(blocks, 0)[:, 0], None, 0


# ggml type name -> {scheme: converter} for the types that map exactly; the first scheme is preferred
EXACT = {"Q4_0": {"int4": q4_0_int4, "int8": q4_0_int8}, "Q4_1": {"int4": q4_1_int4},
         "Q4_K": {"int4": q4_k_int4}, "Q8_0": {"int8": q8_0_int8}, "Q5_0": {"int8": q5_0_int8}}
FLOAT = ("F32", "F16", "BF16")  # kept float when a whole matrix is float


def natural_scheme(type_name: str) -> str | None:
    """The scheme a tensor of this ggml type is kept in on its own: exact if it can be, int8 for the
    wider types that cannot, None (stay float) for float tensors."""
    if type_name in EXACT:
        return next(iter(EXACT[type_name]))
    return None if type_name in FLOAT else "int8"


def _check_2d(f: GGUFFile, name: str):
    t = f.tensors[name]
    if len(t.shape) != 2:
        raise GGUFError(f"{f.path}: tensor {name!r} has shape {list(t.shape)}; a kept linear weight is 2-D")
    return t


def keep_tensor(f: GGUFFile, name: str, scheme: str) -> tuple[Kept, dict]:
    """One 2-D GGUF tensor (N, K) in `scheme` with group size 32: exact when its type maps onto the
    scheme, else dequantized and re-quantized. Returns (Kept, a report of what it cost)."""
    t = _check_2d(f, name)
    N, K = t.shape
    if K % G:
        raise GGUFError(f"{f.path}: tensor {name!r} has rows of {K} weights, not whole groups of {G}")
    convert = EXACT.get(t.type_name, {}).get(scheme)
    if convert is not None:
        blocks = f._data[t.offset:t.offset + t.n_bytes].reshape(-1, GGML_TYPES[t.type_id].type_size)
        codes, s, z, inexact = convert(blocks)  # groups are row-major: group g is row g // (K/32)
        kept = Kept(scheme, codes.reshape(N, K), s.reshape(N, K // G),
                    None if z is None else z.reshape(N, K // G), True, inexact)
        return kept, {"type": t.type_name, "scheme": scheme, "exact": True, "inexact_groups": inexact}
    start = time.perf_counter()
    w = torch.from_numpy(f.tensor(name))  # (N, K) float32: this tensor only
    q = quantize(w, scheme, G, int8_groups=True)  # quant_format's own quantizer: weight_q, scales (+ zeros)
    codes = q["weight_q"].numpy()
    if scheme == "int4":  # Kept holds int4 codes unpacked, like the exact path
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(N, K)  # (N, K/2, 2) -> (N, K)
    kept = Kept(scheme, codes, q["scales"].float().numpy(),
                q["zeros"].float().numpy() if "zeros" in q else None, False, 0)
    err = (_dequantized(kept) - w).abs().max().item()
    report = {"type": t.type_name, "scheme": scheme, "exact": False, "max_abs_error": err,
              "max_abs_weight": w.abs().max().item(), "seconds": round(time.perf_counter() - start, 4)}
    return kept, report


def _dequantized(kept: Kept) -> torch.Tensor:
    """Ŵ (N, K) float32 of a Kept weight, through the very module the model runs."""
    mod = _quant_linear([kept])
    return mod.dequantized_weight()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """quant_format.pack_int4's layout, packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4, done in numpy on
    codes known to be 0..15: 100× faster on our CPU than pack_int4's checked torch version (1.4 ms
    against 130 ms for a 1536 × 576 matrix), which was 19 of a 20-second SmolLM2 load."""
    c = codes.numpy()  # (N, K) uint8
    return torch.from_numpy(c[:, 0::2] | (c[:, 1::2] << 4))  # (N, K/2)


def _quant_linear(parts: list[Kept]) -> QuantLinear:
    """A QuantLinear (no bias, reference backend) whose rows are `parts` stacked (q, then k, then v)."""
    scheme = parts[0].scheme

    def stack(arrays):  # rows of q, k, v one after the other; a single part is used as it is
        return torch.from_numpy(np.ascontiguousarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays))

    codes = stack([p.codes for p in parts])  # (N, K)
    N, K = codes.shape
    # built on the meta device, then given the converted tensors: no zero-filled buffers to copy into
    mod = QuantLinear(K, N, False, scheme, G, "reference", device="meta", dtype=torch.float32)
    stored = {"weight_q": pack_nibbles(codes) if scheme == "int4" else codes, "scales": stack([p.scales for p in parts])}
    if scheme == "int4":
        stored["zeros"] = stack([p.zeros for p in parts])
    for key, value in stored.items():
        buf = getattr(mod, key)
        if buf.shape != value.shape or buf.dtype != value.dtype:  # the agreed layout, checked, not assumed
            raise ValueError(f"QuantLinear({scheme}, group_size={G}).{key} is {buf.dtype} {list(buf.shape)}; "
                             f"the GGUF gives {value.dtype} {list(value.shape)}")
        setattr(mod, key, value)  # replaces the registered buffer
    return mod


def _release(f: GGUFFile, name: str) -> None:
    """Drop a converted tensor's pages of the memory-mapped file from this process's memory.

    Pages of a mapped file that have been read count in the process's resident set (RSS) until the
    kernel needs them back; MADV_DONTNEED gives them back at once (they stay in the page cache, so a
    second read is cheap). Without it, loading would hold the quantized model *and* the whole file."""
    mm = getattr(f._data, "_mmap", None)  # np.memmap's mmap.mmap object
    if mm is None or not hasattr(mm, "madvise"):  # (not on every platform)
        return
    t = f.tensors[name]
    start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants a page-aligned start
    mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)


def kept_linear(f: GGUFFile, sources: tuple[str, ...], report: dict) -> nn.Module:
    """The GGUF tensors `sources`, stacked along their rows, as one QuantLinear (or a float nn.Linear
    when all are float). A matrix stacked from two schemes (say Q4_1 q/k and Q8_0 v) is int8 whole:
    the int8-exact parts stay exact, the others are re-quantized (int8 is the more precise of the two)."""
    natural = [natural_scheme(_check_2d(f, s).type_name) for s in sources]
    if all(n is None for n in natural):
        w = torch.from_numpy(np.concatenate([f.tensor(s) for s in sources]))  # (N, K) float32
        mod = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        mod.weight = nn.Parameter(w)
        for s in sources:
            report[s] = {"type": f.tensors[s].type_name, "scheme": "float", "exact": True}
        return mod
    schemes = {n for n in natural if n is not None}
    scheme = schemes.pop() if len(schemes) == 1 else "int8"
    parts = []
    for s in sources:
        kept, report[s] = keep_tensor(f, s, scheme)
        parts.append(kept)
    mod = _quant_linear(parts)
    for s in sources:
        _release(f, s)
    return mod


# --- the model ---------------------------------------------------------------------------------------

class _ParamsOnMeta(TorchFunctionMode):
    """Build a module's parameters on the meta device (shapes, no storage), everything else for real.

    `with torch.device("meta")` would do the first, but it also sends the RoPE table's torch.arange
    and nn.init's normal_ to meta kernels written in Python, whose first use imports torch._decomp and
    sympy: +150 MB of RSS, more than the int4 model itself. So only the factories that parameters come
    from (torch.empty / zeros / ones without a device) go to meta, and filling a meta tensor in place
    (normal_, uniform_, zero_, ...: there are no values to fill) is skipped. Buffers computed with
    other ops (Rotary's cos/sin) are built on the CPU as usual: they are small."""
    FACTORIES = (torch.empty, torch.zeros, torch.ones)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes it as tensor=...
        if name.endswith("_") and not name.startswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
            return target  # an in-place fill of a tensor without storage
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _check_shape(f: GGUFFile, ours: str, sources, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        shapes = ", ".join(f"{s} {list(f.tensors[s].shape)}" for s in sources)
        raise GGUFError(f"{f.path}: {shapes} do not make {ours} of shape {list(want)} "
                        "(the llama.* metadata and the tensors disagree)")


@torch.no_grad()
def build_kept_model(f: GGUFFile, cfg, wanted: dict[str, tuple[str, ...]]) -> tuple[CausalLM, dict]:
    """A CausalLM whose linears (and token embedding, and tied head) hold the GGUF's quantized blocks.

    wanted: minillm parameter name -> GGUF tensors (gguf_llama.llama_tensor_map). Returns (model, report)
    with report = {"tensors": {gguf name: how it was kept}, "exact": n, "requantized": n, "float": n,
    "inexact_groups": n}."""
    with _ParamsOnMeta():  # shapes only: no fp32 model is ever allocated
        model = CausalLM(cfg)
    per_tensor: dict[str, dict] = {}
    for ours, sources in wanted.items():
        path = ours.removesuffix(".weight")
        target = model.get_submodule(path)
        if ours == "transformer.tok_emb.weight":
            table = kept_linear(f, sources, per_tensor)  # (V, C) read as a Linear's (N, K) weight
            _check_shape(f, ours, sources, (table.out_features, table.in_features), target.weight.shape)
            if isinstance(table, QuantLinear):
                model.transformer.tok_emb = QuantEmbedding(table)
                if cfg.tie_weights:
                    model.lm_head = table  # one set of codes serves the lookup and the head
            else:
                model.transformer.tok_emb = nn.Embedding.from_pretrained(table.weight.data, freeze=False)
                if cfg.tie_weights:
                    model.lm_head.weight = model.transformer.tok_emb.weight
        elif isinstance(target, nn.Linear):
            mod = kept_linear(f, sources, per_tensor)
            _check_shape(f, ours, sources, (mod.out_features, mod.in_features), target.weight.shape)
            _replace(model, path, mod)
        else:  # a norm's weight: float, small
            w = torch.from_numpy(f.tensor(sources[0]))
            _check_shape(f, ours, sources, w.shape, target.weight.shape)
            target.weight = nn.Parameter(w)
            per_tensor[sources[0]] = {"type": f.tensors[sources[0]].type_name, "scheme": "float", "exact": True}
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not filled from the GGUF file: {left}"
    model.eval()

    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if quant:
        schemes = Counter(m.scheme for m in quant.values())
        scheme = schemes.most_common(1)[0][0]
        emb = isinstance(model.transformer.tok_emb, QuantEmbedding)
        model.quant_config = dict(scheme=scheme, group_size=G, include_embeddings=emb,
                                  include_head=isinstance(model.lm_head, QuantLinear), int8_groups=True,
                                  source="gguf",
                                  # the layers whose scheme is not `scheme` (e.g. SmolLM2's int8 table)
                                  schemes={n: m.scheme for n, m in quant.items() if m.scheme != scheme})
    kinds = Counter("float" if r["scheme"] == "float" else "exact" if r["exact"] else "requantized"
                    for r in per_tensor.values())
    report = {"tensors": per_tensor, "exact": kinds["exact"], "requantized": kinds["requantized"],
              "float": kinds["float"], "inexact_groups": sum(r.get("inexact_groups", 0) for r in per_tensor.values())}
    return model, report


def set_kept_backend(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Choose the matmul of a kept model's QuantLinears: `backend`, or with None the fastest that runs
    each one here (quant.default_backend: "cpu" on a CPU with a compiler, "triton" on CUDA), except that
    Triton's kernel has no grouped int8, so a Q8_0 table stays on "reference" there."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            want = backend or default_backend(m.weight_q.device)
            if backend is None and want == "triton" and m.scheme == "int8" and m.scales.dim() == 2:
                want = "reference"
            m.set_backend(want)
    return model
