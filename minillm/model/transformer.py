"""The Transformer: blocks, a shared trunk, and two heads (GPT-style causal LM, BERT-style masked LM).

Read in order: norm (layers.py) → attention (attention.py) → FFN (layers.py) → Block → Transformer →
CausalLM / MaskedLM. A block is

    pre-norm  (GPT-2, Llama; default):  x = x + attn(norm1(x));  x = x + ffn(norm2(x))
    post-norm (original, BERT):         x = norm1(x + attn(x));  x = norm2(x + ffn(x))

Pre-norm keeps an un-normalised residual stream from input to output, which is why deep pre-norm
models train without warm-up tricks; it then needs one final norm before the head.

    >>> from minillm import ModelConfig, CausalLM
    >>> model = CausalLM(ModelConfig.from_preset("tiny"))
    >>> logits, loss = model(idx, targets)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minillm.model.attention import KVCache, MultiHeadAttention
from minillm.model.config import ModelConfig
from minillm.model.layers import ACTIVATION_FNS, Pooler, dropout, make_ffn, make_norm, silu
from minillm.model.losses import IGNORE_INDEX, causal_lm_loss, cross_entropy, mlm_loss
from minillm.model.positional import Rotary, make_additive_positions


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg, rotary)
        self.norm2 = make_norm(cfg)
        self.ffn = make_ffn(cfg)
        self.ffn_drop = nn.Dropout(cfg.rate("resid"))

    def forward(self, x, positions, key_padding_mask=None, cache=None, layer=0):  # (B, T, C) -> (B, T, C)
        if self.prenorm:
            x = x + self.attn(self.norm1(x), positions, key_padding_mask, cache, layer)
            x = x + dropout(self.ffn_drop, self.ffn(self.norm2(x)))
        else:
            x = self.norm1(x + self.attn(x, positions, key_padding_mask, cache, layer))
            x = self.norm2(x + dropout(self.ffn_drop, self.ffn(x)))
        return x


class Transformer(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, C): embeddings, positions, N blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = make_additive_positions(cfg)  # sinusoidal / learned, or None
        # "Attention Is All You Need" §3.4 multiplies token embeddings by √C. With sinusoids that
        # matters: each position vector has norm √(C/2), while an N(0, 0.02) token embedding has norm
        # 0.02·√C, so unscaled tokens are drowned by ~35× and the model learns slowly (measured: val
        # loss 3.2 vs 2.2 after 300-400 steps of the tiny preset). Learned tables start small too.
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.positional == "sinusoidal" else 1.0
        self.type_emb = nn.Embedding(cfg.n_token_types, cfg.n_embd) if cfg.n_token_types else None
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.emb_drop = nn.Dropout(cfg.rate("embd"))
        rotary = Rotary(cfg) if cfg.positional == "rotary" else None  # one table shared by all layers
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg) if cfg.prenorm else None  # post-norm blocks end normalised

    def forward(self, idx, positions=None, key_padding_mask=None, token_type_ids=None,
                cache: KVCache | None = None):
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:  # (explicit positions, e.g. for left-padded rows, are the caller's to check)
            if start + T > self.cfg.block_size:
                raise ValueError(f"{start + T} tokens are more than block_size={self.cfg.block_size}; "
                                 "crop the input to the last block_size tokens")
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.embed_scale != 1.0:  # (skip a multiply by 1: an extra pass over x in every step)
            x = x * self.embed_scale
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.type_emb is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
            x = x + self.type_emb(types)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = dropout(self.emb_drop, x)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, key_padding_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x) if self.final_norm is not None else x


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms; residual projections get
    std 0.02/√(2·n_layer) so the residual stream's variance does not grow with depth (GPT-2 §2.3)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = cfg.init_std
            if getattr(module, "is_residual_proj", False):
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)


class CausalLM(nn.Module):
    """GPT-style decoder: predicts token t+1 from tokens ≤ t."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.causal:
            raise ValueError("CausalLM needs ModelConfig.causal=True (use MaskedLM for a bidirectional model)")
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_weights(self, cfg)
        if cfg.tie_weights:  # input and output embeddings share one matrix (Press & Wolf, 2017)
            self.lm_head.weight = self.transformer.tok_emb.weight

    def forward(self, idx, targets=None, *, positions=None, key_padding_mask=None, cache=None, last_only=False):
        """idx (B, T) token ids; targets (B, T) next tokens (-100 = ignore). Returns (logits, loss).
        last_only: logits of the last position only, (B, 1, V): what a prompt's prefill needs. The
        head is a (C × V) matmul per position, for SmolLM2 ~20% of a 512-token prefill's flops."""
        h = self.transformer(idx, positions, key_padding_mask, cache=cache)  # (B, T, C)
        if last_only:
            if targets is not None:
                raise ValueError("last_only=True gives one position's logits: no loss over targets")
            h = h[:, -1:]  # (B, 1, C)
        logits = self.lm_head(h)  # (B, T, V)
        loss = causal_lm_loss(logits, targets) if targets is not None else None
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None,
                  spare: int = 0) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to max_len (block_size) tokens; with a
        sliding window it keeps the last W-1 tokens, plus `spare` to allow rewinding that far."""
        cfg = self.cfg
        p = next(self.parameters())  # a float one (a norm's at least), even with a quantized embedding
        # H_kv heads (grouped-query attention stores only those); a sliding window keeps W-1 tokens
        return KVCache(cfg.n_layer, batch_size, cfg.kv_heads, max_len or cfg.block_size, cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype, window=cfg.sliding_window,
                       spare=spare)


class MaskedLM(nn.Module):
    """BERT-style encoder with a masked-language-model head: predicts the tokens hidden by [MASK].

    With cfg.nsp_head it is BERT's pre-training model (Hugging Face's BertForPreTraining): a second
    head reads the pooled [CLS] vector and says whether segment B followed segment A in the text,
    and the loss is L_MLM + L_NSP.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.causal:
            raise ValueError("MaskedLM needs ModelConfig.causal=False: it attends in both directions")
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        # BERT's prediction head: dense → activation → norm → vocabulary projection (+ bias)
        self.head_dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.head_act = ACTIVATION_FNS.get(cfg.activation, silu)  # SwiGLU models use SiLU here
        self.head_norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias)
        # next-sentence prediction: pooled [CLS] -> 2 logits (0 = "B is next", 1 = "B is random",
        # Hugging Face's convention)
        self.pooler = Pooler(cfg) if cfg.nsp_head else None
        self.nsp = nn.Linear(cfg.n_embd, 2) if cfg.nsp_head else None
        init_weights(self, cfg)
        if cfg.tie_weights:
            self.decoder.weight = self.transformer.tok_emb.weight

    def pretraining_logits(self, idx, *, attention_mask=None, token_type_ids=None):
        """(MLM logits (B, T, V), NSP logits (B, 2) or None without the NSP head)."""
        kpm = attention_mask.bool() if attention_mask is not None else None
        h = self.transformer(idx, key_padding_mask=kpm, token_type_ids=token_type_ids)  # (B, T, C)
        logits = self.decoder(self.head_norm(self.head_act(self.head_dense(h))))  # (B, T, V)
        nsp_logits = self.nsp(self.pooler(h)) if self.nsp is not None else None  # (B, 2)
        return logits, nsp_logits

    def forward(self, idx, labels=None, *, attention_mask=None, token_type_ids=None, next_sentence_labels=None):
        """idx (B, T); labels (B, T) original ids at masked positions, -100 elsewhere;
        attention_mask (B, T) True/1 for real tokens, False/0 for padding; next_sentence_labels (B,)
        0 = B follows A, 1 = B is random (needs the NSP head). Returns (MLM logits, loss), where
        loss = L_MLM (+ L_NSP when next_sentence_labels are given)."""
        logits, nsp_logits = self.pretraining_logits(idx, attention_mask=attention_mask,
                                                     token_type_ids=token_type_ids)
        loss = mlm_loss(logits, labels) if labels is not None else None
        if next_sentence_labels is not None:
            if nsp_logits is None:
                raise ValueError("next_sentence_labels need a model built with ModelConfig.nsp_head=True")
            nsp_loss = cross_entropy(nsp_logits, next_sentence_labels, ignore_index=IGNORE_INDEX)
            loss = nsp_loss if loss is None else loss + nsp_loss  # L_pretrain = L_MLM + L_NSP
        return logits, loss


def build_model(cfg: ModelConfig) -> nn.Module:
    """CausalLM for a causal config, MaskedLM otherwise."""
    return CausalLM(cfg) if cfg.causal else MaskedLM(cfg)


# --- accounting -----------------------------------------------------------------------------

def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Unique parameters (tied weights counted once). `non_embedding` leaves out position tables,
    as in the scaling-law papers and nanoGPT's report."""
    n = sum(p.numel() for p in model.parameters())  # .parameters() already de-duplicates tied weights
    if non_embedding:
        pos = getattr(model.transformer, "pos_emb", None)
        if pos is not None:
            n -= sum(p.numel() for p in pos.parameters())
    return n


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int | None = None) -> dict:
    """FLOPs per token for a forward pass and a training step (forward + backward ≈ 3× forward).

    Each parameter does one multiply-add (2 FLOPs) per token in the forward; attention scores and
    the weighted sum add 2·2·T·C per layer (Kaplan et al. 2020; PaLM appendix B):
        forward  = 2·N + 4·L·T·C        train = 3 × forward = 6·N + 12·L·T·C
    (T = seq_len, defaulting to block_size; causal masking would halve the attention term, which
    the convention — and MFU figures quoted elsewhere — do not do.)
    """
    T = seq_len or cfg.block_size
    forward = 2 * n_params + 4 * cfg.n_layer * T * cfg.n_embd
    return {"forward": forward, "train": 3 * forward}
