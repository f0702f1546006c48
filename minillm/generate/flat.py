"""One cached decode step of a CausalLM, run without the module tree: the same ops, less Python.

A decode step feeds one token per row through the model. For a small model on a CPU its cost is
mostly not arithmetic: measured on the `tiny` preset (4 layers, C = 128; 2-core x86 CPU, 1 thread),
a step through the modules takes ~0.65 ms and the same PyTorch ops called from one function take
~0.42 ms. The difference is eager-mode machinery: nn.Module.__call__ for each of ~42 modules,
every `self.weight` looked up through Module.__getattr__, small helpers. Counted by cProfile over
a whole sampled generation, that is ~460 Python-level calls per token through the modules and ~210
with flat steps. nanoGPT pays the same tax on every forward; gpt-fast removes it
with torch.compile, which takes longer to compile than a short generation takes to run.

FlatDecoder reads the model once (its weights and its layers' bound functions, into one tuple per
block) and `step` then runs Transformer.forward → Block.forward → MultiHeadAttention.forward for
T = 1 as straight-line code. Every op is the one the modules would run, in the same order, so the
logits are bit-for-bit the modules' (tests/test_generate.py holds them equal across positions,
norms, activations, GQA, sliding windows, padding and quantized layers). A layer FlatDecoder does
not flatten (a quantized or LoRA linear, a written-out norm) is called through its own `forward`.

The FFN is asked for its own step (`FeedForward.bound_forward`); an FFN of another type (a mixture
of experts, say) is called through its own `forward`, so FlatDecoder never reads an FFN's weights.

It is an explicit switch (`flat_decode=True` in generate_tokens, on by default in `minillm generate`
and `minillm serve`): the decode core (minillm/generate/core.py) takes this branch inside
`decode_step` when it has a FlatDecoder. `build` checks types and steps aside, returning None,
whenever the modules must run themselves: forward hooks registered (they would not fire), a model
other than CausalLM, a block or attention of a type it does not know (a new layer falls back to
its modules instead of breaking here), or embeddings it does not reproduce (token types, an
embedding norm). Prefill and re-prefill (T > 1) always run through the modules: one forward over
the whole prompt, whose matmuls are large enough that the module tree's cost does not show.

A 30-layer grouped-query model (SmolLM2-135M: RMSNorm, RoPE, 9 query heads sharing 3 key/value
heads, SwiGLU) runs flat too. Its step asks each layer's Rotary once, for the query and key heads
together: RoPE is elementwise per head, so rotating the (H + H_kv) heads in one call gives the
same bits as two calls, and saves ~14 tensor calls per layer. The KV cache it writes into
(attention.KVCache) is preallocated to max_len: a step writes one column and reads a view, it
never reallocates or concatenates.

`compile=True` hands the whole step to torch.compile (gpt-fast's `decode_one_token`): Inductor
fuses the small ops between the matmuls and the Python between them disappears. It is not bit for
bit (fused kernels round differently, ~1e-7 relative on fp32 logits), it compiles the first steps
(minutes on a small CPU; once more when the cache length first changes, then shapes are
symbolic), and it needs a C++ compiler on a CPU. Measured on SmolLM2-135M fp32, 1 thread, our
2-core x86_64 CPU under a load of ~15 from other jobs: compiling took 1,263 s, and the compiled step
then ran 3,784 ms per token against 218 ms eager (logits within 1.4e-5, the same greedy tokens).
Its 151 matmuls still call BLAS (extern mm in the generated code); the loss is in the fused C++
kernels around them, over symbolic sizes (not profiled yet; one suspect is the in-place cache
write, which the compiler turns into a functional copy). So it is off by default;
bench/flat_compile.py measures it again (compile time, ms per token, break-even).
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from minillm.model.attention import MultiHeadAttention, attention_dispatch
from minillm.model.layers import FeedForward, bound_forward
from minillm.generate.native import NativeDecoder, why_not
from minillm.model.positional import LearnedPositions, SinusoidalPositions


def _has_hooks(model: nn.Module) -> bool:
    globals_ = (nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks)
    return any(globals_) or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# model -> (what its weights were, its compiled FlatDecoder): a new generation reuses the compiled
# step instead of compiling again (minutes), as long as the model's modules and tensors are the same
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, FlatDecoder]]" = weakref.WeakKeyDictionary()


def _identity(model: nn.Module) -> tuple[int, ...]:
    return tuple(map(id, itertools.chain(model.modules(), model.parameters(), model.buffers())))


def decode_steps(model: nn.Module, flat_decode) -> str:
    """How generate_tokens(flat_decode=...) runs `model`'s decode steps, in words (what `minillm
    generate` prints): "C decode steps", "flat Python steps", "compiled flat steps" or "modules"."""
    if not flat_decode:
        return "modules"
    if flat_decode == "compile":
        return "compiled flat steps"
    dec = FlatDecoder.build(model)
    return "modules" if dec is None else "C decode steps" if type(dec) is NativeDecoder else "flat Python steps"


def _ffn_fn(ffn: nn.Module):
    """The FFN's one-token step: FeedForward binds its own weights; any other FFN runs its forward."""
    return ffn.bound_forward() if type(ffn) is FeedForward else ffn.forward


class FlatDecoder:
    """`step(idx (B, 1), cache, positions, key_padding_mask) -> logits (B, V)` for a CausalLM."""

    def __init__(self, model: nn.Module, compile: bool | str = False):
        tr, cfg = model.transformer, model.cfg
        self.cfg = cfg
        emb = tr.tok_emb  # nn.Embedding's table, or a quantized one (a GGUF kept quantized) looked up by its forward
        self.embed = (lambda idx, w=emb.weight: F.embedding(idx, w)) if type(emb) is nn.Embedding else emb.forward
        self.embed_scale = tr.embed_scale
        pos = tr.pos_emb
        self.pos_table = (pos.table if isinstance(pos, SinusoidalPositions)
                          else pos.emb.weight if isinstance(pos, LearnedPositions) else None)
        self.layers = []
        for block in tr.blocks:
            attn = block.attn
            rotary = attn.rotary.forward if attn.rotary is not None else None
            self.layers.append((bound_forward(block.norm1), bound_forward(attn.qkv), rotary,
                                bound_forward(attn.proj), bound_forward(block.norm2), _ffn_fn(block.ffn)))
        self.final_norm = bound_forward(tr.final_norm) if tr.final_norm is not None else None
        self.lm_head = bound_forward(model.lm_head)
        self.H, self.H_kv = cfg.n_head, cfg.kv_heads
        # torch.compile traces `_step` once per new set of shapes; dynamic=True keeps the growing
        # cache length symbolic instead of compiling again for every token
        backend = "inductor" if compile is True else compile
        self.step = torch.compile(self._step, dynamic=True, backend=backend) if compile else self._step

    @classmethod
    def build(cls, model: nn.Module, compile: bool | str = False, native: bool = True):
        """A FlatDecoder for `model` now (weights as they are), or None if the modules must run.

        native: where NativeDecoder applies (generate/native.py: a Llama-family model whose linears
        are QuantLinear on a C backend or fp32 nn.Linear; why_not(model) says), return one instead:
        the same step, with the layer stack in one C call (not bit for bit: ~1e-6 relative).
        Ignored with compile.

        compile: True runs each step through torch.compile with Inductor (see the module docstring:
        not bit for bit, off by default); a string names another torch.compile backend ("eager"
        traces the step with Dynamo and runs the same ops: how the tests check the tracing). The
        compiled decoder is kept per model, so the next generation does not compile again."""
        from minillm.model.transformer import Block, CausalLM, Transformer

        if type(model) is not CausalLM or model.training or _has_hooks(model):
            return None
        tr = model.transformer
        if type(tr) is not Transformer or any(type(b) is not Block or type(b.attn) is not MultiHeadAttention
                                              for b in tr.blocks):
            return None  # a layer step() does not know: the modules run it
        if tr.type_emb is not None or tr.emb_norm is not None:
            return None
        if tr.pos_emb is not None and not isinstance(tr.pos_emb, (SinusoidalPositions, LearnedPositions)):
            return None
        if not compile:
            return NativeDecoder(model, cls(model)) if native and why_not(model) == "" else cls(model)
        key = (_identity(model), compile)
        seen = _COMPILED.get(model)
        if seen is None or seen[0] != key:
            seen = _COMPILED[model] = (key, cls(model, compile))
        return seen[1]

    def _step(self, idx: torch.Tensor, cache, positions: torch.Tensor | None = None,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`step`: Transformer.forward + CausalLM.forward for one new token per row, in eval mode.

        idx (B, 1); positions (B, 1) or None (then the cache's length, as Transformer.forward
        counts); key_padding_mask (B, Tk) True = real key, or None. Returns logits (B, V)."""
        B = idx.shape[0]
        cfg, H, H_kv = self.cfg, self.H, self.H_kv
        if positions is None:
            if cache.length + 1 > cfg.block_size:
                raise ValueError(f"{cache.length + 1} tokens are more than block_size={cfg.block_size}; "
                                 "crop the input to the last block_size tokens")
            positions = torch.arange(cache.length, cache.length + 1, device=idx.device)  # (1,)
        x = self.embed(idx)  # (B, 1, C)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_table is not None:
            x = x + F.embedding(positions, self.pos_table)  # (1, C) or (B, 1, C)
        for layer, (norm1, qkv, rotary, proj, norm2, ffn) in enumerate(self.layers):
            h = norm1(x) if cfg.prenorm else x
            heads = qkv(h).view(B, 1, H + 2 * H_kv, -1).transpose(1, 2)  # (B, H + 2·H_kv, 1, D)
            qk, v = heads.split_with_sizes([H + H_kv, H_kv], dim=1)  # (B, H + H_kv, 1, D), (B, H_kv, 1, D)
            if rotary is not None:
                qk = rotary(qk, positions)  # one call for q and k: elementwise, the same bits as two
            q, k = qk.split_with_sizes([H, H_kv], dim=1)  # (B, H, 1, D), (B, H_kv, 1, D)
            k, v = cache.update(layer, k, v)  # (B, H_kv, Tk, D)
            kpm = key_padding_mask
            if kpm is not None and kpm.shape[-1] > k.shape[-2]:
                kpm = kpm[:, -k.shape[-2]:]  # a sliding-window cache keeps only the last Tk keys
            y = attention_dispatch(cfg.attention, q, k, v, cfg.causal, kpm, 0.0, cfg.sliding_window)
            a = proj(y.transpose(1, 2).reshape(B, 1, -1))  # (B, 1, C) heads merged, then mixed
            if cfg.prenorm:
                x = x + a
                x = x + ffn(norm2(x))
            else:
                x = norm1(x + a)
                x = norm2(x + ffn(x))
        cache.advance(1)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)[:, -1]  # (B, V)
