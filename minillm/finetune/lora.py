"""LoRA: fine-tune a few low-rank matrices instead of the whole model (Hu et al. 2021).

The idea: the update a fine-tune makes to a weight matrix W (out × in) has low "intrinsic rank", so
learn it as a product of two thin matrices and keep W frozen:

    y = x Wᵀ + b + (α/r) · (dropout(x) Aᵀ) Bᵀ        A: (r, in)   B: (out, r)   r ≪ min(in, out)

B starts at zero, so at step 0 the model computes exactly what it did before (ΔW = B A = 0), and A
starts Kaiming-uniform (as nn.Linear and PEFT do) so that B's gradient is not zero. The scale α/r
keeps the update's size roughly independent of r: change the rank without re-tuning the learning
rate. Per adapted layer this trains r·(in + out) numbers instead of in·out.

After training the update folds back into the weight, W' = W + (α/r) B A, and the merged model is a
plain model again (no extra matmuls at inference, quantizable, savable as a normal checkpoint).

It is a module swap in the style of gpt-fast: `apply_lora` replaces chosen nn.Linear layers by
`LoRALinear`; nothing inside the model knows about LoRA.

    >>> names = apply_lora(model, rank=8, alpha=16.0, targets=("qkv", "proj"))
    >>> optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-3)   # ... train ...
    >>> save_adapter("out/adapter", model, {"base": "ckpt.pt"})          # a few hundred KB
    >>> merge_lora(model)                                                # back to nn.Linear
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.files import write_bytes, write_json

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_SETTINGS = ("rank", "alpha", "targets", "dropout")  # the keys apply_lora needs back from the config


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = x Wᵀ + b + (α/r)·(dropout(x) Aᵀ) Bᵀ.

    The base layer's own `weight` and `bias` Parameters are registered here under the same names, so
    the state-dict keys of W and b do not change (`...qkv.weight`) and code that reads `.weight` keeps
    working; weight tying with another module (e.g. lm_head ↔ tok_emb) is kept as well.

    A QuantLinear base (QLoRA, finetune/qlora.py) is kept whole as `self.base` (keys `...qkv.base.weight_q`,
    as PEFT's `base_layer`): its codes stay packed and frozen, and it computes x Ŵᵀ + b itself.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank  # α/r
        if isinstance(base, nn.Linear):
            self.base = None
            self.weight = base.weight  # (out, in), frozen by apply_lora
            self.bias = base.bias  # (out,) or None
            w = base.weight
        else:  # a QuantLinear: A and B take the dtype and device of its scales (Ŵ's dtype)
            self.base = base
            w = base.scales
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        # PEFT's init for A: nn.Linear's default, kaiming_uniform with a=√5, i.e. U(-1/√in, 1/√in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B A, an (out, in) matrix: what merging adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        # Two thin matmuls, x → (..., r) → (..., out), never the full (out, in) ΔW: that is the saving
        # in compute and activation memory during training.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        frozen = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)  # (..., out)
        return frozen + self.scaling * update

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={(self.bias if self.base is None else self.base.bias) is not None}, rank={self.rank}, "
                f"alpha={self.alpha}")


def _named_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear, QuantLinear (QLoRA) or LoRALinear of the model by module name (what LoRA can adapt)."""
    from minillm.compress.quant import QuantLinear  # local: fine-tuning need not load the compressor

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear, LoRALinear))
            and not isinstance(model.get_submodule(name.rpartition(".")[0]), LoRALinear)}


def _check_not_quantized(model: nn.Module) -> None:
    from minillm.compress.quant import QuantLinear

    if hasattr(model, "quant_config") or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("LoRA on a quantized model is not supported: fine-tune the float checkpoint, "
                         "then quantize the merged model (or train QLoRA adapters over the quantized base: "
                         "apply_lora(..., quantized=True), finetune/qlora.py)")


def _targeted(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The linear layers whose name's last component is in `targets`; a target matching none is an error."""
    linears = _named_linears(model)
    known = sorted({name.rsplit(".", 1)[-1] for name in linears})
    for t in targets:
        if t not in known:
            raise ValueError(f"LoRA target {t!r} matches no linear layer; the model's linear layers are: "
                             f"{', '.join(known)}")
    return {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets}


def _as_targets(targets) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target layer name, e.g. targets=('qkv', 'proj')")
    return targets


def check_rank(model: nn.Module, rank: int, targets) -> dict[str, nn.Module]:
    """The layers `targets` names, after checking that a rank-`rank` update fits each of them: B·A has
    rank at most min(in, out), so a larger rank adds parameters (and memory) without adding anything."""
    chosen = _targeted(model, _as_targets(targets))
    widest = min((min(m.in_features, m.out_features) for m in chosen.values()), default=rank)
    if rank > widest:
        raise ValueError(f"LoRA rank {rank} is larger than the adapted layers allow (min(in, out) = {widest}); "
                         f"pick a rank <= {widest} (8 or 16 is typical)")
    return chosen


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=("qkv", "proj"),
               dropout: float = 0.0, quantized: bool = False) -> list[str]:
    """Freeze every parameter of `model`, then swap each nn.Linear whose name ends in one of `targets`
    (its last dotted component: "qkv" matches "transformer.blocks.0.attn.qkv") for a LoRALinear.

    In place; returns the names of the swapped layers. Only the A and B matrices are trainable after.
    quantized=True adapts QuantLinear layers too (QLoRA, finetune/qlora.py). It is a choice to make
    explicitly, since such a model merges into a float one, larger than the quantized model it started from.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = _as_targets(targets)
    if not quantized:
        _check_not_quantized(model)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has LoRA layers: merge_lora it first, or apply LoRA once")
    chosen = check_rank(model, rank, targets)
    model.requires_grad_(False)  # the base model is frozen; only the new A, B below will train
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    model.lora_config = dict(rank=rank, alpha=float(alpha), targets=list(targets), dropout=float(dropout))
    return list(chosen)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear with W' = W + (α/r) B A; in place, returns model.

    The merged weight is a new Parameter: if W was tied to another module (lm_head ↔ tok_emb), the
    other side keeps the old W, which is exactly what the unmerged model computed. Parameters stay
    frozen as apply_lora left them (model.requires_grad_(True) to train the whole model again).
    A QLoRA model (quantized base) merges into a float model: every quantized layer is dequantized
    first (finetune/qlora.py says why a 4-bit base cannot hold W + ΔW).
    """
    if any(isinstance(m, LoRALinear) and m.base is not None for m in model.modules()):
        from minillm.finetune.qlora import dequantize_model

        dequantize_model(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        w = m.weight
        merged = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            # in fp32 so a bf16 model does not round B A before adding it (one rounding, at the end)
            merged.weight.copy_((w.float() + m.delta_weight().float()).to(w.dtype))
        merged.weight.requires_grad_(w.requires_grad)
        if m.bias is not None:
            merged.bias = m.bias  # unchanged by LoRA: keep the same Parameter
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable A and B matrices of every LoRALinear, in module order (what the optimizer gets)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def count_lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))


def expected_lora_parameters(model_or_shapes, rank: int, targets=("qkv", "proj")) -> int:
    """The closed form Σ r·(in + out) over the layers `apply_lora(..., rank, targets=targets)` adapts.

    model_or_shapes: a model (before or after apply_lora), or a dict {module name: (out, in)} of
    weight shapes. A has r·in numbers, B has out·r; W's in·out are not trained.
    """
    targets = _as_targets(targets)
    if isinstance(model_or_shapes, nn.Module):
        shapes = {name: (m.out_features, m.in_features) for name, m in _named_linears(model_or_shapes).items()}
    else:
        shapes = dict(model_or_shapes)
    return sum(rank * (n_in + n_out) for name, (n_out, n_in) in shapes.items()
               if name.rsplit(".", 1)[-1] in targets)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: {"<module name>.lora_A": (r, in), "<module name>.lora_B": (out, r)}."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
            sd[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
    return sd


def save_adapter(folder, model: nn.Module, meta: dict | None = None) -> Path:
    """Write the adapter to `folder`: adapter.safetensors (A, B only) + adapter_config.json.

    The config holds rank, alpha, targets, dropout and the keys of `meta` (e.g. the base checkpoint
    and the task), flat as in PEFT's adapter_config.json. The base weights are not saved: an adapter
    only means something on top of the model it was trained on.
    """
    from safetensors.torch import save

    if not hasattr(model, "lora_config") or not lora_parameters(model):
        raise ValueError("this model has no LoRA layers to save: apply_lora (and train) first")
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(_SETTINGS))
    if clash:
        raise ValueError(f"adapter meta may not override the LoRA settings: {', '.join(clash)}")
    folder = Path(folder)
    tensors = {k: v.cpu() for k, v in lora_state_dict(model).items()}
    write_bytes(folder / ADAPTER_WEIGHTS, save(tensors))
    write_json(folder / ADAPTER_CONFIG, {**model.lora_config, **meta})
    return folder


def load_adapter(folder, model: nn.Module) -> nn.Module:
    """apply_lora with the saved settings, then load the saved A and B; in place, returns the model.

    Keys and shapes are checked against the model before it is touched, so a mismatched adapter
    leaves the model as it was.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: {f} is missing")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    missing = [k for k in _SETTINGS if k not in cfg]
    if missing:
        raise ValueError(f"{folder / ADAPTER_CONFIG} lacks {', '.join(missing)}")
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    rank, targets = int(cfg["rank"]), _as_targets(cfg["targets"])
    _check_not_quantized(model)
    try:
        chosen = _targeted(model, targets)
    except ValueError as e:
        raise ValueError(f"adapter in {folder} does not fit this model: {e}") from None
    expected = {}
    for name, m in chosen.items():  # the shapes apply_lora will create: A (r, in), B (out, r)
        expected[f"{name}.lora_A"] = (rank, m.in_features)
        expected[f"{name}.lora_B"] = (m.out_features, rank)
    if set(saved) != set(expected):
        diff = sorted(set(saved) ^ set(expected))
        raise ValueError(f"adapter in {folder} does not fit this model: keys differ ({len(diff)}), "
                         f"e.g. {diff[0]}")
    for key, shape in expected.items():
        if tuple(saved[key].shape) != shape:
            raise ValueError(f"adapter in {folder} does not fit this model: {key} is "
                             f"{tuple(saved[key].shape)}, the model needs {shape}")
    apply_lora(model, rank, float(cfg["alpha"]), targets, float(cfg["dropout"]))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(saved[f"{name}.lora_A"])
                m.lora_B.copy_(saved[f"{name}.lora_B"])
    return model
