"""Load Hugging Face GPT-2, BERT and Llama-family (Llama, Mistral, Qwen2, SmolLM2) weights into minillm.

Point `load_gpt2` / `load_bert` / `load_llama` at a downloaded checkpoint folder (config.json +
model.safetensors, or shards model-0000x-of-0000y.safetensors with model.safetensors.index.json,
or pytorch_model.bin, as `huggingface-cli download` leaves it) or pass a state dict directly.
`load_hf_folder` picks the loader from config.json's "model_type" and also loads tokenizer.json.
Parity with the Hugging Face implementations is what tests/test_parity_hf.py checks: logits equal
to 1e-5 in fp32, which is how we know minillm's attention, norms and FFN are the real thing.

Naming map (GPT-2 → minillm). GPT-2 stores linear weights as Conv1D, i.e. (in, out): transposed.
    transformer.wte / wpe            → transformer.tok_emb / pos_emb.emb
    h.{i}.ln_1, ln_2                 → blocks.{i}.norm1, norm2
    h.{i}.attn.c_attn (q|k|v fused)  → blocks.{i}.attn.qkv
    h.{i}.attn.c_proj                → blocks.{i}.attn.proj
    h.{i}.mlp.c_fc, c_proj           → blocks.{i}.ffn.up, down
    ln_f                             → transformer.final_norm

Naming map (Llama family → minillm). Linear weights are (out, in), as ours.
    model.embed_tokens / model.norm / lm_head → transformer.tok_emb / transformer.final_norm / lm_head
    layers.{i}.input_layernorm, post_attention_layernorm → blocks.{i}.norm1, norm2
    layers.{i}.self_attn.q_proj | k_proj | v_proj        → blocks.{i}.attn.qkv (rows stacked q, k, v)
    layers.{i}.self_attn.o_proj                          → blocks.{i}.attn.proj
    layers.{i}.mlp.gate_proj, up_proj, down_proj         → blocks.{i}.ffn.gate, up, down
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM, MaskedLM


def gpt2_config(hf: dict) -> ModelConfig:
    """ModelConfig for a Hugging Face GPT2Config (as a dict, e.g. config.json)."""
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if hf.get("activation_function", "gelu_new") not in act:
        raise ValueError(f"activation_function={hf['activation_function']!r} is not one minillm has ({', '.join(act)})")
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], ffn_hidden=hf.get("n_inner") or 0,
        positional="learned", activation=act[hf.get("activation_function", "gelu_new")], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, tie_weights=bool(hf.get("tie_word_embeddings", True)),
    )


def gpt2_from_state_dict(sd: dict, cfg: ModelConfig) -> CausalLM:
    """Build a CausalLM and copy a Hugging Face GPT2LMHeadModel state dict into it."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    model = CausalLM(cfg)
    ours = {
        "transformer.tok_emb.weight": sd["wte.weight"],
        "transformer.pos_emb.emb.weight": sd["wpe.weight"],
        "transformer.final_norm.weight": sd["ln_f.weight"],
        "transformer.final_norm.bias": sd["ln_f.bias"],
    }
    if not cfg.tie_weights:  # tie_word_embeddings=false (huggingface_write's sinusoidal export): its own head
        ours["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"transformer.blocks.{i}."
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            ours[b + dst + ".weight"] = sd[h + src + ".weight"]
            ours[b + dst + ".bias"] = sd[h + src + ".bias"]
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                         ("mlp.c_fc", "ffn.up"), ("mlp.c_proj", "ffn.down")):
            ours[b + dst + ".weight"] = sd[h + src + ".weight"].t()  # Conv1D (in, out) -> Linear (out, in)
            ours[b + dst + ".bias"] = sd[h + src + ".bias"]
    _load_exact(model, ours)
    return model


def bert_config(hf: dict) -> ModelConfig:
    """ModelConfig for a Hugging Face BertConfig dict (post-norm, learned positions, token types)."""
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[hf.get("hidden_act", "gelu")]
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        ffn_hidden=hf["intermediate_size"], n_token_types=hf.get("type_vocab_size", 2),
        positional="learned", activation=act, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        prenorm=False, embed_norm=True, bias=True, tie_weights=True, causal=False,
    )


def bert_from_state_dict(sd: dict, cfg: ModelConfig) -> MaskedLM:
    """Build a MaskedLM and copy a Hugging Face BertForMaskedLM state dict into it. A
    BertForPreTraining state dict (the form of google's released checkpoints) also carries the
    pooler and the next-sentence head: then the MaskedLM gets its NSP head too (cfg.nsp_head)."""
    has_nsp = "cls.seq_relationship.weight" in sd
    if has_nsp != cfg.nsp_head:
        cfg = dataclasses.replace(cfg, nsp_head=has_nsp)
    model = MaskedLM(cfg)
    e = "bert.embeddings."
    ours = {
        "transformer.tok_emb.weight": sd[e + "word_embeddings.weight"],
        "transformer.pos_emb.emb.weight": sd[e + "position_embeddings.weight"],
        "transformer.type_emb.weight": sd[e + "token_type_embeddings.weight"],
        "transformer.emb_norm.weight": sd[e + "LayerNorm.weight"],
        "transformer.emb_norm.bias": sd[e + "LayerNorm.bias"],
        "head_dense.weight": sd["cls.predictions.transform.dense.weight"],
        "head_dense.bias": sd["cls.predictions.transform.dense.bias"],
        "head_norm.weight": sd["cls.predictions.transform.LayerNorm.weight"],
        "head_norm.bias": sd["cls.predictions.transform.LayerNorm.bias"],
        "decoder.bias": sd.get("cls.predictions.decoder.bias", sd.get("cls.predictions.bias")),
    }
    if has_nsp:  # BertForPreTraining: pooler (dense + tanh on [CLS]) and the 2-way NSP classifier
        for part in ("weight", "bias"):
            ours[f"pooler.dense.{part}"] = sd[f"bert.pooler.dense.{part}"]
            ours[f"nsp.{part}"] = sd[f"cls.seq_relationship.{part}"]
    for i in range(cfg.n_layer):
        h, b = f"bert.encoder.layer.{i}.", f"transformer.blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [sd[f"{h}attention.self.{n}.{part}"] for n in ("query", "key", "value")]
            ours[f"{b}attn.qkv.{part}"] = torch.cat(qkv, dim=0)  # (3C, C) / (3C,): q, k, v stacked
            ours[f"{b}attn.proj.{part}"] = sd[f"{h}attention.output.dense.{part}"]
            ours[f"{b}norm1.{part}"] = sd[f"{h}attention.output.LayerNorm.{part}"]
            ours[f"{b}ffn.up.{part}"] = sd[f"{h}intermediate.dense.{part}"]
            ours[f"{b}ffn.down.{part}"] = sd[f"{h}output.dense.{part}"]
            ours[f"{b}norm2.{part}"] = sd[f"{h}output.LayerNorm.{part}"]
    _load_exact(model, ours)
    return model


def _load_exact(model: torch.nn.Module, ours: dict) -> None:
    """load_state_dict, tolerating only the tied output weight being absent (it is the embedding)."""
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [m for m in missing if m not in ("lm_head.weight", "decoder.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mismatch: missing {missing}, unexpected {unexpected}")


def read_hf_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(config dict, state dict) from a Hugging Face model folder. Never unpickles arbitrary objects.

    Big models are saved in shards; model.safetensors.index.json maps every tensor name to its
    shard file ("weight_map"), so the state dict is the union of the shards it names."""
    from safetensors.torch import load_file

    path = Path(path)
    hf_cfg = read_hf_config(path)
    files = safetensors_files(path)
    if files:
        sd = {}
        for file in files:
            sd.update(load_file(str(file)))
    elif (path / "pytorch_model.bin").exists():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors (or its shards' index) "
                                "nor pytorch_model.bin")
    return hf_cfg, sd


def _read_json(file: Path, what: str) -> dict:
    """A JSON object from `file`, or ValueError in one line naming the file."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{file}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def read_hf_config(path: str | Path) -> dict:
    """config.json of a Hugging Face folder, as a dict; one-line errors naming the file."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model folder")
    return _read_json(path / "config.json", "the model's configuration")


def safetensors_files(path: Path) -> list[Path]:
    """The folder's weight files: model.safetensors, or the shards its index names; [] if neither."""
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        return []
    weight_map = _read_json(index_file, "a \"weight_map\" of tensor -> shard").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_file}: \"weight_map\" should map tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if Path(s).name != s or not (path / s).is_file()]
    if bad:
        raise ValueError(f"{index_file}: shard {bad[0]!r} is not a file of this folder")
    return [path / s for s in shards]


def load_gpt2(path: str | Path) -> CausalLM:
    """A minillm CausalLM holding the GPT-2 weights of a downloaded Hugging Face folder."""
    return load_checked(path, "gpt2")[0]


def load_bert(path: str | Path) -> MaskedLM:
    """A minillm MaskedLM holding the weights of a downloaded Hugging Face BertForMaskedLM folder."""
    return load_checked(path, "bert")[0]


# --- the Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2 -------------------------------------------

LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # config.json "model_type"s that load_llama reads


def _rope_fields(hf: dict) -> dict:
    """rope_base and rope_scaling fields from config.json, in either Hugging Face spelling:
    transformers 4.x writes "rope_theta" and "rope_scaling": {"rope_type" (or "type"), "factor", ...};
    5.x writes one "rope_parameters": {"rope_type", "rope_theta", "factor", ...}."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "rope_type" not in params and "type" not in params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer RoPE parameters ({', '.join(params)}) are not supported")
    kind = params.get("rope_type") or params.get("type") or "default"
    fields = dict(rope_base=float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0))
    if kind == "default":
        return fields
    if kind == "linear":
        return {**fields, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {**fields, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_context": int(params["original_max_position_embeddings"])}
    raise ValueError(f"rope_scaling type {kind!r} is not supported (minillm knows default, linear, llama3)")


def _sliding_window(hf: dict) -> int | None:
    """The attention window every layer uses, or None. A model mixing windowed and full layers
    (Qwen2 with use_sliding_window and 0 < max_window_layers < num_hidden_layers) is refused."""
    kind, L = hf["model_type"], hf["num_hidden_layers"]
    if kind == "llama" or (kind == "qwen2" and not hf.get("use_sliding_window")):
        return None  # Qwen2 writes a sliding_window size even when it does not use it
    types = set(hf.get("layer_types") or [])
    if kind == "qwen2" and not types:  # transformers 4.x: windows from layer max_window_layers on
        first = hf.get("max_window_layers", L)
        types = {"sliding_attention" if i >= first else "full_attention" for i in range(L)}
    if len(types) > 1:
        raise ValueError("models whose layers mix sliding-window and full attention are not supported")
    return None if types == {"full_attention"} else hf.get("sliding_window")


def llama_config(hf: dict) -> ModelConfig:
    """ModelConfig for a Hugging Face Llama, Mistral or Qwen2 config.json (as a dict)."""
    kind = hf.get("model_type")
    if kind not in LLAMA_FAMILY:
        raise ValueError(f"model_type {kind!r} is not one load_llama reads ({', '.join(LLAMA_FAMILY)})")
    H, C = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, C // H):
        raise ValueError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads={C // H}: "
                         "not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: minillm's SwiGLU gates with silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):  # Qwen2's q/k/v biases are implied by its type
        raise ValueError("Llama attention_bias / mlp_bias = true is not supported")
    H_kv = hf.get("num_key_value_heads") or H
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=H_kv if H_kv != H else None, n_embd=C,
        ffn_hidden=hf["intermediate_size"], positional="rotary", activation="swiglu", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), bias=False, qkv_bias=True if kind == "qwen2" else None,
        tie_weights=bool(hf.get("tie_word_embeddings", False)), sliding_window=_sliding_window(hf),
        **_rope_fields(hf),
    )


def half_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows of a q or k projection (weight (H·D, C) or bias (H·D,)) from Hugging
    Face's RoPE layout to minillm's.

    HF Llama rotates channel c together with channel c + D/2 ("rotate_half"); minillm's Rotary
    rotates 2c with 2c+1 (the RoPE paper's layout), both by the angle pos·θ_c. Moving HF channel c
    to 2c and c + D/2 to 2c+1 makes minillm rotate exactly HF's pairs. q and k get the same
    permutation, so every dot product q·k — all attention uses them for — is unchanged, and v and
    o_proj need nothing. We permute weights once here rather than add a second rotary layout, so
    positional.py keeps one RoPE for readers; the price is that minillm's q/k rows are not in HF's
    order (export back to HF would apply the inverse, as HF's convert_llama_weights_to_hf.py does).
    """
    D = w.shape[0] // n_head
    perm = torch.arange(D).view(2, D // 2).t().reshape(-1)  # [0, D/2, 1, D/2+1, ...]
    return w.view(n_head, D, *w.shape[1:])[:, perm].reshape(w.shape)  # (H, D, ...) -> (H·D, ...)


def llama_from_state_dict(sd: dict, cfg: ModelConfig) -> CausalLM:
    """Build a CausalLM and copy a Hugging Face LlamaForCausalLM (Mistral, Qwen2) state dict into it."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    model = CausalLM(cfg)
    ours = {"transformer.tok_emb.weight": sd["embed_tokens.weight"],
            "transformer.final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:  # a tied model may still store lm_head.weight; it is the embedding anyway
        ours["lm_head.weight"] = sd["lm_head.weight"]
    H, H_kv = cfg.n_head, cfg.kv_heads
    parts = ("weight", "bias") if cfg.qkv_has_bias else ("weight",)
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"transformer.blocks.{i}."
        a = h + "self_attn."
        for part in parts:
            q = half_to_interleaved(sd[f"{a}q_proj.{part}"], H)  # (H·D, C) or (H·D,)
            k = half_to_interleaved(sd[f"{a}k_proj.{part}"], H_kv)  # (H_kv·D, C) or (H_kv·D,)
            ours[f"{b}attn.qkv.{part}"] = torch.cat([q, k, sd[f"{a}v_proj.{part}"]], dim=0)  # rows q | k | v
        ours[b + "attn.proj.weight"] = sd[a + "o_proj.weight"]
        ours[b + "norm1.weight"] = sd[h + "input_layernorm.weight"]
        ours[b + "norm2.weight"] = sd[h + "post_attention_layernorm.weight"]
        for name in ("gate", "up", "down"):
            ours[f"{b}ffn.{name}.weight"] = sd[f"{h}mlp.{name}_proj.weight"]
    _load_exact(model, ours)
    return model


def load_llama(path: str | Path) -> CausalLM:
    """A minillm CausalLM holding the weights of a downloaded Llama / Mistral / Qwen2 / SmolLM2 folder."""
    return load_checked(path, LLAMA_FAMILY)[0]


# --- any Hugging Face folder -------------------------------------------------------------------------

def is_hf_folder(path: str | Path) -> bool:
    """True for a Hugging Face model folder: config.json with a "model_type" (a minillm checkpoint's
    config.json has a "model" section instead) next to its weights."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # unreadable or absurd: not an HF folder
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (isinstance(hf, dict) and "model_type" in hf and "model" not in hf
            and any((path / w).exists() for w in weights))


def load_hf_folder(path: str | Path, device: str | torch.device = "cpu", **config_overrides):
    """(model, tokenizer or None, meta) from a Hugging Face folder, like checkpoint.load_model.

    config_overrides: fields that do not alter the weights, e.g. attention="sdpa". The tokenizer is
    the folder's tokenizer.json behind minillm's interface (needs the `tokenizers` package); meta
    holds the model config and where it came from, with the end-of-text ids of config.json.
    """
    from minillm.data.tokenizer import load_hf_tokenizer

    path = Path(path)
    model, hf_cfg = load_checked(path, tuple(LOADERS), **config_overrides)
    kind = hf_cfg["model_type"]
    model = model.to(device).eval()
    cfg = model.cfg  # (a BERT folder with an NSP head turns nsp_head on)
    tokenizer = load_hf_tokenizer(path) if (path / "tokenizer.json").exists() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:  # an id past the embedding table
        raise ValueError(f"{path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, but config.json's "
                         f"vocab_size is {cfg.vocab_size}; they belong to different models")
    meta = {"model": cfg.to_dict(),
            "huggingface": {"path": str(path), "model_type": kind, "bos_token_id": hf_cfg.get("bos_token_id"),
                            "eos_token_id": hf_cfg.get("eos_token_id")}}
    return model, tokenizer, meta


LOADERS = {"gpt2": (gpt2_config, gpt2_from_state_dict), "bert": (bert_config, bert_from_state_dict),
           **{k: (llama_config, llama_from_state_dict) for k in LLAMA_FAMILY}}


def load_checked(path: str | Path, kinds: str | tuple[str, ...], **config_overrides) -> tuple[torch.nn.Module, dict]:
    """(model on the CPU, config.json) of a Hugging Face folder whose model_type is one of `kinds`,
    with config.json checked before anything is built: every size a positive integer, RoPE and
    sliding-window settings valid, and every size that the weights show (vocabulary, width, layers,
    positions, heads, FFN) equal to the safetensors header's shapes (huggingface_checks.py). A
    config.json that says n_layer=100000 is refused in milliseconds, not after building 5 GB."""
    from minillm.weights.huggingface_checks import check_hf_config, check_hf_header
    from minillm.weights.header import HeaderMismatch, build_on_meta, check_derived_buffers, safetensors_shapes

    path = Path(path)
    hf = read_hf_config(path)
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    config_file = path / "config.json"
    kind = hf.get("model_type")
    if kind not in kinds:
        raise ValueError(f"{config_file}: model_type {kind!r} is not supported here (minillm loads "
                         f"{', '.join(kinds)})")
    make_config, from_state_dict = LOADERS[kind]
    check_hf_config(hf, config_file)  # the keys make_config reads: present, of the right type and range
    try:
        cfg = dataclasses.replace(make_config(hf), **config_overrides)
    except (ValueError, TypeError) as e:  # ModelConfig's own checks (n_embd divisible by n_head, ...)
        raise ValueError(f"{config_file}: {e}") from None
    files = safetensors_files(path)
    try:
        if files:
            check_hf_header(kind, hf, safetensors_shapes(files), config_file)
        check_derived_buffers(build_on_meta(lambda: from_meta_model(cfg)), config_file)
    except HeaderMismatch as e:
        raise ValueError(str(e)) from None
    _, sd = read_hf_checkpoint(path)
    try:
        return from_state_dict(sd, cfg), hf
    except KeyError as e:  # a tensor the architecture needs is not in the file
        where = files[0].name if len(files) == 1 else "the safetensors shards" if files else "pytorch_model.bin"
        raise ValueError(f"{path / where}: no tensor {e.args[0]!r}, which a {kind} model has") from None


def from_meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The minillm model `cfg` describes (built on the meta device by the caller: shapes only)."""
    return (CausalLM if cfg.causal else MaskedLM)(cfg)
