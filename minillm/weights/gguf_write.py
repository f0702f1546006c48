"""A minillm causal LM written as a llama GGUF file, the one llama.cpp / ollama run: the reader (gguf.py) in reverse.

    >>> write_gguf(model, tokenizer, "model.q8_0.gguf", file_type="q8_0")   # minillm export CKPT --format=gguf

The file, in the order it is written (spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF" | version 3: u32 | n_tensors: u64 | n_kv: u64
    metadata   general.*    architecture "llama", name, file_type, alignment
               llama.*      the shape: context_length, embedding_length, block_count,
                            feed_forward_length, head counts, rope dimension and θ, RMS eps
               tokenizer.*  the vocabulary, merges and chat template (gguf_vocab.py)
    tensor infos            name | n_dims | ne (ggml order: fastest-varying first) | type | offset
    padding to the alignment (32), then each tensor's bytes, each padded to the alignment

Tensors are named llama.cpp's way, the inverse of gguf_llama.llama_tensor_map: minillm's fused
attn.qkv rows are cut back into attn_q, attn_k, attn_v. No RoPE permutation is needed: minillm's
Rotary already rotates channel pairs (2c, 2c+1), as llama.cpp does (see gguf_llama.py).

file_type picks how the 2-D weight matrices are stored (gguf_blocks.py): f32, f16, q8_0, q4_0 or
q4_1. Norm weights (1-D, a few KB) always stay F32, as llama.cpp's converter keeps them. For q4_0
and q4_1 the token embedding (which is also the output head when tied) is kept at Q8_0, as the
SmolLM2 Q4_1 file minillm pulls does: four bits on the head cost far more quality than they save. A
matrix whose rows are not whole 32-weight blocks falls back to F16, as llama.cpp's converter does.

What a llama GGUF file cannot hold is refused in one line: a masked LM or an encoder-decoder (llama
is a decoder only), and anything but the Llama recipe (RoPE, RMSNorm, SwiGLU, no biases). GPT-2
family models are refused too rather than written as llama.cpp's "gpt2" architecture: minillm's
reader runs llama files only, so such a file could not be checked by reading it back here; export
them with --format=hf and convert that folder with llama.cpp's convert_hf_to_gguf.py.

Tensors are encoded one at a time while the file is written (their sizes, and so the offsets, are
known from the shapes first), so the peak memory is the model plus one tensor's bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from minillm.files import atomic_write
from minillm.weights import gguf_blocks as blocks
from minillm.weights.gguf import DEFAULT_ALIGNMENT, GGUF_MAGIC, VALUE_TYPES
from minillm.weights.gguf_llama import llama_tensor_map
from minillm.weights.gguf_vocab import gguf_vocab

VERSION = 3
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9  # GGUF metadata value types
# file_type -> (ggml type of the 2-D weights, llama.cpp's general.file_type: LLAMA_FTYPE_ALL_F32 = 0,
# MOSTLY_F16 = 1, MOSTLY_Q4_0 = 2, MOSTLY_Q4_1 = 3, MOSTLY_Q8_0 = 7)
FILE_TYPES = {"f32": (blocks.F32, 0), "f16": (blocks.F16, 1), "q8_0": (blocks.Q8_0, 7),
              "q4_0": (blocks.Q4_0, 2), "q4_1": (blocks.Q4_1, 3)}


# --- what can be written ------------------------------------------------------------------------

def check_llama(model) -> None:
    """ValueError (one line) unless `model` is a CausalLM that llama.cpp's llama architecture runs."""
    from minillm.model.seq2seq import Seq2Seq
    from minillm.model.transformer import CausalLM, MaskedLM

    if isinstance(model, MaskedLM):
        raise ValueError("a masked LM (BERT) cannot go into GGUF: llama.cpp's llama files hold causal decoders")
    if isinstance(model, Seq2Seq):
        raise ValueError("an encoder-decoder cannot go into a llama GGUF file: it holds a decoder only")
    if not isinstance(model, CausalLM):
        raise ValueError(f"a {type(model).__name__} cannot go into GGUF: minillm writes causal LMs (CausalLM)")
    cfg = model.cfg
    if (cfg.positional, cfg.norm, cfg.activation) != ("rotary", "rmsnorm", "swiglu") or cfg.bias or cfg.qkv_has_bias:
        raise ValueError(f"a {cfg.positional}/{cfg.norm}/{cfg.activation} model is not the llama recipe (RoPE, RMSNorm, "
                         "SwiGLU, no biases) minillm writes as GGUF; for GPT-2 family models export --format=hf "
                         "and convert with llama.cpp's convert_hf_to_gguf.py")
    why = ("pre-norm blocks" if not cfg.prenorm else "an embedding norm" if cfg.embed_norm
           else "token-type embeddings" if cfg.n_token_types else "a sliding window" if cfg.sliding_window
           else "pruned heads (head_size)" if cfg.head_dim * cfg.n_head != cfg.n_embd
           else "llama3 RoPE scaling" if cfg.rope_scaling not in (None, "linear") else None)
    if why:
        raise ValueError(f"a model with {why} cannot go into a llama GGUF file: minillm writes the plain llama recipe")


# --- the llama tensors --------------------------------------------------------------------------

def llama_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> the fp32 weight it holds (PyTorch shape), from a CausalLM's parameters."""
    cfg = model.cfg
    state = model.state_dict()
    tied = cfg.tie_weights
    expected = set(llama_tensor_map(cfg.n_layer, tied)) | {"lm_head.weight"}
    extra = sorted(set(state) - expected)
    if extra:  # e.g. a minillm-quantized model's packed weights
        raise ValueError(f"parameters {', '.join(extra[:3])} are not a plain llama model's: export the float "
                         "model (minillm-quantized weights are not re-quantized; merge LoRA adapters first)")
    out = {}
    for ours, names in llama_tensor_map(cfg.n_layer, tied).items():
        w = state[ours].detach().float().cpu()
        if len(names) == 1:
            out[names[0]] = w
            continue
        H, H_kv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim  # attn.qkv rows: q (H·D), k, v (H_kv·D each)
        for name, part in zip(names, torch.split(w, [H * D, H_kv * D, H_kv * D])):
            out[name] = part
    return out


def tensor_type(name: str, shape: tuple[int, ...], file_type: str) -> int:
    """The ggml type a tensor is stored as under `file_type` (see the module docstring for why)."""
    main = FILE_TYPES[file_type][0]
    if len(shape) == 1 or main == blocks.F32:
        return blocks.F32
    if name in ("token_embd.weight", "output.weight") and main in (blocks.Q4_0, blocks.Q4_1):
        main = blocks.Q8_0
    if main in blocks.QUANTIZERS and shape[-1] % blocks.QK:
        return blocks.F16
    return main


# --- metadata -----------------------------------------------------------------------------------

def llama_metadata(model, tokenizer, file_type: str, chat_template: str | None, alignment: int,
                   name: str) -> dict[str, tuple[int, object]]:
    """key -> (GGUF value type, value): general.*, llama.* and tokenizer.* keys."""
    cfg = model.cfg
    f32 = lambda x: float(np.float32(x))  # noqa: E731 - stored as float32, as llama.cpp reads them
    md = {
        "general.architecture": (STRING, "llama"),
        "general.name": (STRING, name),
        "general.file_type": (UINT32, FILE_TYPES[file_type][1]),
        "general.quantization_version": (UINT32, 2),  # ggml's current block layouts (GGML_QNT_VERSION)
        "general.alignment": (UINT32, alignment),
        "llama.vocab_size": (UINT32, cfg.vocab_size),
        "llama.context_length": (UINT32, cfg.block_size),
        "llama.embedding_length": (UINT32, cfg.n_embd),
        "llama.block_count": (UINT32, cfg.n_layer),
        "llama.feed_forward_length": (UINT32, cfg.ffn_dim),
        "llama.attention.head_count": (UINT32, cfg.n_head),
        "llama.attention.head_count_kv": (UINT32, cfg.kv_heads),
        "llama.rope.dimension_count": (UINT32, cfg.head_dim),
        "llama.rope.freq_base": (FLOAT32, f32(cfg.rope_base)),
        "llama.attention.layer_norm_rms_epsilon": (FLOAT32, f32(cfg.norm_eps)),
    }
    if cfg.rope_scaling == "linear":
        md["llama.rope.scaling.type"] = (STRING, "linear")
        md["llama.rope.scaling.factor"] = (FLOAT32, f32(cfg.rope_factor))
    v = gguf_vocab(tokenizer, cfg.vocab_size)
    md.update({
        "tokenizer.ggml.model": (STRING, "gpt2"),  # byte-level BPE
        "tokenizer.ggml.pre": (STRING, v["pre"]),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, v["tokens"])),
        "tokenizer.ggml.token_type": (ARRAY, (INT32, v["token_type"])),
        "tokenizer.ggml.merges": (ARRAY, (STRING, v["merges"])),
        "tokenizer.ggml.add_bos_token": (BOOL, False),  # minillm's prompts carry no BOS unless written
    })
    for which in ("bos", "eos"):
        if v[which] is not None:
            md[f"tokenizer.ggml.{which}_token_id"] = (UINT32, v[which])
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if template:
        md["tokenizer.chat_template"] = (STRING, template)
    return md


# --- the bytes ----------------------------------------------------------------------------------

def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw  # u64 length, no terminator


def _value(vtype: int, value) -> bytes:
    """One metadata value's bytes (after its type): a scalar, a string, or an array of either."""
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        item_type, items = value
        head = struct.pack("<IQ", item_type, len(items))  # element type, count
        if item_type == STRING:
            return head + b"".join(_string(s) for s in items)
        return head + struct.pack(f"<{len(items)}{VALUE_TYPES[item_type][1]}", *items)
    return struct.pack("<" + VALUE_TYPES[vtype][1], value)


def _pad(n: int, alignment: int) -> int:
    return -n % alignment  # zero bytes that bring n up to the next multiple of the alignment


def write_gguf(model, tokenizer, path: str | Path, file_type: str = "f32", chat_template: str | None = None,
               alignment: int = DEFAULT_ALIGNMENT, name: str | None = None) -> Path:
    """Write `model` (a llama-recipe CausalLM) and `tokenizer` as a GGUF file; returns the path.

    file_type: f32 | f16 | q8_0 | q4_0 | q4_1 (how the weight matrices are stored). chat_template:
    the Jinja template to carry; None takes the tokenizer's own. ValueError (one line) for a file
    type, model or tokenizer GGUF cannot hold; nothing is written then."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"GGUF type {file_type!r} is not one minillm writes; choose {', '.join(FILE_TYPES)}")
    if alignment <= 0 or alignment % 8:
        raise ValueError(f"alignment={alignment}: GGUF needs a positive multiple of 8")
    check_llama(model)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, and a GGUF file must carry one (llama.cpp tokenizes with it)")
    path = Path(path)
    tensors = llama_tensors(model)
    md = llama_metadata(model, tokenizer, file_type, chat_template, alignment, name or path.stem)

    # the tensor table: offsets follow from the shapes and types alone, before anything is encoded
    plan, offset = [], 0
    for tname, w in tensors.items():
        t = tensor_type(tname, tuple(w.shape), file_type)
        plan.append((tname, w, t, offset))
        offset += blocks.n_bytes(tuple(w.shape), t)
        offset += _pad(offset, alignment)

    header = [GGUF_MAGIC, struct.pack("<IQQ", VERSION, len(plan), len(md))]
    for key, (vtype, value) in md.items():
        header += [_string(key), struct.pack("<I", vtype), _value(vtype, value)]
    for tname, w, t, off in plan:
        ne = tuple(reversed(w.shape))  # ggml lists dimensions fastest-varying first: (out, in) -> [in, out]
        header += [_string(tname), struct.pack(f"<I{len(ne)}Q", len(ne), *ne), struct.pack("<IQ", t, off)]
    head = b"".join(header)

    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        fh.write(head + bytes(_pad(len(head), alignment)))  # the data section starts aligned
        for tname, w, t, off in plan:
            raw = blocks.encode(w.numpy(), t)
            fh.write(raw.tobytes() + bytes(_pad(len(raw), alignment)))
    return path
