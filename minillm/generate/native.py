"""A decode step whose layer stack runs in C, for a Llama-family model on the CPU (quantized or fp32).

FlatDecoder (generate/flat.py) took the module tree out of a decode step; what is left is ~25 small
PyTorch ops per layer around the matmuls. For SmolLM2-135M kept quantized (30 layers) on our 2-core
CPU, the matmuls of a token took ~14 ms and those small ops ~6 ms more: each costs a few µs of
dispatch to touch a few hundred numbers. NativeDecoder hands the whole stack to one C function
(minillm/compress/csrc/decode_cpu.c, built with the quantized matmul it calls): the norms, RoPE, the
cache write, attention and SwiGLU become loops in C, written out there op by op as the modules run
them. Python keeps the two ends: the embedding lookup before, the final norm and the head after.
Measured on that model and CPU: 52.6 -> ~113 tokens/s at batch 1 (fp32 weights: 35.3 -> 39.4, where
reading 540 MB a token is the bound); docs/guides/real-models.md has the whole table.

    >>> dec = FlatDecoder.build(model)        # a NativeDecoder where it applies (why_not(model) == "")
    >>> logits = dec.step(idx, cache)         # the same call as FlatDecoder.step

It applies to what it can run exactly as the modules define it (`why_not` checks each, in one line):
a CausalLM in eval mode without hooks, pre-norm RMSNorm blocks, rotary positions, SwiGLU, causal
attention without a sliding window, and the five linears of every block either QuantLinear on the
"cpu" or "cpu-exact" backend (int8 or int4, any group) or fp32 nn.Linear (a dot per weight row, in
C). A step whose inputs it does not take (padded rows, a cache of another type or dtype, activations
not fp32) runs the FlatDecoder's step instead, for that step.

Not bit for bit: C sums in its own order (RMSNorm's mean, softmax), so logits differ from the flat
step's by ~1e-6 relative; tests/test_native_decode.py holds them close and the greedy tokens equal.
`minillm generate`/`chat` use it whenever it applies (flat_decode=True); `--readable` runs the modules.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model.attention import KVCache
from minillm.model.layers import RMSNorm, silu
from minillm.model.positional import Rotary


class _DecLayer(ctypes.Structure):  # csrc/decode_cpu.c's DecLayer, field for field
    _fields_ = [("qkv", ctypes.c_void_p), ("proj", ctypes.c_void_p), ("gate", ctypes.c_void_p),
                ("up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("norm1", ctypes.c_void_p),
                ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]


class _DecModel(ctypes.Structure):  # csrc/decode_cpu.c's DecModel
    _fields_ = [("n_layer", ctypes.c_int64), ("C", ctypes.c_int64), ("H", ctypes.c_int64), ("H_kv", ctypes.c_int64),
                ("D", ctypes.c_int64), ("F", ctypes.c_int64), ("max_pos", ctypes.c_int64),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("layers", ctypes.c_void_p)]


class _FloatLayer:
    """An fp32 nn.Linear described to C as a QLayer with bits = 32 (decode_cpu.c's linear_f32)."""

    def __init__(self, lin: nn.Linear):
        from minillm.compress.cpu_kernel import _QLayer

        w = lin.weight.detach().contiguous()
        b = lin.bias.detach().float().contiguous() if lin.bias is not None else None
        self.tensors = (w, b)  # kept alive: C holds their addresses
        self.desc = _QLayer(w.data_ptr(), w.shape[0], w.shape[1], 0, 32, 0, 0, 0, None, None,
                            b.data_ptr() if b is not None else None)
        self.addr = ctypes.addressof(self.desc)


def _norm(m: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMSNorm (minillm's or PyTorch's) with an fp32 weight, else None."""
    if type(m) is RMSNorm:
        w, eps = m.weight, m.eps
    elif type(m) is nn.RMSNorm and m.weight is not None and len(m.normalized_shape) == 1:
        w, eps = m.weight, m.eps if m.eps is not None else torch.finfo(torch.float32).eps
    else:
        return None
    return (w, eps) if w.dtype == torch.float32 and w.is_cpu else None


def why_not(model: nn.Module) -> str:
    """"" when NativeDecoder runs a model FlatDecoder.build accepts (a CausalLM in eval mode without
    hooks, of layer types it knows); otherwise the first reason it does not, in one line."""
    from minillm.compress import cpu_kernel
    from minillm.compress.quant import QuantLinear
    from minillm.model.layers import FeedForward

    cfg, tr = model.cfg, model.transformer
    if not cfg.prenorm or not cfg.causal or cfg.sliding_window is not None:
        return "only pre-norm, causal attention without a sliding window"
    if tr.pos_emb is not None or tr.final_norm is None or _norm(tr.final_norm) is None:
        return "only rotary positions and a final RMSNorm (fp32)"
    for i, block in enumerate(tr.blocks):
        attn, ffn = block.attn, block.ffn
        if _norm(block.norm1) is None or _norm(block.norm2) is None:
            return f"block {i}: norms must be RMSNorm with fp32 weights"
        if type(attn.rotary) is not Rotary or attn.rotary.cos.dtype != torch.float32:
            return f"block {i}: attention must use rotary positions (fp32 tables)"
        if type(ffn) is not FeedForward or ffn.gate is None or ffn.act not in (silu, F.silu):
            return f"block {i}: the FFN must be SwiGLU"
        for name, lin in (("qkv", attn.qkv), ("proj", attn.proj), ("gate", ffn.gate), ("up", ffn.up),
                          ("down", ffn.down)):
            if type(lin) is QuantLinear and lin.backend not in ("cpu", "cpu-exact"):
                return (f"block {i}: {name} is a QuantLinear on {lin.backend}; the C step runs the 'cpu' and "
                        "'cpu-exact' backends")
            if type(lin) is nn.Linear and (lin.weight.dtype != torch.float32 or not lin.weight.is_cpu):
                return (f"block {i}: {name} is {lin.weight.dtype} on {lin.weight.device}; float linears must be "
                        "fp32 on CPU")
            if type(lin) not in (QuantLinear, nn.Linear):
                return f"block {i}: {name} is a {type(lin).__name__} (e.g. LoRA): only nn.Linear and QuantLinear"
    if not cpu_kernel.available():
        return f"the C kernel is unavailable: {cpu_kernel.why_unavailable()}"
    return ""


class NativeDecoder:
    """`step(idx (B, 1), cache, positions, key_padding_mask) -> logits (B, V)`, FlatDecoder's call.
    Built by FlatDecoder.build, with the model's FlatDecoder: the ends of the step (embedding,
    final norm, head) and every step the C function does not take."""

    def __init__(self, model: nn.Module, flat):
        from minillm.compress import cpu_kernel

        self.lib = cpu_kernel.load()
        self.flat = flat
        cfg, tr = model.cfg, model.transformer
        self.cfg = cfg
        layers, self.keep = [], []  # keep: every object whose address the C structures hold
        for block in tr.blocks:
            attn, ffn = block.attn, block.ffn
            descs = [lin._cpu_layer() if type(lin) is not nn.Linear else _FloatLayer(lin)
                     for lin in (attn.qkv, attn.proj, ffn.gate, ffn.up, ffn.down)]
            (w1, e1), (w2, e2) = _norm(block.norm1), _norm(block.norm2)
            w1, w2 = w1.detach().contiguous(), w2.detach().contiguous()
            self.keep += [*descs, w1, w2]
            layers.append(_DecLayer(*(d.addr for d in descs), w1.data_ptr(), w2.data_ptr(), e1, e2))
        self.layers = (_DecLayer * len(layers))(*layers)
        rot = tr.blocks[0].attn.rotary
        cos, sin = rot.cos.contiguous(), rot.sin.contiguous()
        self.keep += [cos, sin]
        F_ = tr.blocks[0].ffn.up.out_features
        self.desc = _DecModel(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, F_, cos.shape[0],
                              cos.data_ptr(), sin.data_ptr(), ctypes.addressof(self.layers))
        self.addr = ctypes.addressof(self.desc)

    def step(self, idx: torch.Tensor, cache, positions: torch.Tensor | None = None,
             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """FlatDecoder.step's contract: idx (B, 1) -> logits (B, V), the cache advanced by one."""
        B, flat = idx.shape[0], self.flat
        if (positions is not None or key_padding_mask is not None or type(cache) is not KVCache
                or cache.window is not None or cache.k.dtype != torch.float32 or cache.k.shape[1] != B
                or not cache.k.is_contiguous() or cache.length + 1 > self.cfg.block_size):
            return flat.step(idx, cache, positions, key_padding_mask)  # padded rows, another cache: Python
        x = flat.embed(idx)  # (B, 1, C)
        if flat.embed_scale != 1.0:
            x = x * flat.embed_scale
        if x.dtype != torch.float32:
            return flat.step(idx, cache, positions, key_padding_mask)
        x = x.contiguous()  # a fresh tensor (the lookup's output), updated in place by the C step
        rc = self.lib.minillm_decode_step(self.addr, x.data_ptr(), B, cache.length, cache.k.data_ptr(),
                                          cache.v.data_ptr(), cache.k.shape[3], torch.get_num_threads())
        if rc:
            raise MemoryError(f"the C decode step failed (code {rc}: -1 no memory, -2 position out of range)")
        cache.advance(1)
        return flat.lm_head(flat.final_norm(x))[:, -1]  # (B, V)
