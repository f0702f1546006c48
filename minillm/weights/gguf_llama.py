"""A llama-architecture GGUF file (SmolLM2, Llama 2/3, Mistral as llama.cpp converts them) as a minillm CausalLM.

    >>> model, info = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # every weight dequantized to fp32
    >>> model, tokenizer, meta = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # the same, via checkpoint.py
    >>> model, info = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", keep_quantized=True)   # blocks kept

The shape of the model comes from the `llama.*` metadata keys; the weights from the tensors, named
the llama.cpp way (Linear weights are (out, in) once gguf.py has reversed ggml's dimension order):

    token_embd / output_norm / output   → transformer.tok_emb / transformer.final_norm / lm_head
                                          (no output.weight: the head is tied to the embedding)
    blk.{i}.attn_norm, ffn_norm         → blocks.{i}.norm1, norm2
    blk.{i}.attn_q | attn_k | attn_v    → blocks.{i}.attn.qkv (rows stacked q, k, v)
    blk.{i}.attn_output                 → blocks.{i}.attn.proj
    blk.{i}.ffn_gate, ffn_up, ffn_down  → blocks.{i}.ffn.gate, up, down

RoPE layouts. Hugging Face Llama rotates channel c of each head with channel c + D/2 ("rotate_half");
llama.cpp rotates 2c with 2c+1. Its convert script therefore permutes the rows of every q and k
weight, per head, moving HF channel c to 2c and c + D/2 to 2c+1 (`permute` in convert_hf_to_gguf.py,
undone by transformers when it loads a GGUF). minillm's Rotary (model/positional.py) rotates 2c with
2c+1 too, which is why huggingface.py applies that same permutation (half_to_interleaved): GGUF's
q and k rows are already in minillm's order, and are copied as they are. tests/test_gguf.py holds
this to transformers' logits on the same file.

Weights are dequantized one tensor at a time straight into the model's parameters, so the peak
memory is the fp32 model plus one tensor, plus the memory-mapped file's pages. With keep_quantized=True
they are not dequantized at all: Q4_0/Q4_1/Q4_K blocks become minillm's int4 (group 32) and Q8_0
int8 (group 32) bit for bit, in QuantLinear / QuantEmbedding modules (gguf_keep.py says how and
what the other types cost), and no fp32 copy of the model is ever made.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.weights.gguf import GGUFError, GGUFFile, read_gguf

ARCHITECTURES = ("llama",)  # general.architecture values load_gguf runs

# llama.cpp's per-block tensor names (gguf-py's MODEL_TENSORS[LLAMA]) that minillm does not map,
# and why. Anything else a file holds that is not in llama_tensor_map is refused by name too.
IGNORED = {"blk.{i}.attn_rot_embd": "a precomputed RoPE table from old conversions; Rotary recomputes it"}
REFUSED = {
    "rope_freqs": "per-pair RoPE frequency factors (Llama 3.1 scaling) without the parameters minillm's "
                  "llama3 rope_scaling needs",
    "blk.{i}.ffn_gate_inp": "a mixture-of-experts router", "blk.{i}.ffn_gate_exps": "mixture-of-experts FFNs",
    "blk.{i}.ffn_up_exps": "mixture-of-experts FFNs", "blk.{i}.ffn_down_exps": "mixture-of-experts FFNs",
}


def llama_tensor_map(n_layer: int, tied: bool) -> dict[str, tuple[str, ...]]:
    """minillm parameter name -> the GGUF tensors (".weight" names) stacked along dim 0 to make it."""
    out = {"transformer.tok_emb.weight": ("token_embd.weight",),
           "transformer.final_norm.weight": ("output_norm.weight",)}
    if not tied:
        out["lm_head.weight"] = ("output.weight",)
    for i in range(n_layer):
        g, b = f"blk.{i}.", f"transformer.blocks.{i}."
        out[b + "norm1.weight"] = (g + "attn_norm.weight",)
        out[b + "attn.qkv.weight"] = tuple(f"{g}attn_{x}.weight" for x in "qkv")  # (H·D + 2·H_kv·D, C)
        out[b + "attn.proj.weight"] = (g + "attn_output.weight",)
        out[b + "norm2.weight"] = (g + "ffn_norm.weight",)
        for x in ("gate", "up", "down"):
            out[f"{b}ffn.{x}.weight"] = (f"{g}ffn_{x}.weight",)
    return out


def _decimal(x: float) -> float:
    """The shortest decimal that a float32 metadata value is the rounding of: 1e-05, not the
    9.999999747378752e-06 that float32 stores (the converter wrote 1e-5)."""
    return float(str(np.float32(x)))


def llama_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig from a llama GGUF's metadata (keys "llama.*") and its token embedding's shape."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not one minillm runs from GGUF "
                        f"(it runs {', '.join(ARCHITECTURES)})")
    md = f.metadata

    def key(name, default=None):
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{f.path}: metadata {arch}.{name} is missing")
        return value

    if key("expert_count", 0):
        raise GGUFError(f"{f.path}: a mixture-of-experts model ({key('expert_count')} experts); minillm "
                        "runs dense llama models only")
    C, H = key("embedding_length"), key("attention.head_count")
    H_kv = key("attention.head_count_kv", H)
    if C % H:
        raise GGUFError(f"{f.path}: embedding_length {C} is not divisible by head_count {H}")
    D = C // H
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if key(name, D) != D:
            raise GGUFError(f"{f.path}: {arch}.{name}={key(name)} differs from embedding_length/head_count={D}: "
                            "not supported")
    scaling = {"rope_scaling": None}
    kind = key("rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_scaling": "linear", "rope_factor": float(key("rope.scaling.factor"))}
    elif kind != "none":
        raise GGUFError(f"{f.path}: rope scaling {kind!r} is not supported (minillm reads none and linear)")
    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path}: no token_embd.weight tensor")
    try:
        return ModelConfig(
            vocab_size=f.tensors["token_embd.weight"].shape[0], block_size=key("context_length"),
            n_layer=key("block_count"), n_head=H, n_kv_head=H_kv if H_kv != H else None, n_embd=C,
            ffn_hidden=key("feed_forward_length"), positional="rotary", activation="swiglu", norm="rmsnorm",
            norm_eps=_decimal(key("attention.layer_norm_rms_epsilon")), bias=False,
            rope_base=_decimal(key("rope.freq_base", 10000.0)), tie_weights="output.weight" not in f.tensors,
            **scaling)
    except ValueError as e:
        raise GGUFError(f"{f.path}: {e}") from None


def _check_names(f: GGUFFile, wanted: dict[str, tuple[str, ...]], n_layer: int) -> None:
    """Every tensor the model needs is in the file, and every tensor in the file is used or ignorable."""
    needed = {s for sources in wanted.values() for s in sources}
    missing = sorted(needed - set(f.tensors))
    if missing:
        raise GGUFError(f"{f.path}: missing tensor{'s' * (len(missing) > 1)} {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""))

    def per_layer(pattern: str) -> set[str]:
        return {pattern.format(i=i) + ".weight" for i in range(n_layer)}

    ignorable = set().union(*(per_layer(p) for p in IGNORED))
    for name in sorted(set(f.tensors) - needed - ignorable):
        why = next((w for p, w in REFUSED.items() if name in per_layer(p)), "not a llama tensor minillm knows")
        raise GGUFError(f"{f.path}: tensor {name!r} is {why}; minillm cannot run this model")


DEFAULT_CONTEXT = 2048  # tokens of context load_gguf keeps unless told otherwise (block_size=...)


@torch.no_grad()
def load_gguf(path: str | Path, keep_quantized: bool = False, **config_overrides) -> tuple[CausalLM, dict]:
    """(CausalLM with fp32 weights, info) from a llama GGUF file; with keep_quantized=True the linear
    layers, token embedding and tied head hold the file's blocks as QuantLinear (backend "reference";
    gguf_keep.build_kept_model) and info["gguf"]["kept"] says which tensors were exact.

    config_overrides: ModelConfig fields that do not alter the weights, e.g. block_size=8192 or
    attention="sdpa". block_size defaults to the file's context_length (the longest context the
    model was trained for) capped at DEFAULT_CONTEXT: each token of context costs KV-cache memory,
    and the written-out attention's (T, T) scores at T = 8192 take gigabytes per head and batch row. info: {"model": the ModelConfig as a dict, "gguf": {path, version,
    architecture, name, tensor_types (type name -> count), metadata (every key, tokenizer's included)}}.
    """
    f = read_gguf(path)
    cfg = llama_config(f)
    cfg = dataclasses.replace(cfg, block_size=min(cfg.block_size, DEFAULT_CONTEXT))  # an override may raise it
    try:
        cfg = dataclasses.replace(cfg, **config_overrides)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{f.path}: {e}") from None
    wanted = llama_tensor_map(cfg.n_layer, cfg.tie_weights)
    _check_names(f, wanted, cfg.n_layer)
    kept = None
    if keep_quantized:
        from minillm.weights.gguf_keep import build_kept_model  # imports the compressor's QuantLinear

        model, kept = build_kept_model(f, cfg, wanted)
    else:
        model = _dequantized_model(f, cfg, wanted)
    info = {"model": cfg.to_dict(),
            "gguf": {"path": str(f.path), "version": f.version, "architecture": f.architecture,
                     "name": f.metadata.get("general.name"),
                     "tensor_types": dict(Counter(t.type_name for t in f.tensors.values())),
                     "metadata": f.metadata}}
    if kept is not None:
        info["gguf"]["kept"] = kept
    return model, info


def _dequantized_model(f: GGUFFile, cfg: ModelConfig, wanted: dict[str, tuple[str, ...]]) -> CausalLM:
    """A float32 CausalLM filled tensor by tensor from the file's dequantized weights."""
    model = CausalLM(cfg)
    params = model.state_dict()  # shares storage with the parameters: copy_ fills the model
    assert set(params) - {"lm_head.weight"} <= set(wanted), sorted(set(params) - set(wanted))
    for ours, sources in wanted.items():
        w = np.concatenate([f.tensor(s) for s in sources]) if len(sources) > 1 else f.tensor(sources[0])
        if tuple(w.shape) != tuple(params[ours].shape):
            shapes = ", ".join(f"{s} {list(f.tensors[s].shape)}" for s in sources)
            raise GGUFError(f"{f.path}: {shapes} do not make {ours} of shape {list(params[ours].shape)} "
                            "(the llama.* metadata and the tensors disagree)")
        params[ours].copy_(torch.from_numpy(w))
    return model.eval()


def is_gguf_file(path: str | Path) -> bool:
    """A path load_model should read as GGUF: named *.gguf, or a file that starts with the magic."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:  # a folder, or nothing there
        return False
