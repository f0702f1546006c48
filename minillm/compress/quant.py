"""Weight-only quantization, written out: int8 per output channel and int4 per group of K.

Decoding one token reads every weight once and does only two FLOPs with it, so a decoder at batch 1
is limited by memory bandwidth, not arithmetic: storing weights in 8 or 4 bits instead of 16 moves
2-4× fewer bytes per token. Activations stay in floating point ("weight-only", as in LLM.int8's
weight path, GPTQ/AWQ's kernels and gpt-fast); a weight is turned back into a float right before
it is multiplied ("dequantized").

int8, symmetric, one scale per output channel (row n of W, shape (N, K)):
    s[n]      = max_k |W[n, k]| / 127
    q[n, k]   = round(W[n, k] / s[n])            in -127..127 (-128 unused: keeps the grid symmetric)
    Ŵ[n, k]   = q[n, k] · s[n]                   |W - Ŵ| ≤ s[n] / 2

int4, asymmetric, one scale and one zero per group of G consecutive inputs (G = 32/64/128/256):
    lo, hi    = min and max of the group
    s         = (hi - lo) / 15                   16 levels span the group's range exactly
    z         = lo + 8·s                         the real value that the middle code 8 stands for
    q         = round((W - z) / s) + 8           in 0..15
    Ŵ         = (q - 8)·s + z                    |W - Ŵ| ≤ s / 2
The zero is a float in the weights' units (torch's tinygemm `_weight_int4pack_mm` and HQQ use the
same form), not the integer zero point of Jacob et al. (2018): weight-only kernels never do integer
arithmetic with it, and a float zero lets the 16 levels hit lo and hi exactly. Centring it on code 8
keeps |z| ≤ half the group's range for typical groups, so storing z in bf16 loses almost nothing.

int4 packing, two codes per byte, neighbours along K share a byte:
    packed[n, j] = q[n, 2j] | (q[n, 2j+1] << 4)          packed: (N, K/2) uint8, row-major
so row n of the packed matrix is row n of W at half the bytes, a K-tile of a row is one contiguous
run of bytes, and a kernel reads code k as (packed[n, k // 2] >> 4·(k % 2)) & 0xF.
Scales and zeros are (N, K/G), in the weights' float dtype.

    >>> model = quantize_model(model, "int4", group_size=64)     # swaps nn.Linear -> QuantLinear
    >>> set_backend(model, "triton")                             # fused Triton kernel (CUDA)

Quantized checkpoints are saved and loaded like any other (minillm/weights/checkpoint.py); `minillm quantize`
(minillm/compress/quantize.py) quantizes a saved one and reports what it cost.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
BACKENDS = ("reference", "triton")


# --- int8: symmetric, per output channel -----------------------------------------------------

def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype | None = None):
    """W (N, K) float -> (q (N, K) int8, scales (N,)). Scales are kept in `scale_dtype` (default W's)."""
    _check_weight(w)
    amax = w.float().abs().amax(dim=1)  # (N,)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row gets scale 1
    # round the scale to the dtype it is stored in *before* computing q, so q matches what is kept
    scale = scale.to(scale_dtype or w.dtype).float()
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale.to(scale_dtype or w.dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(q (N, K) int8, scales (N,)) -> Ŵ (N, K) = q · s, computed in fp32 and returned in `dtype`."""
    return (q.float() * scales.float()[:, None]).to(dtype)


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
    _check_group(K, group_size)
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


def quantize(w: torch.Tensor, scheme: str, group_size: int = 128) -> dict[str, torch.Tensor]:
    """W -> the tensors a QuantLinear stores, by name: weight_q, scales (+ zeros for int4)."""
    if scheme == "int8":
        q, s = quantize_int8(w)
        return {"weight_q": q, "scales": s}
    if scheme == "int4":
        q, s, z = quantize_int4(w, group_size)
        return {"weight_q": q, "scales": s, "zeros": z}
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def dequantize(scheme: str, weight_q, scales, zeros=None, dtype=torch.float32) -> torch.Tensor:
    if scheme == "int8":
        return dequantize_int8(weight_q, scales, dtype)
    return dequantize_int4(weight_q, scales, zeros, dtype)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"expected a 2-D float weight (N, K), got {w.dtype} {tuple(w.shape)}")


def _check_group(K: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if K % group_size != 0:
        raise ValueError(f"K={K} input features are not divisible by group_size={group_size}; "
                         f"pick a group size dividing {K}")


def default_backend(device: torch.device | str) -> str:
    """"triton" for CUDA weights when triton is installed, else "reference" — decided once, here."""
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
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str,
                 group_size: int = 128, backend: str = "reference", device=None, dtype=torch.float32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        N, K = out_features, in_features
        self.in_features, self.out_features, self.scheme = K, N, scheme
        self.group_size = group_size if scheme == "int4" else None
        if scheme == "int8":
            self.register_buffer("weight_q", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, dtype=dtype, device=device))
            self.zeros = None
        else:
            _check_group(K, group_size)
            self.register_buffer("weight_q", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // group_size, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(N, K // group_size, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        self.set_backend(backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 128,
                    backend: str | None = None) -> "QuantLinear":
        w = linear.weight.detach()
        backend = backend or default_backend(w.device)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size,
                  backend, device=w.device, dtype=w.dtype)
        for name, t in quantize(w, scheme, group_size).items():
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
            self._kernel = quant_matmul.quant_matmul
        self.backend = backend

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.scheme, self.weight_q, self.scales, self.zeros, dtype)  # (N, K)

    @property
    def weight(self) -> torch.Tensor:
        """Ŵ as a float (N, K) tensor, computed on each access: code that asks a linear layer for its
        weight (e.g. CausalLM.new_cache, for the device and dtype) still works on a QuantLinear."""
        return self.dequantized_weight(self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
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


def quantize_model(model: nn.Module, scheme: str, group_size: int = 128, include_embeddings: bool = False,
                   include_head: bool = False, backend: str | None = None) -> nn.Module:
    """Swap the model's nn.Linear layers for QuantLinear, in place; returns the model.

    The output head (`lm_head` / `decoder`) and the token embedding stay in floating point unless
    asked: they are the layers most sensitive to quantization, and in small models they are a large
    share of the weights. With tied weights (tie_weights=True) head and embedding are ONE matrix,
    so they are quantized together (both flags) or not at all: quantizing one side only would keep
    the float table and add a quantized copy — more bytes, not fewer.
    `backend` None picks per layer: "triton" on CUDA with triton installed, else "reference".
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
                setattr(parent, name, QuantLinear.from_linear(child, scheme, group_size, backend))
    if include_embeddings:
        as_linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device=emb.weight.device,
                              dtype=emb.weight.dtype)
        as_linear.weight = emb.weight  # the (V, C) table read as a Linear's (N, K) weight
        table = QuantLinear.from_linear(as_linear, scheme, group_size, backend)
        model.transformer.tok_emb = QuantEmbedding(table)
        if tied:
            setattr(model, head_name, table)  # one set of codes serves the lookup and the head
    model.quant_config = dict(scheme=scheme, group_size=group_size if scheme == "int4" else None,
                              include_embeddings=include_embeddings, include_head=include_head)
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose the matmul of every QuantLinear in `model`: "reference" or "triton"."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(backend)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of what a checkpoint stores (the state dict), each shared (tied) tensor counted once."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())
