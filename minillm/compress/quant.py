"""Weight-only quantization of a model: QuantLinear, and the swap that puts it in place of nn.Linear.

Decoding one token reads every weight once and does only two FLOPs with it, so a decoder at batch 1
is limited by memory bandwidth, not arithmetic: weights stored in 8 or 4 bits instead of 16 move
2-4× fewer bytes per token. Activations stay in floating point ("weight-only", as in LLM.int8's
weight path, GPTQ/AWQ's kernels and gpt-fast); a weight is turned back into a float right before
it is multiplied ("dequantized"). The formats (int8 per output channel, int4 per group of K, packed
two codes per byte) and their math are in quant_format.py.

The matmul is chosen by an explicit switch, per layer: backend "reference" dequantizes in PyTorch
(what a student reads); "triton" calls kernels/quant_matmul.py (CUDA), "cpu" the C kernel of
cpu_kernel.py (compiled on first use; int8 activations per block of 32, as llama.cpp), each imported
only when that backend is set. The kernels import quant_format.py, never this file.

    >>> model = quantize_model(model, "int4", group_size=64)     # swaps nn.Linear -> QuantLinear
    >>> set_backend(model, "triton")                             # fused Triton kernel (CUDA)
    >>> set_backend(model, "cpu")                                # the C kernel (CPU)

Quantized checkpoints are saved and loaded like any other (minillm/weights/checkpoint.py); `minillm
quantize` (minillm/compress/quantize.py) quantizes a saved one and reports what it cost.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# The formats live in quant_format.py (where the kernel can take them too); their names are
# re-exported here so that `from minillm.compress.quant import quantize_int4` keeps working.
from minillm.compress.quant_format import (GROUP_SIZES, SCHEMES, check_group, dequantize, dequantize_int4,
                                           dequantize_int8, pack_int4, quantize, quantize_int4, quantize_int8,
                                           unpack_int4)

BACKENDS = ("reference", "triton", "cpu", "cpu-exact")

__all__ = ["BACKENDS", "GROUP_SIZES", "SCHEMES", "QuantEmbedding", "QuantLinear", "default_backend", "dequantize",
           "dequantize_int4", "dequantize_int8", "pack_int4", "quantize", "quantize_int4", "quantize_int8",
           "quantize_model", "set_backend", "unpack_int4", "weight_bytes"]


def default_backend(device: torch.device | str) -> str:
    """The backend that runs here, decided once, here: "triton" for CUDA weights when triton is
    installed; for CPU weights, when the C kernel compiles and loads, "cpu-exact" where its exact tiles
    are compiled in (AVX-512 or AVX2: the reference's answer, at 0.9x the 8-bit path's speed with
    AVX-512 and 0.8x with AVX2 only, SmolLM2 batch 1), else "cpu" (8-bit activations); else
    "reference". The reference's tokens are worth those 10-20%: `backend="cpu"` is one switch away."""
    if torch.device(device).type == "cpu":
        from minillm.compress import cpu_kernel

        if not cpu_kernel.available():
            return "reference"
        return "cpu-exact" if cpu_kernel.exact_is_fast() else "cpu"
    if torch.device(device).type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reference"
    return "triton"


# --- modules ---------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """y = x @ Ŵᵀ + b with Ŵ stored quantized. Inference only (the codes have no gradient).

    backend "reference": dequantize the whole matrix in PyTorch, then F.linear — what a student reads.
    backend "triton":    minillm.kernels.quant_matmul, dequantizing inside the matmul's load path.
    backend "cpu":       minillm.compress.cpu_kernel, integer dots with 8-bit activations (C, AVX2).
    backend "cpu-exact": the same C kernel with float activations and Ŵ expanded value for value:
                         the reference's answer up to the order of the sums (AVX-512 or AVX2 tiles).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str,
                 group_size: int | None = None, backend: str = "reference", device=None, dtype=torch.float32):
        """group_size: int4's group (None = 128); for int8, None = one scale per output channel and
        G = one scale per group of G inputs (GGUF's Q8_0 is int8 with G = 32). Scales and zeros may
        later be replaced by tensors of another float dtype (e.g. fp32 in a bf16 model): every
        backend reads them in fp32."""
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        N, K = out_features, in_features
        self.in_features, self.out_features, self.scheme = K, N, scheme
        G = self.group_size = (group_size or 128) if scheme == "int4" else group_size
        if G is not None:
            check_group(K, G)
        if scheme == "int8":
            self.register_buffer("weight_q", torch.zeros(N, K, dtype=torch.int8, device=device))
            scale_shape = (N,) if G is None else (N, K // G)  # per output channel, or per group
            self.register_buffer("scales", torch.ones(scale_shape, dtype=dtype, device=device))
            self.zeros = None
        else:
            self.register_buffer("weight_q", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // G, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(N, K // G, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        self.set_backend(backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = 128,
                    backend: str | None = None, *, int8_groups: bool = False) -> "QuantLinear":
        """Quantize an nn.Linear. `group_size` is int4's group; int8 stays per output channel unless
        int8_groups=True (then it is int8's group too)."""
        w = linear.weight.detach()
        # on CPU the construction stays on the reference (no compiler run to build a model); loading
        # a checkpoint or `minillm generate` then picks default_backend, "cpu" where it compiles
        backend = backend or ("reference" if w.device.type == "cpu" else default_backend(w.device))
        if scheme == "int8" and not int8_groups:
            group_size = None
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size,
                  backend, device=w.device, dtype=w.dtype)
        for name, t in quantize(w, scheme, group_size, int8_groups=int8_groups).items():
            getattr(mod, name).copy_(t)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "triton":
            from minillm.kernels import quant_matmul  # fails with the install hint when triton is missing
            if self.weight_q.device.type == "cpu" and not quant_matmul.INTERPRETED:
                raise ValueError("backend='triton' runs on CUDA: move the model to the GPU first, then "
                                 "set the backend (or set TRITON_INTERPRET=1 before importing triton to "
                                 "run the kernels slowly on CPU)")
            if self.scheme == "int8" and self.scales.dim() == 2:
                raise ValueError("backend='triton' runs int8 with one scale per output channel only; "
                                 "grouped int8 (e.g. a GGUF's Q8_0) runs on 'reference' or 'cpu'")
            self._kernel = quant_matmul.quant_matmul
        if backend in ("cpu", "cpu-exact"):
            from minillm.compress import cpu_kernel

            if self.weight_q.device.type != "cpu":
                raise ValueError(f"backend={backend!r} runs on CPU weights; on CUDA use 'triton' or 'reference'")
            if not cpu_kernel.available():  # never a crash: say why once, and stay on the reference
                warnings.warn(f"backend={backend!r} unavailable: {cpu_kernel.why_unavailable()}", stacklevel=2)
                backend = "reference"
            self._cpu = None  # built on the first call, from the tensors the layer then holds
        self.backend = backend

    def _cpu_layer(self):
        """The C kernel's description of this layer, rebuilt whenever a buffer has been replaced
        (e.g. by .to() or a loader assigning new tensors); in-place copies need no rebuild."""
        bufs = self._buffers  # (read directly: a module attribute lookup costs ~1 µs, per call)
        if self._cpu is None or not self._cpu.describes(bufs["weight_q"], bufs["scales"], bufs.get("zeros"),
                                                        bufs["bias"]):
            from minillm.compress.cpu_kernel import CpuLayer

            self._cpu = CpuLayer(self.weight_q, self.scales, self.zeros, self.bias, self.scheme,
                                 exact=self.backend == "cpu-exact")
        return self._cpu

    def bound_forward(self):
        """x -> self(x) for a decode step (model/layers.py bound_forward, generate/flat.py): on the C
        backends the kernel's call with this layer's tensors as they are now, without the checks
        forward makes on every call; forward itself elsewhere."""
        if self.backend[:3] == "cpu" and not self.weight_q.requires_grad:
            return self._cpu_layer().bound_call()
        return self.forward

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.scheme, self.weight_q, self.scales, self.zeros, dtype)  # (N, K)

    @property
    def weight(self) -> torch.Tensor:
        """Ŵ as a float (N, K) tensor, computed on each access: code that asks a linear layer for its
        weight (e.g. CausalLM.new_cache, for the device and dtype) still works on a QuantLinear."""
        return self.dequantized_weight(self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if x.requires_grad and torch.is_grad_enabled():  # training through a frozen layer (QLoRA): Ŵ is
            from minillm.compress.quant_grad import quant_linear  # recomputed in the backward, never kept

            return quant_linear(x, self)
        if self.backend[:3] == "cpu" and not x.requires_grad:  # "cpu" or "cpu-exact" (no backward)
            return self._cpu_layer()(x)
        if self.backend == "triton":
            return self._kernel(x, self.weight_q, self.scales, self.zeros, self.bias, self.scheme, self.group_size)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{group}, backend={self.backend}")


class QuantEmbedding(nn.Module):
    """A quantized lookup table (V, C): each row is a token's vector, quantized like a QuantLinear's
    weight (int8 per row; int4 per group of C). Looks up codes, then dequantizes only those rows."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table  # shares its buffers with the (tied) output head when there is one

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        t = self.table
        rows = idx.reshape(-1)  # (B*T,)
        zeros = t.zeros[rows] if t.zeros is not None else None
        w = dequantize(t.scheme, t.weight_q[rows], t.scales[rows], zeros, t.scales.dtype)  # (B*T, C)
        return w.reshape(*idx.shape, -1)


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = 128, include_embeddings: bool = False,
                   include_head: bool = False, backend: str | None = None, *,
                   int8_groups: bool = False) -> nn.Module:
    """Swap the model's nn.Linear layers for QuantLinear, in place; returns the model.

    The output head (`lm_head` / `decoder`) and the token embedding stay in floating point unless
    asked: they are the layers most sensitive to quantization, and in small models they are a large
    share of the weights. With tied weights (tie_weights=True) head and embedding are ONE matrix,
    so they are quantized together (both flags) or not at all: quantizing one side only would keep
    the float table and add a quantized copy — more bytes, not fewer.
    `backend` None picks per layer: "triton" on CUDA with triton installed, else "reference".
    `group_size` is int4's group (None = 128); int8 keeps one scale per output channel unless
    `int8_groups=True`, which gives it one scale per group of `group_size` inputs.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if hasattr(model, "quant_config"):
        raise ValueError("this model is already quantized")
    head_name = "lm_head" if hasattr(model, "lm_head") else "decoder"
    head, emb = getattr(model, head_name, None), model.transformer.tok_emb
    tied = head is not None and head.weight is emb.weight
    if tied and include_head != include_embeddings:
        raise ValueError(
            f"{head_name} and transformer.tok_emb share one matrix (tie_weights=True): pass "
            "include_head and include_embeddings together to quantize it once, or neither")
    skip = set() if include_head else {head_name}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (parent is model and name in skip):
                if tied and child is head:
                    continue  # done below, together with the embedding
                setattr(parent, name, QuantLinear.from_linear(child, scheme, group_size, backend,
                                                              int8_groups=int8_groups))
    if include_embeddings:
        as_linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device=emb.weight.device,
                              dtype=emb.weight.dtype)
        as_linear.weight = emb.weight  # the (V, C) table read as a Linear's (N, K) weight
        table = QuantLinear.from_linear(as_linear, scheme, group_size, backend, int8_groups=int8_groups)
        model.transformer.tok_emb = QuantEmbedding(table)
        if tied:
            setattr(model, head_name, table)  # one set of codes serves the lookup and the head
    grouped = scheme == "int4" or int8_groups
    model.quant_config = dict(scheme=scheme, group_size=(group_size or 128) if grouped else None,
                              include_embeddings=include_embeddings, include_head=include_head)
    if scheme == "int8" and int8_groups:
        model.quant_config["int8_groups"] = True  # read back by weights/checkpoint.py's load_model
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose the matmul of every QuantLinear in `model`: "reference", "triton", "cpu" or "cpu-exact"."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(backend)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of what a checkpoint stores (the state dict), each shared (tied) tensor counted once."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())
