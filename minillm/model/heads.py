"""Task heads: one label per sequence, on top of a pre-trained trunk (fine-tuning's model).

Pre-training leaves a `Transformer` that turns tokens into contextual vectors h (B, T, C). A task
head reads ONE vector per sequence and maps it to label logits, and fine-tuning trains it with
L_task = cross-entropy(head(pool(h)), label). Which vector depends on which way attention looks:

    encoder (BERT, sees both sides):  the [CLS] token at position 0, through BERT's pooler
                                      tanh(W h_0 + b); "cls" pooling (Devlin et al. 2019, §4.1)
    decoder (GPT, sees only the past): the LAST real token, the only one that has read the whole
                                      text (Raschka, LLMs from Scratch, ch. 6); "last" pooling
    either, without a [CLS] token:    the mean of the real tokens' vectors; "mean" pooling

Padding is on the right, so a decoder's real tokens never attend to it (they cannot see the future),
and an encoder is told which keys are padding by the attention mask.

    >>> clf = SequenceClassifier(cfg, labels=["negative", "positive"], pooling="cls")
    >>> logits, loss = clf(idx, labels, attention_mask=mask)        # (B, n_labels), scalar
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.model.config import ModelConfig
from minillm.model.layers import Pooler
from minillm.model.losses import cross_entropy
from minillm.model.transformer import Transformer, init_weights

POOLINGS = ("cls", "last", "mean")


class SequenceClassifier(nn.Module):
    """A trunk, a pooling rule, and a linear layer to the labels (BertForSequenceClassification's shape)."""

    def __init__(self, cfg: ModelConfig, labels: list[str], pooling: str | None = None, dropout: float = 0.1):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {labels}")
        pooling = pooling or ("last" if cfg.causal else "cls")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and cfg.causal:
            raise ValueError("pooling='cls' needs an encoder (causal=False): in a decoder the first token "
                             "sees nothing after it; use 'last'")
        self.cfg, self.labels, self.pooling = cfg, list(labels), pooling
        self.transformer = Transformer(cfg)
        self.pooler = Pooler(cfg) if pooling == "cls" else None
        self.drop = nn.Dropout(dropout)  # BERT's classifier dropout (hidden_dropout_prob = 0.1)
        self.head = nn.Linear(cfg.n_embd, len(labels))
        init_weights(self, cfg)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:  # (B, T, C) -> (B, C)
        if self.pooling == "cls":
            return self.pooler(h)
        B, T, _ = h.shape
        mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones(B, T, dtype=torch.bool, device=h.device))  # (B, T)
        if self.pooling == "last":
            last = mask.sum(dim=1) - 1  # (B,) index of the last real token (padding is on the right)
            return h[torch.arange(B, device=h.device), last]
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def forward(self, idx, labels=None, *, attention_mask=None, token_type_ids=None):
        """idx (B, T) right-padded ids; attention_mask (B, T) 1 for real tokens; labels (B,) label ids.
        Returns (logits (B, n_labels), loss or None)."""
        kpm = attention_mask.bool() if attention_mask is not None else None
        h = self.transformer(idx, key_padding_mask=kpm, token_type_ids=token_type_ids)  # (B, T, C)
        logits = self.head(self.drop(self.pool(h, attention_mask)))  # (B, n_labels)
        loss = cross_entropy(logits, labels) if labels is not None else None
        return logits, loss

    @classmethod
    def from_pretrained(cls, lm: nn.Module, labels: list[str], pooling: str | None = None,
                        dropout: float = 0.1) -> "SequenceClassifier":
        """A classifier whose trunk (and pooler, if `lm` has one and pooling is "cls") are copies of a
        pre-trained CausalLM's or MaskedLM's; the head starts fresh. The LM's own heads are left out."""
        cfg = lm.cfg
        if pooling is None:
            pooling = "last" if cfg.causal else ("cls" if getattr(lm, "pooler", None) is not None else "mean")
        clf = cls(cfg, labels, pooling, dropout)
        clf.transformer.load_state_dict(lm.transformer.state_dict())
        if clf.pooler is not None and getattr(lm, "pooler", None) is not None:
            clf.pooler.load_state_dict(lm.pooler.state_dict())
        return clf.to(next(lm.parameters()).device)
