"""QLoRA: LoRA adapters over a frozen 4-bit base (Dettmers et al. 2023).

LoRA (lora.py) already freezes W and trains only A and B. But a frozen W still sits in memory in
fp32: 540 MB for SmolLM2-135M, most of what a LoRA run holds. QLoRA's observation is that a weight
nobody trains need not be a float at all: keep it packed in 4 bits (int4, groups of 32: 5 bits per
weight with the group's scale and zero, 98 MB for SmolLM2 as its Q4_1 GGUF file stores it) and train
the adapters, in float, beside it:

    y = x Ŵᵀ + b + (α/r) · B A dropout(x)        Ŵ = dequantize(codes), never trained, never stored as floats

Two things make that work, and both are elsewhere so that nothing is written twice:
  * LoRALinear (lora.py) accepts a QuantLinear base: the same A, B, α/r, dropout and merge math,
    with the base computing x Ŵᵀ + b in its own backend (the C kernel on CPU, Triton on CUDA).
  * The gradient must reach the adapters of early blocks *through* the quantized layers of later
    ones: ∂L/∂x = ∂L/∂y · Ŵ. compress/quant_grad.py computes it with Ŵ dequantized again in the
    backward, one layer at a time, instead of letting autograd keep a float Ŵ per layer (which would
    bring the fp32 model back). The codes themselves get no gradient and never change.
(The paper's other two ideas are not here: NF4, a 4-bit code book fitted to normal weights, and paged
optimizers for GPU memory spikes. minillm's int4 is the affine format of compress/quant_format.py, and
SmolLM2's GGUF Q4_1 blocks are that format bit for bit, so the pulled file trains as it is.)

Merging. W' = Ŵ + (α/r)·B A cannot go back into 4 bits without rounding: an update learned in a few
hundred steps is mostly smaller than half a quantization step (bench/qlora.py measures the share), so
re-quantizing W' would round much of the fine-tune away. merge_lora therefore merges a QLoRA model into
a *float* model (every quantized layer dequantized: `dequantize_model` below), which computes exactly
what the adapter computed; `minillm quantize` re-quantizes it when wanted, knowing the cost. The
adapter alone (OUT/adapter/) stays the small artefact to keep.

    minillm finetune smollm2-135m-instruct --task=instruct --template=chat --lora_rank=8 --quantize=int4
    >>> lm, tok, meta = load_quantized_base("smollm2-135m-instruct", "int4")   # the GGUF's Q4_1, kept
    >>> apply_lora(lm, rank=8, targets=("qkv", "proj"))                      # lora.py, as for a float model
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.compress.quant import QuantEmbedding, QuantLinear, default_backend, quantize_model, set_backend

GROUP_SIZE = 32  # int4's group when a float model is quantized for QLoRA: GGUF's block, and the paper's 64 halved


def is_quantized(model: nn.Module) -> bool:
    """True if any layer holds quantized codes (a quantized checkpoint, a GGUF kept quantized, quantize_model)."""
    return hasattr(model, "quant_config") or any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def check_trainable(model: nn.Module, mode: str) -> None:
    """Only adapters train over a quantized base: its codes are integers, and have no gradient."""
    if mode != "lora" and is_quantized(model):
        what = "full fine-tuning" if mode == "full" else "freeze_trunk (a probe)"
        scheme = getattr(model, "quant_config", {}).get("scheme", "int4")
        raise ValueError(f"{what} needs float weights, and this base is quantized ({scheme}): train LoRA adapters "
                         f"over it (QLoRA: --lora_rank=8 --quantize={scheme}), or fine-tune the float checkpoint")


def load_quantized_base(path, scheme: str | None = "int4", device="cpu", backend: str | None = None):
    """(model, tokenizer, meta): the base of a QLoRA run, its linear layers in `scheme` ("int4" or "int8").

    A quantized checkpoint is used as it is (scheme None, or its own scheme); a GGUF file keeps its own
    blocks (Q4_0/Q4_1/Q4_K are int4 g32 bit for bit, Q8_0 int8 g32: no second rounding); anything else
    is loaded in float and quantized with quantize_model(scheme, group_size=32).
    """
    from minillm.weights.checkpoint import load_model

    lm, tokenizer, meta = load_model(path, device, backend, keep_quantized=True)  # (non-GGUF formats ignore it)
    if is_quantized(lm):
        held = lm.quant_config.get("scheme")
        if scheme is not None and held != scheme:
            raise ValueError(f"{path} holds {held} weights, not {scheme}: pass --quantize={held} to train over "
                             "them as they are (a second rounding would only lose accuracy)")
        return lm, tokenizer, meta
    if scheme is None:
        raise ValueError(f"{path} is not quantized: pass --quantize=int4 for QLoRA")
    quantize_model(lm, scheme, GROUP_SIZE, int8_groups=scheme == "int8")
    # The training forward runs in the layer's backend. On CPU the C kernel (which expands Ŵ once per
    # call at M = batch·T >= 16) took 2.5x less time than the reference's PyTorch dequantization for a
    # 576 -> 1536 int4 layer at M = 800 (bench/qlora.py's model; 2-core x86_64, loaded machine).
    set_backend(lm, backend or default_backend(next(lm.buffers()).device))
    return lm, tokenizer, meta


def quantized_weight_count(model: nn.Module) -> int:
    """Weights held as codes (in·out per quantized layer, a tied table once): parameters() does not see them."""
    layers = {id(m): m for m in model.modules() if isinstance(m, QuantLinear)}
    return sum(m.in_features * m.out_features for m in layers.values())


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Every quantized layer back to float, in place: QuantLinear -> nn.Linear (Ŵ), QuantEmbedding ->
    nn.Embedding, and a LoRALinear's quantized base -> its float weight and bias. Returns the model.

    A table shared by the embedding and the tied head becomes one float Parameter shared by both, so
    the model is tied as before. The float copy costs 4 bytes per weight: done once, when merging.
    """
    floats: dict[int, nn.Parameter] = {}  # id(QuantLinear) -> its Ŵ, made once even when shared

    def weight(q: QuantLinear) -> nn.Parameter:
        if id(q) not in floats:
            floats[id(q)] = nn.Parameter(q.dequantized_weight(q.scales.dtype), requires_grad=False)  # (N, K)
        return floats[id(q)]

    def bias(q: QuantLinear) -> nn.Parameter | None:
        return None if q.bias is None else nn.Parameter(q.bias.clone(), requires_grad=False)  # (N,)

    for parent in list(model.modules()):  # (every parent: a tied table is the child of two)
        # a LoRALinear over a quantized base (lora.py, which imports this file to merge: so it is
        # recognised by its `base` here rather than imported back)
        if isinstance(getattr(parent, "base", None), QuantLinear):
            q = parent.base
            parent.base = None
            parent.weight, parent.bias = weight(q), bias(q)
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")  # no storage
                linear.weight, linear.bias = weight(child), bias(child)
                setattr(parent, name, linear)
            elif isinstance(child, QuantEmbedding):
                table = child.table
                emb = nn.Embedding(table.out_features, table.in_features, device="meta")  # (V, C)
                emb.weight = weight(table)
                setattr(parent, name, emb)
    for m in model.modules():  # (a task model wrapping a quantized LM: the LM holds the record)
        if hasattr(m, "quant_config"):
            del m.quant_config
    return model


def frozen_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every quantized buffer (codes, scales, zeros): what a QLoRA run must leave unchanged."""
    return {name: t.detach().clone() for name, t in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("weight_q", "scales", "zeros")}
