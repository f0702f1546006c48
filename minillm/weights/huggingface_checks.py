"""What a Hugging Face config.json must say before minillm builds anything from it.

A downloaded folder is someone else's file: its config.json may lack a key, hold a float where a
size goes (n_positions: 1e12), a zero (num_attention_heads: 0), a RoPE setting no model uses, or a
vocabulary size other than the weights'. Each of these used to surface as a traceback from deep in
the model, a KeyError printed as `'n_embd'`, a silent load of a broken model, or an allocation of
tens of gigabytes. Here each is one line naming config.json and the key:

    check_hf_config(hf, file)            types and ranges of the keys the loaders read
    check_hf_header(kind, hf, shapes, file)   the sizes the weights show, against the safetensors header

Both run before a tensor is read or a module is built (weights/huggingface.py: load_checked).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from minillm.weights.header import HeaderMismatch

# the integer sizes each model_type's loader reads: (key, required, smallest allowed value)
INT_KEYS = {
    "gpt2": [("vocab_size", True, 1), ("n_positions", True, 1), ("n_layer", True, 1), ("n_head", True, 1),
             ("n_embd", True, 1), ("n_inner", False, 0)],
    "bert": [("vocab_size", True, 1), ("max_position_embeddings", True, 1), ("num_hidden_layers", True, 1),
             ("num_attention_heads", True, 1), ("hidden_size", True, 1), ("intermediate_size", True, 1),
             ("type_vocab_size", False, 0)],
    "llama": [("vocab_size", True, 1), ("max_position_embeddings", True, 1), ("num_hidden_layers", True, 1),
              ("num_attention_heads", True, 1), ("hidden_size", True, 1), ("intermediate_size", True, 1),
              ("num_key_value_heads", False, 1), ("head_dim", False, 1), ("sliding_window", False, 1),
              ("max_window_layers", False, 0)],
}
INT_KEYS["mistral"] = INT_KEYS["qwen2"] = INT_KEYS["llama"]
# positive finite floats (epsilons, RoPE's base)
FLOAT_KEYS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "rope_theta")
BERT_ACTIVATIONS = ("gelu", "gelu_new", "relu")


def check_hf_config(hf: dict, file: Path) -> None:
    """ValueError naming `file` and the key for the first value the loaders cannot use."""
    kind = hf.get("model_type")
    for key, required, least in INT_KEYS.get(kind, []):
        value = hf.get(key)
        if value is None:
            # Qwen2 writes sliding_window: null when it does not use one; other optional keys default
            if required:
                raise ValueError(f"{file}: no {key!r} key; a {kind} config.json has one")
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{file}: {key}={value!r} should be an integer")
        if value < least:
            raise ValueError(f"{file}: {key}={value} should be >= {least}")
    for key in FLOAT_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{file}: {key}={value!r} should be a positive number")
    if kind == "bert" and hf.get("hidden_act", "gelu") not in BERT_ACTIVATIONS:
        raise ValueError(f"{file}: hidden_act={hf['hidden_act']!r} is not one minillm's BERT has "
                         f"({', '.join(BERT_ACTIVATIONS)})")
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope(hf.get(key), key, file)


def _check_rope(params, key: str, file: Path) -> None:
    """A rope_scaling / rope_parameters object: null, or {"rope_type" (or "type"), its numbers}."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise ValueError(f"{file}: {key} should be an object (rope_type, factor, ...) or null, got {params!r}")
    if "rope_type" not in params and "type" not in params and any(isinstance(v, dict) for v in params.values()):
        return  # per-layer parameters: _rope_fields refuses them with its own message
    kind = params.get("rope_type", params.get("type", "default"))
    needs = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind not in needs:
        raise ValueError(f"{file}: {key}.rope_type={kind!r} is not supported (minillm knows {', '.join(needs)})")
    for name in needs[kind] + tuple(k for k in ("rope_theta",) if k in params):
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{file}: {key}.{name}={value!r} should be a positive number")
    if kind == "llama3" and not isinstance(params["original_max_position_embeddings"], int):
        raise ValueError(f"{file}: {key}.original_max_position_embeddings should be an integer")


# --- against the weights ------------------------------------------------------------------------------
# (config key, tensor name suffix, dimension): the size the key gives must be that tensor's dimension

HEADER_SIZES = {
    "gpt2": [("vocab_size", "wte.weight", 0), ("n_embd", "wte.weight", 1), ("n_positions", "wpe.weight", 0),
             ("n_inner", "h.0.mlp.c_fc.weight", 1)],
    "bert": [("vocab_size", "embeddings.word_embeddings.weight", 0), ("hidden_size", "embeddings.word_embeddings.weight", 1),
             ("max_position_embeddings", "embeddings.position_embeddings.weight", 0),
             ("type_vocab_size", "embeddings.token_type_embeddings.weight", 0),
             ("intermediate_size", "encoder.layer.0.intermediate.dense.weight", 0)],
    "llama": [("vocab_size", "embed_tokens.weight", 0), ("hidden_size", "embed_tokens.weight", 1),
              ("intermediate_size", "layers.0.mlp.up_proj.weight", 0)],
}
HEADER_SIZES["mistral"] = HEADER_SIZES["qwen2"] = HEADER_SIZES["llama"]
LAYER_KEY = {"gpt2": ("n_layer", r"(?:^|\.)h\.(\d+)\."), "bert": ("num_hidden_layers", r"(?:^|\.)layer\.(\d+)\."),
             "llama": ("num_hidden_layers", r"(?:^|\.)layers\.(\d+)\.")}
LAYER_KEY["mistral"] = LAYER_KEY["qwen2"] = LAYER_KEY["llama"]


def _find(shapes: dict, suffix: str) -> tuple[str, tuple] | None:
    for name, shape in shapes.items():
        if name == suffix or name.endswith("." + suffix):
            return name, shape
    return None


def check_hf_header(kind: str, hf: dict, shapes: dict, file: Path) -> None:
    """HeaderMismatch for the first size of config.json that the weights' shapes contradict."""
    key, pattern = LAYER_KEY[kind]
    layers = {int(m.group(1)) for name in shapes if (m := re.search(pattern, name))}
    have = max(layers) + 1 if layers else 0
    if hf[key] != have:
        raise HeaderMismatch(f"{file}: {key}={hf[key]}, but the weights hold {have} layers; the config and the "
                             "weights belong to different models")
    for key, suffix, dim in HEADER_SIZES[kind]:
        found = _find(shapes, suffix)
        if found is None or not hf.get(key):  # (an optional size left at 0/None takes the default)
            continue
        name, shape = found
        if len(shape) <= dim or shape[dim] != hf[key]:
            raise HeaderMismatch(f"{file}: {key}={hf[key]}, but the weights' {name} has shape {list(shape)}; "
                                 "the config and the weights belong to different models")
    if kind in ("llama", "mistral", "qwen2"):  # heads: q_proj has H·D rows, k_proj H_kv·D
        H, C = hf["num_attention_heads"], hf["hidden_size"]
        for proj, heads in (("q_proj", H), ("k_proj", hf.get("num_key_value_heads") or H)):
            found = _find(shapes, f"layers.0.self_attn.{proj}.weight")
            if found is not None and found[1][0] != heads * (C // H):
                raise HeaderMismatch(f"{file}: num_attention_heads={H}, num_key_value_heads={heads if proj == 'k_proj' else H} "
                                     f"and hidden_size={C} give {proj} {heads * (C // H)} rows, but the weights' "
                                     f"{found[0]} has shape {list(found[1])}")
