"""Write a minillm causal LM as a Hugging Face model folder that transformers loads as it is.

The inverse of huggingface.py: the same name maps (read its docstring), walked the other way.

    >>> info = export_hf(model, tokenizer, "out-hf")      # config.json, model.safetensors, tokenizer ...
    >>> AutoModelForCausalLM.from_pretrained("out-hf"); AutoTokenizer.from_pretrained("out-hf")

A minillm model is written as the Hugging Face architecture that computes the same function:

    GPT-2 (model_type "gpt2")    LayerNorm, GELU/ReLU, biases, learned positions. Sinusoidal
                                 positions fit too: the fixed table becomes wpe, and since minillm
                                 scales the token embedding by √C before adding it, wte is written
                                 as √C·E and lm_head as E (untied), which is the same arithmetic.
                                 HF's Conv1D stores linear weights (in, out): transposed.
    Llama (model_type "llama",   RMSNorm, SwiGLU, RoPE, no biases; grouped-query attention;
    "qwen2" with q/k/v biases,   rope_scaling linear/llama3. minillm's q/k rows are in RoPE's
    "mistral" with a window)     interleaved order (huggingface.half_to_interleaved); the inverse
                                 permutation puts them back in HF's rotate_half order.

Anything else (a masked LM, an encoder–decoder, a rotary model with LayerNorm, pruned heads, ...) is
refused in one line naming what does not fit (`hf_model_type`). The folder also gets the tokenizer
(tokenizer.json through each tokenizer's `to_hf_json`, tokenizer_config.json with the chat template)
and generation_config.json with the end-of-text id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm.files import write_bytes, write_json
from minillm.model.config import ModelConfig


def hf_model_type(cfg) -> str:
    """The Hugging Face model_type that computes what `cfg` computes, or ValueError in one line why none does."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError("an encoder-decoder (Seq2Seq) is not a causal LM: the Hugging Face export writes "
                         "decoder-only models (GPT-2, Llama family)")
    if not cfg.causal:
        raise ValueError("a masked LM (causal=False, BERT-style) is not a causal LM: the Hugging Face export "
                         "writes decoder-only models (GPT-2, Llama family)")
    common = {"prenorm": (cfg.prenorm, True), "embed_norm": (cfg.embed_norm, False),
              "n_token_types": (cfg.n_token_types, 0), "head_size (pruned heads)": (cfg.head_size, 0)}
    if cfg.positional == "rotary":
        want = {**common, "activation": (cfg.activation, "swiglu"), "norm": (cfg.norm, "rmsnorm"),
                "bias": (cfg.bias, False)}
        family = "Llama"
    else:
        want = {**common, "norm": (cfg.norm, "layernorm"), "bias": (cfg.bias, True),
                "qkv_bias": (cfg.qkv_has_bias, True), "n_kv_head": (cfg.kv_heads, cfg.n_head),
                "sliding_window": (cfg.sliding_window, None)}
        family = "GPT-2"
    bad = [f"{name}={have!r} (needs {need!r})" for name, (have, need) in want.items() if have != need]
    if cfg.positional != "rotary" and cfg.activation not in GPT2_ACTIVATIONS:
        bad.append(f"activation={cfg.activation!r} (needs one of {', '.join(GPT2_ACTIVATIONS)})")
    if bad:
        raise ValueError(f"this model does not fit the Hugging Face {family} architecture "
                         f"(positional={cfg.positional!r}): {'; '.join(bad)}")
    if family == "GPT-2":
        return "gpt2"
    if cfg.qkv_has_bias:
        if cfg.sliding_window is not None:
            raise ValueError("q/k/v biases (Qwen2) together with a sliding window: no Hugging Face config "
                             "of the Llama family holds both here")
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}  # minillm -> activation_function


def hf_config(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json for the architecture hf_model_type names (the fields huggingface.py reads back)."""
    kind = hf_model_type(cfg)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": "float32"}
    if kind == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.ffn_dim,
                "activation_function": GPT2_ACTIVATIONS[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # inference: dropout off
                # sinusoidal positions scale the embedding by √C on the way in only: two matrices
                "tie_word_embeddings": cfg.tie_weights and cfg.positional != "sinusoidal", **ids}
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[kind]
    out = {"architectures": [arch], "model_type": kind, "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
           "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
           "tie_word_embeddings": cfg.tie_weights, "attention_bias": False, "mlp_bias": False,
           "attention_dropout": 0.0, "rope_theta": cfg.rope_base, "rope_scaling": rope_scaling(cfg), **ids}
    if kind == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if kind == "qwen2":
        out["use_sliding_window"] = False
    return out


def rope_scaling(cfg: ModelConfig) -> dict | None:
    """config.json's "rope_scaling" (transformers 4.x spelling, which 5.x still reads): huggingface._rope_fields inverted."""
    if cfg.rope_scaling is None:
        return None
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor}
    return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_context}


def interleaved_to_half(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of huggingface.half_to_interleaved: minillm's RoPE row order (pairs 2c, 2c+1) back
    to Hugging Face's (pairs c, c + D/2), per head, for a q or k weight (H·D, C), bias (H·D,) or a
    LoRA B (H·D, r)."""
    D = w.shape[0] // n_head
    perm = torch.arange(D).view(D // 2, 2).t().reshape(-1)  # [0, 2, 4, ..., 1, 3, 5, ...]
    return w.reshape(n_head, D, *w.shape[1:])[:, perm].reshape(w.shape)  # (H, D, ...) -> (H·D, ...)


def linear_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int, int]]]:
    """minillm linear module -> [(Hugging Face module, first row, end row, RoPE heads)]: which rows of
    minillm's weight (out, in) become which HF module. RoPE heads > 0: those rows are a q or k
    projection whose row order interleaved_to_half restores. Used for the weights here and for LoRA
    adapters in finetune/peft_format.py (a LoRA B splits by the same rows)."""
    kind = hf_model_type(cfg)
    C, D = cfg.n_embd, cfg.head_dim
    parts: dict[str, list[tuple[str, int, int, int]]] = {}
    for i in range(cfg.n_layer):
        b = f"transformer.blocks.{i}."
        if kind == "gpt2":
            h = f"transformer.h.{i}."
            parts[b + "attn.qkv"] = [(h + "attn.c_attn", 0, 3 * C, 0)]
            parts[b + "attn.proj"] = [(h + "attn.c_proj", 0, C, 0)]
            parts[b + "ffn.up"] = [(h + "mlp.c_fc", 0, None, 0)]
            parts[b + "ffn.down"] = [(h + "mlp.c_proj", 0, C, 0)]
        else:
            h = f"model.layers.{i}."
            q, k = cfg.n_head * D, cfg.kv_heads * D
            parts[b + "attn.qkv"] = [(h + "self_attn.q_proj", 0, q, cfg.n_head),
                                     (h + "self_attn.k_proj", q, q + k, cfg.kv_heads),
                                     (h + "self_attn.v_proj", q + k, q + 2 * k, 0)]
            parts[b + "attn.proj"] = [(h + "self_attn.o_proj", 0, C, 0)]
            for name in ("gate", "up", "down"):
                parts[b + f"ffn.{name}"] = [(h + f"mlp.{name}_proj", 0, None, 0)]
    parts["lm_head"] = [("lm_head", 0, None, 0)]
    return parts


def split_rows(w: torch.Tensor, parts: list[tuple[str, int, int, int]]) -> dict[str, torch.Tensor]:
    """Cut a minillm weight (or bias, or LoRA B) by rows into its Hugging Face modules' pieces."""
    out = {}
    for name, start, end, rope_heads in parts:
        piece = w[start:end]
        out[name] = interleaved_to_half(piece, rope_heads) if rope_heads else piece
    return out


@torch.no_grad()
def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names and layouts, contiguous fp32 on the CPU.
    A tied head is not stored (transformers ties it again from tie_word_embeddings)."""
    cfg = model.cfg
    kind = hf_model_type(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied_in_hf = hf_config(cfg)["tie_word_embeddings"]
    out: dict[str, torch.Tensor] = {}
    for module, parts in linear_parts(cfg).items():
        if module == "lm_head":
            head = sd.pop("lm_head.weight", sd["transformer.tok_emb.weight"])  # (a tied head is listed too)
            if tied_in_hf:
                continue
        w = sd.pop(f"{module}.weight") if module != "lm_head" else head
        for name, piece in split_rows(w, parts).items():
            out[f"{name}.weight"] = piece.t() if kind == "gpt2" and name != "lm_head" else piece  # Conv1D: (in, out)
        if f"{module}.bias" in sd:
            for name, piece in split_rows(sd.pop(f"{module}.bias"), parts).items():
                out[f"{name}.bias"] = piece
    E = sd.pop("transformer.tok_emb.weight")
    if kind == "gpt2":
        for i in range(cfg.n_layer):
            for src, dst in (("norm1", "ln_1"), ("norm2", "ln_2")):
                for p in ("weight", "bias"):
                    out[f"transformer.h.{i}.{dst}.{p}"] = sd.pop(f"transformer.blocks.{i}.{src}.{p}")
        out["transformer.ln_f.weight"] = sd.pop("transformer.final_norm.weight")
        out["transformer.ln_f.bias"] = sd.pop("transformer.final_norm.bias")
        out["transformer.wpe.weight"] = gpt2_positions(model, sd)
        # minillm's sinusoidal path computes tok_emb(idx) · √C; the same multiply, done once here
        out["transformer.wte.weight"] = E * model.transformer.embed_scale if cfg.positional == "sinusoidal" else E
    else:
        for i in range(cfg.n_layer):
            for src, dst in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                out[f"model.layers.{i}.{dst}.weight"] = sd.pop(f"transformer.blocks.{i}.{src}.weight")
        out["model.norm.weight"] = sd.pop("transformer.final_norm.weight")
        out["model.embed_tokens.weight"] = E
    if sd:  # every tensor of the model has a place, or the export would silently lose weights
        raise ValueError(f"no Hugging Face name for {', '.join(sorted(sd)[:3])}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def gpt2_positions(model: torch.nn.Module, sd: dict) -> torch.Tensor:
    """wpe (block_size, C): the learned table, the sinusoid table minillm adds, or zeros (positional='none')."""
    if "transformer.pos_emb.emb.weight" in sd:
        return sd.pop("transformer.pos_emb.emb.weight")
    pos = model.transformer.pos_emb
    if pos is None:
        return torch.zeros(model.cfg.block_size, model.cfg.n_embd)
    return pos(torch.arange(model.cfg.block_size)).detach().float().cpu()  # (T, C)


def special_ids(tokenizer) -> dict:
    """bos/eos token strings and ids: the tokenizer's own (a pretrained model's), else "<|endoftext|>"
    as the end of text when it is one of the special tokens (minillm's convention)."""
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    specials = dict(getattr(tokenizer, "special_tokens", {}) or {})
    if eos is None and "<|endoftext|>" in specials:
        eos = "<|endoftext|>"

    def id_of(s):
        if s is None:
            return None
        if s in specials:
            return specials[s]
        ids = tokenizer.encode(s)
        return ids[0] if len(ids) == 1 else None

    return {"bos_token": bos, "eos_token": eos, "bos_token_id": id_of(bos), "eos_token_id": id_of(eos)}


def tokenizer_files(tokenizer, block_size: int, chat_template: str | None = None) -> dict[str, str | dict]:
    """tokenizer.json (text) and tokenizer_config.json (dict) for `tokenizer`; ValueError if its kind
    has no tokenizer.json form."""
    to_hf = getattr(tokenizer, "to_hf_json", None)
    if to_hf is None:
        raise ValueError(f"a {type(tokenizer).__name__} has no Hugging Face tokenizer.json form")
    ids = special_ids(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              "bos_token": ids["bos_token"], "eos_token": ids["eos_token"]}
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": to_hf(), "tokenizer_config.json": {k: v for k, v in config.items() if v is not None}}


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, chat_template: str | None = None) -> dict:
    """Write `model` (and `tokenizer`, if given) as a Hugging Face folder; returns {"path", "model_type",
    "files", "bytes"}. Everything is checked and converted before the first file is written."""
    from safetensors.torch import save

    cfg = getattr(model, "cfg", None)
    if hasattr(model, "quant_config"):
        raise ValueError("a quantized minillm checkpoint: export the float checkpoint it was made from "
                         "(the Hugging Face folder holds fp32 weights)")
    kind = hf_model_type(cfg)
    ids = special_ids(tokenizer) if tokenizer is not None else {}
    config = hf_config(cfg, ids.get("bos_token_id"), ids.get("eos_token_id"))
    tok_files = tokenizer_files(tokenizer, cfg.block_size, chat_template) if tokenizer is not None else {}
    weights = save(hf_state_dict(model), metadata={"format": "pt"})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    write_bytes(out / "model.safetensors", weights)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    write_json(out / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    if tok_files:
        write_bytes(out / "tokenizer.json", tok_files["tokenizer.json"].encode("utf-8"))
        write_json(out / "tokenizer_config.json", tok_files["tokenizer_config.json"])
    files = sorted(p.name for p in out.iterdir() if p.name in
                   ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"))
    return {"path": str(out), "model_type": kind, "files": files,
            "bytes": sum((out / f).stat().st_size for f in files),
            "parameters": sum(p.numel() for p in model.parameters()), "tied": config["tie_word_embeddings"]}
