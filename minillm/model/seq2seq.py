"""The paper's Transformer: an encoder–decoder for translation ("Attention Is All You Need", 2017).

    encoder:  src ids (B, S) -> embed·√C + sinusoids -> N × [self-attention (both ways) + FFN] -> memory (B, S, C)
    decoder:  tgt ids (B, T) -> embed·√C + sinusoids -> N × [causal self-attention
                                                             + cross-attention over memory + FFN] -> logits

Everything but cross-attention is minillm's own: the encoder IS `Transformer` with causal=False, the
decoder's self-attention is `MultiHeadAttention` with causal=True, norms and FFNs come from layers.py.
Cross-attention (§3.2.3) takes its queries from the decoder and its keys/values from the encoder
output, so Tq (target length) ≠ Tk (source length) and source padding is masked as keys:

    CrossAttn(x, memory) = softmax( (x Wq)(memory Wk)ᵀ / √D  + pad_mask ) (memory Wv)

Because K and V depend only on the source, decoding computes them ONCE per sentence (`cross_kv`) and
reuses them at every step; the decoder's self-attention uses the ordinary KV cache.

One vocabulary serves both languages (the paper's shared BPE); with `tie_weights` the encoder
embedding, decoder embedding and output projection are one matrix (§3.4, Press & Wolf 2017).
Training uses label smoothing ε = 0.1 (§5.4) and the warm-up-then-inverse-sqrt schedule (§5.3,
`transformer_lr`).

    >>> cfg = Seq2SeqConfig(ModelConfig(vocab_size=100, n_embd=64, n_head=4), n_enc_layer=2, n_dec_layer=2)
    >>> model = Seq2Seq(cfg)
    >>> logits, loss = model(src, tgt_in, tgt_out)          # teacher forcing
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.model.attention import KVCache, MultiHeadAttention, attention_dispatch, merge_heads, split_heads
from minillm.model.config import ModelConfig
from minillm.model.layers import dropout, make_ffn, make_norm
from minillm.model.positional import Rotary, make_additive_positions
from minillm.model.transformer import Transformer, init_weights


@dataclass
class Seq2SeqConfig:
    # sizes, positions, norms, attention implementation: shared by encoder and decoder. Its n_layer
    # and causal fields are ignored (set per side below); positional defaults to the paper's sinusoids
    model: ModelConfig = field(default_factory=ModelConfig)
    n_enc_layer: int = 6  # encoder blocks (the paper's base model: 6)
    n_dec_layer: int = 6  # decoder blocks (6)
    pad_id: int = 0  # padding id of the shared vocabulary: masked as a key, ignored by the loss
    bos_id: int = 1  # the decoder's first input ("start of sentence")
    eos_id: int = 2  # the decoder's last target: generation stops there
    label_smoothing: float = 0.1  # ε of §5.4: hurts perplexity, helps BLEU
    # a bias on the output logits (Hugging Face BART/Marian's final_logits_bias). The paper's tied
    # output layer has none; checkpoints converted from fairseq/Marian may carry one, so loading them
    # needs the switch (minillm/weights/huggingface_seq2seq.py)
    output_bias: bool = False

    def __post_init__(self):
        if self.n_enc_layer <= 0 or self.n_dec_layer <= 0:
            raise ValueError(f"Seq2SeqConfig needs n_enc_layer, n_dec_layer > 0, got "
                             f"{self.n_enc_layer}, {self.n_dec_layer}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"Seq2SeqConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.model.vocab_size:
                raise ValueError(f"Seq2SeqConfig.{name}={getattr(self, name)} is outside the vocabulary "
                                 f"(vocab_size={self.model.vocab_size})")
        if self.model.sliding_window is not None:
            raise ValueError("Seq2Seq has no sliding-window attention; set ModelConfig.sliding_window=None")

    @property
    def encoder(self) -> ModelConfig:
        return dataclasses.replace(self.model, n_layer=self.n_enc_layer, causal=False)

    @property
    def decoder(self) -> ModelConfig:
        return dataclasses.replace(self.model, n_layer=self.n_dec_layer, causal=True)


class CrossAttention(nn.Module):
    """Queries from the decoder x (B, T, C), keys and values from the encoder memory (B, S, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.q_dim, self.kv_dim = cfg.attn_dim, cfg.kv_heads * cfg.head_dim
        # separate projections: q reads the target side, k and v read the source side
        self.q = nn.Linear(cfg.n_embd, self.q_dim, bias=cfg.qkv_has_bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * self.kv_dim, bias=cfg.qkv_has_bias)
        self.proj = nn.Linear(self.q_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True  # scaled at init, see model.init_weights
        self.resid_drop = nn.Dropout(cfg.rate("resid"))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, C) -> k, v (B, H_kv, S, D). Depends only on the source: compute once per sentence."""
        k, v = self.kv(memory).split([self.kv_dim, self.kv_dim], dim=-1)  # 2 × (B, S, H_kv·D)
        return split_heads(k, self.n_kv_head), split_heads(v, self.n_kv_head)  # 2 × (B, H_kv, S, D)

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], src_mask=None):  # (B, T, C) -> (B, T, C)
        q = split_heads(self.q(x), self.n_head)  # (B, H, T, D)
        k, v = kv  # (B, H_kv, S, D)
        dropout_p = self.cfg.rate("attn") if self.training else 0.0
        # causal=False: every target position may read the whole source; src_mask (B, S) hides padding.
        # attention_dispatch handles Tq ≠ Tk with a key-padding mask for all three implementations.
        y = attention_dispatch(self.cfg.attention, q, k, v, False, src_mask, dropout_p)  # (B, H, T, D)
        return dropout(self.resid_drop, self.proj(merge_heads(y)))  # (B, T, C)


class DecoderBlock(nn.Module):
    """pre-norm:  x += self_attn(n1(x)); x += cross_attn(n2(x), memory); x += ffn(n3(x))
    post-norm (the paper): x = n1(x + self_attn(x)); x = n2(x + cross_attn(x)); x = n3(x + ffn(x))"""

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.norm2, self.norm3 = make_norm(cfg), make_norm(cfg), make_norm(cfg)
        self.self_attn = MultiHeadAttention(cfg, rotary)  # cfg.causal is True: the future is hidden
        self.cross_attn = CrossAttention(cfg)
        self.ffn = make_ffn(cfg)
        self.ffn_drop = nn.Dropout(cfg.rate("resid"))

    def forward(self, x, positions, kv, src_mask=None, tgt_mask=None, cache=None, layer=0):
        if self.prenorm:
            x = x + self.self_attn(self.norm1(x), positions, tgt_mask, cache, layer)
            x = x + self.cross_attn(self.norm2(x), kv, src_mask)
            x = x + dropout(self.ffn_drop, self.ffn(self.norm3(x)))
        else:
            x = self.norm1(x + self.self_attn(x, positions, tgt_mask, cache, layer))
            x = self.norm2(x + self.cross_attn(x, kv, src_mask))
            x = self.norm3(x + dropout(self.ffn_drop, self.ffn(x)))
        return x  # (B, T, C)


def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, eps: float,
                                 ignore_index: int) -> torch.Tensor:
    """Mean over non-ignored positions of  (1-ε)·(-log p[target]) + ε·mean_v(-log p[v]).

    The smoothed target puts 1-ε on the right token and spreads ε uniformly over all V tokens
    (Szegedy et al. 2016); its cross-entropy splits into the two terms above. Equal to
    F.cross_entropy(..., label_smoothing=ε, ignore_index=...), which the tests check.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    keep = targets != ignore_index  # (B, T)
    safe = targets.masked_fill(~keep, 0)  # any valid id; those positions are dropped below
    nll = -logp.gather(-1, safe[..., None]).squeeze(-1)  # (B, T)  -log p[target]
    uniform = -logp.mean(dim=-1)  # (B, T)  mean over the vocabulary of -log p[v]
    per_token = (1.0 - eps) * nll + eps * uniform
    return per_token[keep].sum() / keep.sum().clamp_min(1)


def transformer_lr(step: int, d_model: int, warmup: int = 4000) -> float:
    """The paper's schedule (§5.3):  lrate = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).

    Linear warm-up for `warmup` steps, then decay ∝ 1/√step; the two branches meet at step = warmup,
    where lrate peaks at (d_model·warmup)^-0.5 (7.0e-4 for d=512, warmup=4000). Steps count from 1.
    """
    step = max(step, 1)  # step 0 would be 0^-0.5: the first optimizer step is step 1
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


class Seq2Seq(nn.Module):
    """Encoder–decoder Transformer. forward(src, tgt_in, tgt_out) -> (logits (B, T, V), loss or None)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = Transformer(enc)  # embeddings + positions + bidirectional blocks + final norm
        self.tok_emb = nn.Embedding(dec.vocab_size, dec.n_embd)  # decoder input embedding
        self.pos_emb = make_additive_positions(dec)
        # §3.4: embeddings are multiplied by √C (matters with sinusoids, see transformer.py)
        self.embed_scale = math.sqrt(dec.n_embd) if dec.positional == "sinusoidal" else 1.0
        # embed_norm (BART's layernorm_embedding): the decoder normalises its summed embeddings too
        self.emb_norm = make_norm(dec) if dec.embed_norm else None
        self.emb_drop = nn.Dropout(dec.rate("embd"))
        rotary = Rotary(dec) if dec.positional == "rotary" else None
        self.blocks = nn.ModuleList(DecoderBlock(dec, rotary) for _ in range(cfg.n_dec_layer))
        self.final_norm = make_norm(dec) if dec.prenorm else None
        self.lm_head = nn.Linear(dec.n_embd, dec.vocab_size, bias=cfg.output_bias)
        # residual projections scaled by 1/√(2·L) with L the number of layers on each side
        init_weights(self, dec)  # every module, with the decoder's depth ...
        init_weights(self.encoder, enc)  # ... then the encoder again with its own
        if cfg.model.tie_weights:  # one matrix: source embedding = target embedding = output layer
            self.tok_emb.weight = self.encoder.tok_emb.weight
            self.lm_head.weight = self.encoder.tok_emb.weight

    # --- the three stages decoding calls separately --------------------------------------------

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> memory (B, S, C). src_mask (B, S): True for real tokens."""
        return self.encoder(src, key_padding_mask=src_mask)

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention k, v (B, H_kv, S, D): computed once per source."""
        return [block.cross_attn.memory_kv(memory) for block in self.blocks]

    def decode(self, tgt_in, kv, src_mask=None, tgt_mask=None, cache: KVCache | None = None):
        """tgt_in (B, T) -> logits (B, T, V), attending to the source through `kv` (from cross_kv)."""
        B, T = tgt_in.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.model.block_size:
            raise ValueError(f"{start + T} target tokens are more than block_size={self.cfg.model.block_size}")
        positions = torch.arange(start, start + T, device=tgt_in.device)  # (T,)
        x = self.tok_emb(tgt_in) * self.embed_scale  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = dropout(self.emb_drop, x)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, kv[i], src_mask, tgt_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)  # (B, T, V)

    def forward(self, src, tgt_in, tgt_out=None, src_mask=None, tgt_mask=None):
        """Teacher forcing: tgt_in = [BOS, y1 .. yn], tgt_out = [y1 .. yn, EOS], both padded with pad_id.
        Masks default to "token != pad_id". Returns (logits (B, T, V), label-smoothed loss or None)."""
        pad = self.cfg.pad_id
        src_mask = src != pad if src_mask is None else src_mask.bool()  # (B, S)
        tgt_mask = tgt_in != pad if tgt_mask is None else tgt_mask.bool()  # (B, T)
        memory = self.encode(src, src_mask)  # (B, S, C)
        logits = self.decode(tgt_in, self.cross_kv(memory), src_mask, tgt_mask)  # (B, T, V)
        loss = None
        if tgt_out is not None:
            loss = label_smoothed_cross_entropy(logits, tgt_out, self.cfg.label_smoothing, ignore_index=pad)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for the decoder's self-attention (cross-attention needs none: see cross_kv)."""
        dec, p = self.cfg.decoder, self.tok_emb.weight
        return KVCache(dec.n_layer, batch_size, dec.kv_heads, max_len or dec.block_size, dec.head_dim,
                       device=p.device, dtype=p.dtype)
