"""Load Hugging Face GPT-2 and BERT weights into minillm's models.

Point `load_gpt2` at a downloaded checkpoint folder (config.json + model.safetensors or
pytorch_model.bin, as `huggingface-cli download gpt2` leaves it) or pass a state dict directly.
Parity with the Hugging Face implementations is what tests/test_parity_hf.py checks: logits equal
to 1e-5 in fp32, which is how we know minillm's attention, norms and FFN are the real thing.

Naming map (GPT-2 → minillm). GPT-2 stores linear weights as Conv1D, i.e. (in, out): transposed.
    transformer.wte / wpe            → transformer.tok_emb / pos_emb.emb
    h.{i}.ln_1, ln_2                 → blocks.{i}.norm1, norm2
    h.{i}.attn.c_attn (q|k|v fused)  → blocks.{i}.attn.qkv
    h.{i}.attn.c_proj                → blocks.{i}.attn.proj
    h.{i}.mlp.c_fc, c_proj           → blocks.{i}.ffn.up, down
    ln_f                             → transformer.final_norm
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM, MaskedLM


def gpt2_config(hf: dict) -> ModelConfig:
    """ModelConfig for a Hugging Face GPT2Config (as a dict, e.g. config.json)."""
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=hf["n_embd"], ffn_hidden=hf.get("n_inner") or 0,
        positional="learned", activation="gelu_tanh", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, tie_weights=True,
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
    """Build a MaskedLM and copy a Hugging Face BertForMaskedLM state dict into it."""
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
    """(config dict, state dict) from a Hugging Face model folder. Never unpickles arbitrary objects."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model folder")
    hf_cfg = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file
        sd = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    return hf_cfg, sd


def load_gpt2(path: str | Path) -> CausalLM:
    """A minillm CausalLM holding the GPT-2 weights of a downloaded Hugging Face folder."""
    hf_cfg, sd = read_hf_checkpoint(path)
    return gpt2_from_state_dict(sd, gpt2_config(hf_cfg))


def load_bert(path: str | Path) -> MaskedLM:
    """A minillm MaskedLM holding the weights of a downloaded Hugging Face BertForMaskedLM folder."""
    hf_cfg, sd = read_hf_checkpoint(path)
    return bert_from_state_dict(sd, bert_config(hf_cfg))
