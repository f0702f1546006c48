"""nanoGPT's model and `generate`, rebuilt as the yardstick for minillm's decoding benchmarks.

nanoGPT (github.com/karpathy/nanoGPT, model.py) is what a user would run instead of minillm, and
what bench/decode.py times minillm against. It cannot be downloaded here, so this file rebuilds
the parts that decide its speed, op for op as nanoGPT runs them on PyTorch ≥ 2.0:

    LayerNorm       F.layer_norm (one fused kernel), optional bias
    attention       one c_attn matmul to q, k, v; F.scaled_dot_product_attention(is_causal=True)
    MLP             c_fc → nn.GELU (exact) → c_proj
    GPT.forward     wte(idx) + wpe(arange(T)), the blocks, ln_f, and lm_head on the LAST position
                    only when no targets are given (its inference shortcut)
    GPT.generate    no KV cache: every new token re-runs the last block_size tokens; logits / τ,
                    optional top-k, softmax, torch.multinomial, torch.cat

`from_minillm` copies a minillm CausalLM with the same shape (learned positions, LayerNorm, GELU,
tied weights) into this model, and tests/test_nanogpt_reference.py checks that both compute the
same logits, so the benchmark compares two implementations of one function.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(0.0)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 bias: bool = True):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(0.0),
            h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for module in self.modules():  # nanoGPT's init (its c_proj rescaling does not change speed)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return self.lm_head(x[:, [-1], :]), None  # inference: only the last position's logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @torch.no_grad()
    def generate_greedy(self, idx, max_new_tokens: int):
        """`generate` with argmax in place of sampling: for checking tokens against minillm's."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            idx = torch.cat((idx, logits[:, -1, :].argmax(-1, keepdim=True)), dim=1)
        return idx


def from_minillm(model) -> GPT:
    """The nanoGPT twin of a minillm CausalLM built with nanoGPT's choices (learned positions,
    pre-norm LayerNorm, exact GELU, 4C hidden, tied weights, no GQA), its weights copied."""
    cfg = model.cfg
    want = dict(positional="learned", norm="layernorm", activation="gelu", prenorm=True, tie_weights=True)
    wrong = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if wrong or cfg.kv_heads != cfg.n_head or cfg.ffn_dim != 4 * cfg.n_embd:
        raise ValueError(f"not a nanoGPT-shaped model: {wrong or 'GQA or a non-4C FFN'}")
    gpt = GPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, bias=cfg.bias)
    src = model.transformer
    with torch.no_grad():
        gpt.transformer.wte.weight.copy_(src.tok_emb.weight)
        gpt.transformer.wpe.weight.copy_(src.pos_emb.emb.weight)
        pairs = [(gpt.transformer.ln_f, src.final_norm)]
        for mine, theirs in zip(gpt.transformer.h, src.blocks):
            pairs += [(mine.ln_1, theirs.norm1), (mine.ln_2, theirs.norm2), (mine.attn.c_attn, theirs.attn.qkv),
                      (mine.attn.c_proj, theirs.attn.proj), (mine.mlp.c_fc, theirs.ffn.up),
                      (mine.mlp.c_proj, theirs.ffn.down)]
        for dst, s in pairs:
            dst.weight.copy_(s.weight)
            if dst.bias is not None:
                dst.bias.copy_(s.bias)
    return gpt.to(src.tok_emb.weight.device).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

