"""Load Hugging Face BART weights (BartForConditionalGeneration) into minillm's Seq2Seq.

BART (Lewis et al. 2019) is the paper's encoder–decoder with choices minillm already has as
config switches:

    BART                                             minillm
    learned positions (a table per side)             ModelConfig.positional = "learned"
    post-norm blocks, no final norm                  ModelConfig.prenorm = False
    layernorm_embedding after embeddings+positions   ModelConfig.embed_norm = True (both sides)
    exact GELU in the FFN                            ModelConfig.activation = "gelu"
    one shared embedding = output projection         ModelConfig.tie_weights = True
    final_logits_bias added to the logits            Seq2SeqConfig.output_bias = True

Two details are handled at load time rather than by more switches:
  - BART's position tables have 2 extra rows at the front (a fairseq leftover: position p reads
    row p + 2); dropping them gives the table indexed by p that LearnedPositions is.
  - q, k and v are three Linear layers; minillm fuses them (self-attention: rows q | k | v;
    cross-attention: q alone, then rows k | v).
(Marian/opus-mt would need two more: sines and cosines in separate halves of the channels rather
than interleaved, and a SiLU FFN.)

    >>> model = load_bart("facebook-bart-base/")       # a downloaded Hugging Face folder
    >>> logits, _ = model(src, tgt_in)                  # tgt_in starts with decoder_start_token_id

Parity (tests/test_parity_hf.py): a random-init BartForConditionalGeneration and this loader give
the same logits to 1e-5 in fp32, with padding in the source.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm.model.config import ModelConfig
from minillm.weights.huggingface import _load_exact, read_hf_checkpoint
from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig

BART_POSITION_OFFSET = 2  # rows at the front of BART's position tables (BartLearnedPositionalEmbedding)


def bart_config(hf: dict) -> Seq2SeqConfig:
    """Seq2SeqConfig for a Hugging Face BartConfig (as a dict, e.g. config.json)."""
    if hf.get("scale_embedding"):
        raise ValueError("BART with scale_embedding=true is not supported: minillm scales embeddings by √C "
                         "only with sinusoidal positions")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise ValueError("pre-norm BART variants (normalize_before / add_final_layer_norm, e.g. mBART) "
                         "are not supported")
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}.get(hf.get("activation_function", "gelu"))
    if act is None:
        raise ValueError(f"activation_function={hf['activation_function']!r} is not supported")
    H, H_dec = hf["encoder_attention_heads"], hf["decoder_attention_heads"]
    ffn, ffn_dec = hf["encoder_ffn_dim"], hf["decoder_ffn_dim"]
    if H != H_dec or ffn != ffn_dec:  # minillm shares one ModelConfig between both sides
        raise ValueError(f"encoder and decoder differ in heads ({H}/{H_dec}) or FFN width ({ffn}/{ffn_dec}): "
                         "not supported")
    model = ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_head=H, n_embd=hf["d_model"],
        ffn_hidden=ffn, positional="learned", activation=act, norm="layernorm", norm_eps=1e-5, prenorm=False,
        embed_norm=True, bias=True, tie_weights=bool(hf.get("tie_word_embeddings", True)),
    )
    return Seq2SeqConfig(model, n_enc_layer=hf["encoder_layers"], n_dec_layer=hf["decoder_layers"],
                         pad_id=hf.get("pad_token_id", 1), bos_id=hf.get("decoder_start_token_id", 2),
                         eos_id=hf.get("eos_token_id", 2), output_bias=True)


def _attention(sd: dict, a: str, parts=("weight", "bias")) -> dict:
    """HF q_proj/k_proj/v_proj/out_proj under prefix `a` -> {"q", "k", "v", "out"}[part]."""
    return {n: {p: sd[f"{a}{n}_proj.{p}"] for p in parts} for n in ("q", "k", "v", "out")}


def bart_from_state_dict(sd: dict, cfg: Seq2SeqConfig) -> Seq2Seq:
    """Build a Seq2Seq and copy a Hugging Face BartForConditionalGeneration state dict into it."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    model = Seq2Seq(cfg)
    off = BART_POSITION_OFFSET
    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    ours = {
        "encoder.tok_emb.weight": sd.get("encoder.embed_tokens.weight", shared),
        "tok_emb.weight": sd.get("decoder.embed_tokens.weight", shared),
        "encoder.pos_emb.emb.weight": sd["encoder.embed_positions.weight"][off:],  # row p+2 -> row p
        "pos_emb.emb.weight": sd["decoder.embed_positions.weight"][off:],
        "lm_head.bias": sd["final_logits_bias"].reshape(-1),  # (1, V) buffer -> (V,)
    }
    if not cfg.model.tie_weights:
        ours["lm_head.weight"] = sd["lm_head.weight"]
    for part in ("weight", "bias"):
        ours[f"encoder.emb_norm.{part}"] = sd[f"encoder.layernorm_embedding.{part}"]
        ours[f"emb_norm.{part}"] = sd[f"decoder.layernorm_embedding.{part}"]
    for i in range(cfg.n_enc_layer):
        h, b = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
        att = _attention(sd, h + "self_attn.")
        for part in ("weight", "bias"):
            ours[f"{b}attn.qkv.{part}"] = torch.cat([att[n][part] for n in "qkv"], dim=0)  # rows q | k | v
            ours[f"{b}attn.proj.{part}"] = att["out"][part]
            ours[f"{b}norm1.{part}"] = sd[f"{h}self_attn_layer_norm.{part}"]
            ours[f"{b}ffn.up.{part}"] = sd[f"{h}fc1.{part}"]
            ours[f"{b}ffn.down.{part}"] = sd[f"{h}fc2.{part}"]
            ours[f"{b}norm2.{part}"] = sd[f"{h}final_layer_norm.{part}"]
    for i in range(cfg.n_dec_layer):
        h, b = f"decoder.layers.{i}.", f"blocks.{i}."
        att, cross = _attention(sd, h + "self_attn."), _attention(sd, h + "encoder_attn.")
        for part in ("weight", "bias"):
            ours[f"{b}self_attn.qkv.{part}"] = torch.cat([att[n][part] for n in "qkv"], dim=0)
            ours[f"{b}self_attn.proj.{part}"] = att["out"][part]
            ours[f"{b}norm1.{part}"] = sd[f"{h}self_attn_layer_norm.{part}"]
            ours[f"{b}cross_attn.q.{part}"] = cross["q"][part]  # queries read the decoder ...
            # ... k | v the source
            ours[f"{b}cross_attn.kv.{part}"] = torch.cat([cross["k"][part], cross["v"][part]], dim=0)
            ours[f"{b}cross_attn.proj.{part}"] = cross["out"][part]
            ours[f"{b}norm2.{part}"] = sd[f"{h}encoder_attn_layer_norm.{part}"]
            ours[f"{b}ffn.up.{part}"] = sd[f"{h}fc1.{part}"]
            ours[f"{b}ffn.down.{part}"] = sd[f"{h}fc2.{part}"]
            ours[f"{b}norm3.{part}"] = sd[f"{h}final_layer_norm.{part}"]
    _load_exact(model, ours)
    return model


def load_bart(path: str | Path) -> Seq2Seq:
    """A minillm Seq2Seq holding the weights of a downloaded Hugging Face BART folder."""
    hf_cfg, sd = read_hf_checkpoint(path)
    return bart_from_state_dict(sd, bart_config(hf_cfg))
