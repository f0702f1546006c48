"""Pruning, written out: set weights to zero (unstructured, 2:4) or remove whole heads and neurons.

A trained network has many weights it barely uses; pruning removes them and, usually after a short
fine-tune, recovers most of the quality. Three kinds, from "zeros anywhere" to "a smaller model":

unstructured magnitude (Han et al. 2015): drop the fraction s of weights with the smallest |w|.
    layer-wise: in every matrix W separately, zero the k = round(s·numel(W)) smallest |w|;
    global:     rank |w| across all prunable matrices at once, so layers that matter less lose more.
    The zeros are kept by a boolean mask M (1 = keep): after every optimizer step W ← W ⊙ M.
    Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune") raises the sparsity over
    n pruning steps Δt apart, starting at step t0, instead of all at once:
        s_t = s_f + (s_i - s_f)·(1 - (t - t0)/(n·Δt))³
    — fast at first, when many weights are redundant, slowing down as the network has less to give.
    Zeros anywhere save nothing on a dense matmul: this is about quality per non-zero weight.

2:4 semi-structured (NVIDIA Ampere's sparse tensor cores, Mishra et al. 2021): in every group of 4
    consecutive weights along the input dimension keep the 2 largest |w|. Exactly 50% sparse, in a
    pattern the hardware can skip: `to_semi_structured` turns such weights into PyTorch's
    SparseSemiStructuredTensor on CUDA (about 2× fewer matmul FLOPs). On CPU only quality is measured.

structured (Michel et al. 2019 "Are Sixteen Heads Really Better than One?"; Molchanov et al. 2019):
    remove whole attention heads and FFN neurons, then copy what is left into a SMALLER dense model
    (fewer heads: ModelConfig.n_head, head_size; fewer neurons: ffn_hidden) that is faster anywhere.
    A head h of a block owns D rows of each of q, k, v in `attn.qkv` and D columns of `attn.proj`;
    FFN neuron j owns row j of `ffn.up` (and `ffn.gate`) and column j of `ffn.down`. Its importance
    is the sum of a per-weight score over what it owns:
        magnitude:  w²                        (the group's squared L2 norm)
        taylor:     |w · ∂L/∂w|               (first-order change of the loss if w were set to 0,
                                               gradient summed over a few batches)
    The same number is removed in every layer (uniform), so the existing config fields describe it.

Only the Linear layers inside the blocks are pruned: the token embedding (tied to the output head)
and the head are the most sensitive layers and are left dense, as in most pruning papers.
A pruned model saves and loads like any other (minillm/weights/checkpoint.py): zeros are just zeros in the
weights, and a structurally pruned one has a smaller config.json. `minillm prune` runs all of this.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from minillm.model.transformer import build_model

METHODS = ("magnitude", "global", "2:4", "heads", "neurons", "structured")


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} of every nn.Linear inside the Transformer blocks (not the embedding or head)."""
    if getattr(model, "quant_config", None) is not None:
        raise ValueError("this model is quantized: prune the float checkpoint it came from, then quantize")
    return {f"transformer.blocks.{name}.weight": m.weight
            for name, m in model.transformer.blocks.named_modules() if isinstance(m, nn.Linear)}


def sparsity_of(weights) -> float:
    """Fraction of exact zeros over the given tensors (a dict's values or any iterable)."""
    ts = list(weights.values()) if isinstance(weights, dict) else list(weights)
    return sum(int((t == 0).sum()) for t in ts) / max(1, sum(t.numel() for t in ts))


# --- unstructured magnitude pruning ----------------------------------------------------------

def _smallest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask, False at the k smallest entries of `score` (exactly k, ties broken by position)."""
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    mask[torch.argsort(score.flatten(), stable=True)[:k]] = False
    return mask.view_as(score)


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str = "layer") -> dict:
    """Masks (1 = keep) that zero exactly round(s·n) weights: n per matrix ("layer") or in total ("global")."""
    # |w| as importance: zeroing w changes the output y = Wx by w·x_k, so, for inputs of similar size,
    # the smallest |w| are the cheapest to remove (Han et al. 2015; LeCun's Optimal Brain Damage refines it)
    check_sparsity(sparsity)
    if scope == "layer":
        return {n: _smallest_k_mask(w.detach().abs(), round(sparsity * w.numel())) for n, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    # one ranking over every weight: concatenate |w|, cut at the k-th smallest, split back
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])  # (Σ numel,)
    keep = _smallest_k_mask(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for n, w in weights.items():
        masks[n] = keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """W ← W ⊙ M for every masked tensor: call after each optimizer step to keep pruned weights at 0
    (AdamW's momentum would otherwise move them again)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, m in masks.items():
        params[name].mul_(m.to(params[name].dtype))


def gradual_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, n_steps: int = 10,
                     interval: int = 1) -> float:
    """Zhu & Gupta's cubic schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n·Δt))³, held outside [t0, t0+nΔt]."""
    check_sparsity(final)
    progress = min(max(step - start, 0) / (n_steps * interval), 1.0)  # 0 → 1
    return final + (initial - final) * (1.0 - progress) ** 3


# --- 2:4 semi-structured sparsity --------------------------------------------------------------

def two_four_masks(weights: dict[str, torch.Tensor]) -> dict:
    """In every group of 4 consecutive inputs of a row keep the 2 largest |w| (exactly 50% zeros)."""
    masks = {}
    for n, w in weights.items():
        N, K = w.shape
        if K % 4:
            raise ValueError(f"{n}: 2:4 sparsity needs the input dimension to be a multiple of 4, got {K}")
        g = w.detach().abs().reshape(N, K // 4, 4)  # (N, K/4, 4): the groups
        top2 = g.topk(2, dim=-1).indices  # (N, K/4, 2)
        m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top2, True)
        masks[n] = m.reshape(N, K)
    return masks


def is_two_four(w: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs holds at most 2 non-zeros."""
    N, K = w.shape
    return K % 4 == 0 and bool(((w.reshape(N, K // 4, 4) != 0).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Store every 2:4-sparse block weight as a SparseSemiStructuredTensor (CUDA, fp16/bf16; inference).

    The sparse tensor cores skip the zeros: half the multiply-adds. Needs Ampere or newer."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise ValueError("2:4 sparse kernels run on CUDA: move the model to a GPU (on CPU the zeros are "
                         "only measured for quality)")
    from torch.sparse import to_sparse_semi_structured

    for name, w in prunable_weights(model).items():
        if not is_two_four(w):
            raise ValueError(f"{name} is not 2:4 sparse; prune it with two_four_masks first")
        module = model.get_submodule(name.rsplit(".", 1)[0])
        module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
    return model


# --- structured pruning: whole heads and neurons ------------------------------------------------

def weight_scores(model: nn.Module, method: str = "magnitude", batches=()) -> dict[str, torch.Tensor]:
    """Per-weight importance of each prunable matrix: w² ("magnitude") or |w·∂L/∂w| ("taylor")."""
    weights = prunable_weights(model)
    if method == "magnitude":
        return {n: w.detach().pow(2) for n, w in weights.items()}
    if method != "taylor":
        raise ValueError(f"importance must be 'magnitude' or 'taylor', got {method!r}")
    if not batches:
        raise ValueError("taylor importance needs a few batches (x, y) to take gradients on")
    model.zero_grad(set_to_none=True)
    for x, y in batches:  # ∂L/∂w summed over the batches
        model(x, y)[1].backward()
    scores = {n: (w.detach() * w.grad).abs() for n, w in weights.items()}
    model.zero_grad(set_to_none=True)
    return scores


def group_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> tuple[list, list]:
    """(head scores [(H,) per layer], neuron scores [(F,) per layer]): each group's weight scores summed."""
    cfg, heads, neurons = model.cfg, [], []
    H, D = cfg.n_head, cfg.head_dim
    for i in range(cfg.n_layer):
        s = lambda part: scores[f"transformer.blocks.{i}.{part}.weight"]  # noqa: E731
        if cfg.kv_heads != H:  # grouped-query attention: heads are not separable one by one
            heads.append(None)
        else:
            qkv = s("attn.qkv").reshape(3, H, D, cfg.n_embd)  # (3·H·D, C) -> (q|k|v, H, D, C)
            proj = s("attn.proj").reshape(cfg.n_embd, H, D)  # (C, H·D) -> (C, H, D)
            heads.append(qkv.sum(dim=(0, 2, 3)) + proj.sum(dim=(0, 2)))  # (H,)
        ffn = s("ffn.up").sum(1) + s("ffn.down").sum(0)  # rows of up + columns of down: (F,)
        if f"transformer.blocks.{i}.ffn.gate.weight" in scores:  # SwiGLU: the gate's rows too
            ffn = ffn + s("ffn.gate").sum(1)
        neurons.append(ffn)
    return heads, neurons


def choose_structure(model: nn.Module, heads: float = 0.0, neurons: float = 0.0, importance: str = "magnitude",
                     batches=()) -> dict:
    """Plan: per layer, the sorted indices of the heads and neurons to KEEP (the most important ones);
    round(heads·H) heads and round(neurons·F) neurons are removed from every layer."""
    check_sparsity(heads)
    check_sparsity(neurons)
    cfg = model.cfg
    if heads > 0 and cfg.kv_heads != cfg.n_head:
        raise ValueError("pruning heads of grouped-query attention (n_kv_head < n_head) would have to remove "
                         "whole groups; not supported: prune FFN neurons only (method 'neurons')")
    n_heads = cfg.n_head - round(heads * cfg.n_head)
    n_neurons = cfg.ffn_dim - round(neurons * cfg.ffn_dim)
    if n_heads < 1 or n_neurons < 1:
        raise ValueError("that would remove every head or neuron of a layer; use a smaller fraction")
    head_s, neuron_s = group_scores(model, weight_scores(model, importance, batches))
    keep = lambda s, k: sorted(s.topk(k).indices.tolist())  # noqa: E731  (sorted: keep the original order)
    every_head = list(range(cfg.n_head))
    return {"heads": [every_head if n_heads == cfg.n_head else keep(s, n_heads) for s in head_s],
            "neurons": [keep(s, n_neurons) for s in neuron_s]}


def _rows(cfg, kept_heads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of `attn.qkv` (and columns of `attn.proj`) that belong to the kept heads."""
    D, A = cfg.head_dim, cfg.attn_dim
    per_head = torch.cat([torch.arange(h * D, (h + 1) * D) for h in kept_heads])  # within q (or k, v)
    return per_head, torch.cat([per_head, per_head + A, per_head + 2 * A])  # (H'·D,), (3·H'·D,)


def _selections(cfg, kept_heads: list[int], kept_neurons: list[int]) -> list:
    """(layer name, dimension, indices kept) for one block; attention is untouched when every head stays."""
    kn = torch.as_tensor(kept_neurons)
    out = [("ffn.up", 0, kn), ("ffn.gate", 0, kn), ("ffn.down", 1, kn)]
    if len(kept_heads) < cfg.n_head:
        cols, rows = _rows(cfg, kept_heads)
        out += [("attn.qkv", 0, rows), ("attn.proj", 1, cols)]
    return out


def structure_masks(model: nn.Module, plan: dict) -> dict[str, torch.Tensor]:
    """Masks that zero the removed heads' and neurons' weights (and biases) in place: the same
    function as `shrink_model(model, plan)`, at the original size."""
    params, masks = dict(model.named_parameters()), {}
    for i, (kh, kn) in enumerate(zip(plan["heads"], plan["neurons"])):
        p = f"transformer.blocks.{i}."
        for name, dim, idx in _selections(model.cfg, kh, kn):
            for kind in ("weight", "bias"):
                t = params.get(p + f"{name}.{kind}")
                if t is None or (kind == "bias" and dim == 1):  # an output bias belongs to no head/neuron
                    continue
                m = torch.zeros(t.shape[dim], dtype=torch.bool)
                m[torch.as_tensor(idx)] = True
                masks[p + f"{name}.{kind}"] = (m[:, None] if dim == 0 and t.dim() == 2 else m).expand_as(t)
    return masks


@torch.no_grad()
def shrink_model(model: nn.Module, plan: dict) -> nn.Module:
    """A new, smaller dense model holding only the kept heads and neurons (uniform across layers)."""
    cfg = model.cfg
    n_heads, n_neurons = len(plan["heads"][0]), len(plan["neurons"][0])
    if any(len(h) != n_heads for h in plan["heads"]) or any(len(n) != n_neurons for n in plan["neurons"]):
        raise ValueError("shrink_model needs the same number of heads and neurons kept in every layer")
    heads = {} if n_heads == cfg.n_head else dict(n_head=n_heads, n_kv_head=None, head_size=cfg.head_dim)
    small_cfg = dataclasses.replace(cfg, ffn_hidden=n_neurons, **heads)
    small = build_model(small_cfg).to(next(model.parameters()).device)
    state = model.state_dict()
    for i, (kh, kn) in enumerate(zip(plan["heads"], plan["neurons"])):
        p = f"transformer.blocks.{i}."
        # keep rows (outputs) of qkv/up/gate and columns (inputs) of proj/down; output biases stay whole
        for name, dim, idx in _selections(cfg, kh, kn):
            for kind in ("weight", "bias"):
                key = p + f"{name}.{kind}"
                if key in state and not (kind == "bias" and dim == 1):
                    state[key] = state[key].index_select(dim, idx.to(state[key].device))
    small.load_state_dict(state)  # strict: every tensor has its new shape, nothing is left over
    return small.train(model.training)
