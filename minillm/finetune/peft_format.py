"""LoRA adapters in PEFT's format: what `PeftModel.from_pretrained` reads, written and read by minillm.

A PEFT LoRA folder is two files:
    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in) and
                                 .lora_B.weight (out, r) for every adapted Hugging Face module

and it means the same update as lora.py's: W' = W + (lora_alpha / r) · B A. What differs is where
the modules are: a minillm adapter names minillm's modules (one fused `qkv`), a PEFT adapter the
Hugging Face model's (q_proj, k_proj, v_proj apart in the Llama family). The row map is
huggingface_write.linear_parts, the one the weights use, so an adapter lands on the same rows its
base weight did:

    fused qkv, ΔW = s·B A        q_proj: A, B[q rows]   k_proj: A, B[k rows]   v_proj: A, B[v rows]
                                 (q and k rows back in rotate_half order, as their weights)

Reading a PEFT adapter back (load_peft_adapter) goes the other way. PEFT's q, k and v adapters may
each have their own A (an adapter trained in PEFT): stacking them still gives one exact LoRA of the
fused layer, of rank 3r, with A' = [A_q; A_k; A_v] and B' block-diagonal (each B on its own rows and
its own r columns, zeros elsewhere), because B'A' = [B_q A_q; B_k A_k; B_v A_v]. With one shared A
(what save_peft_adapter writes) the rank stays r and the round trip is bit-exact.

    >>> save_peft_adapter("out-peft", model, base="out-hf")           # model: after apply_lora
    >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out-hf"), "out-peft")
    >>> load_peft_adapter("out-peft", base_model)                     # minillm again
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm.files import write_bytes, write_json
from minillm.finetune.lora import ADAPTER_CONFIG, LoRALinear, apply_lora
from minillm.weights.huggingface import half_to_interleaved
from minillm.weights.huggingface_write import hf_config, hf_model_type, interleaved_to_half, linear_parts

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the Hugging Face model twice: LoraModel, then it


def _layer_free(hf_module: str) -> str:
    """The target_modules name of an HF module: the part after the layer index ("self_attn.q_proj")."""
    parts = hf_module.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else hf_module


def peft_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({PEFT key: tensor}, target_modules) for a model with LoRALinear layers (lora.apply_lora)."""
    cfg = model.cfg
    parts = linear_parts(cfg)  # refuses models that are not a Hugging Face causal LM, in one line
    out, targets = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        if name not in parts:
            raise ValueError(f"LoRA layer {name!r} has no Hugging Face counterpart (PEFT export covers the "
                             "transformer's linear layers and lm_head)")
        A, B = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()  # (r, in), (out, r)
        for hf_name, start, end, rope_heads in parts[name]:
            piece = B[start:end]
            out[f"{PEFT_PREFIX}{hf_name}.lora_A.weight"] = A.clone()
            out[f"{PEFT_PREFIX}{hf_name}.lora_B.weight"] = (interleaved_to_half(piece, rope_heads) if rope_heads
                                                            else piece).contiguous().clone()
            if _layer_free(hf_name) not in targets:
                targets.append(_layer_free(hf_name))
    if not out:
        raise ValueError("this model has no LoRA layers: apply_lora (and train) first")
    return out, targets


def peft_config(model: torch.nn.Module, targets: list[str], base: str | None = None) -> dict:
    """adapter_config.json in PEFT's LoraConfig fields (the ones that change what the adapter computes)."""
    lora = model.lora_config
    kind = hf_model_type(model.cfg)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]), "lora_dropout": float(lora["dropout"]),
            "target_modules": targets, "bias": "none", "fan_in_fan_out": kind == "gpt2",  # GPT-2's Conv1D
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(folder, model: torch.nn.Module, base: str | None = None, keep_config: bool = False) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder; returns the folder.

    keep_config: merge PEFT's keys into an adapter_config.json that is already there (the one
    lora.save_adapter wrote in a fine-tune's OUT/adapter/), so that one folder serves both readers.
    """
    from safetensors.torch import save

    tensors, targets = peft_tensors(model)
    config = peft_config(model, targets, base)
    folder = Path(folder)
    if keep_config and (folder / ADAPTER_CONFIG).is_file():
        config = {**json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")), **config}
    write_bytes(folder / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    write_json(folder / ADAPTER_CONFIG, config)
    return folder


def add_peft_files(folder, model: torch.nn.Module, base: str | None = None) -> bool:
    """The fine-tune hook (trainer.save): also write PEFT's files into OUT/adapter/ when the model is a
    Hugging Face causal LM; False (nothing written) when it is not, e.g. a BERT trunk. A run is never
    stopped at a checkpoint for this: `minillm export RUN --format=peft` says why in one line."""
    try:
        hf_config(model.cfg)
        peft_tensors(model)  # a LoRA layer with no Hugging Face name raises here
    except ValueError:
        return False
    save_peft_adapter(folder, model, base, keep_config=True)
    return True


# --- reading a PEFT adapter into minillm -----------------------------------------------------------

def _read_peft_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    for f in (ADAPTER_CONFIG, PEFT_WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {f} is missing")
    cfg = json.loads(file.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {cfg.get('peft_type')!r}; minillm reads LoRA adapters only")
    unsupported = [k for k in ("use_dora", "use_rslora") if cfg.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise ValueError(f"{file}: {', '.join(unsupported)} is not supported (plain LoRA only)")
    return cfg


def load_peft_adapter(folder, model: torch.nn.Module) -> torch.nn.Module:
    """Apply a PEFT LoRA adapter folder to a minillm model (its base, as loaded from the Hugging Face
    folder or anywhere); in place, returns the model. Every key and shape is checked against the model
    before it is touched: an adapter of another base is refused in one line naming the first misfit."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = _read_peft_config(folder)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    saved = {k.removeprefix(PEFT_PREFIX): v.float() for k, v in load_file(str(folder / PEFT_WEIGHTS)).items()}
    try:
        parts = linear_parts(model.cfg)
    except ValueError as e:
        raise ValueError(f"adapter in {folder} does not fit this model: {e}") from None
    linears = dict(model.named_modules())
    used, fused = set(), {}  # fused: minillm module -> (A' (R, in), B' (out, R))
    for name, hf_parts in parts.items():
        present = [p for p in hf_parts if f"{p[0]}.lora_A.weight" in saved]
        if not present:
            continue
        m = linears[name]
        As, Bs = [], []
        for hf_name, start, end, rope_heads in present:
            A, B = saved[f"{hf_name}.lora_A.weight"], saved[f"{hf_name}.lora_B.weight"]
            used.update({f"{hf_name}.lora_A.weight", f"{hf_name}.lora_B.weight"})
            rows = (end if end is not None else m.out_features) - start
            if A.shape != (r, m.in_features) or B.shape != (rows, r):
                raise ValueError(f"adapter in {folder} does not fit this model: {hf_name} has A {tuple(A.shape)}, "
                                 f"B {tuple(B.shape)}; the model needs ({r}, {m.in_features}), ({rows}, {r})")
            As.append(A)
            Bs.append((start, rows, half_to_interleaved(B, rope_heads) if rope_heads else B))
        shared = len(present) == len(hf_parts) and all(torch.equal(A, As[0]) for A in As)
        A_f = As[0] if shared else torch.cat(As)  # (r, in) or (n·r, in)
        B_f = torch.zeros(m.out_features, A_f.shape[0])  # rows of a part it does not adapt stay zero
        for i, (start, rows, B) in enumerate(Bs):
            cols = slice(0, r) if shared else slice(i * r, (i + 1) * r)  # block-diagonal when A's differ
            B_f[start:start + rows, cols] = B
        fused[name] = (A_f, B_f)
    unknown = sorted(set(saved) - used)
    if unknown:
        raise ValueError(f"adapter in {folder} does not fit this model: {unknown[0]} names no module of it")
    if not fused:
        raise ValueError(f"adapter in {folder} adapts no layer of this model")
    R = max(A.shape[0] for A, _ in fused.values())
    targets = sorted({name.rsplit(".", 1)[-1] for name in fused})
    # scaling α'/R must stay α/r; R == r (a shared A) keeps α itself, so the round trip is bit-exact
    apply_lora(model, R, alpha if R == r else alpha * R / r, targets, float(cfg.get("lora_dropout", 0.0)))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                A, B = fused.get(name, (torch.zeros(0, m.in_features), torch.zeros(m.out_features, 0)))
                m.lora_A.zero_()
                m.lora_B.zero_()  # a layer of a target type the adapter leaves alone: no update
                m.lora_A[:A.shape[0]] = A
                m.lora_B[:, :B.shape[1]] = B
    return model


# --- a fine-tune run's adapter, exported ------------------------------------------------------------

def peft_from_run(run, out_dir) -> dict:
    """Write the LoRA adapter of a `minillm finetune --lora_rank=...` run (its OUT/adapter/, minillm's
    format) as a PEFT folder in out_dir; returns {"path", "base", "rank", "targets", "tensors"}.

    run: the run folder (holding adapter/ and checkpoints/) or its adapter/ folder. The run's own
    checkpoint gives the architecture (its weights are the merged model; only A and B are written)."""
    from minillm.finetune.lora import load_adapter
    from minillm.weights.checkpoint import find_checkpoint, load_model

    run = Path(run)
    adapter = run / "adapter" if (run / "adapter").is_dir() else run
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{run} holds no LoRA adapter (no adapter/{ADAPTER_CONFIG}): pass the --out_dir "
                                "of a `minillm finetune --lora_rank=...` run")
    meta = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if meta.get("head"):
        raise ValueError(f"{adapter} belongs to a classifier (head {', '.join(meta['head'])}): PEFT export writes "
                         "causal-LM adapters, whose base is a Hugging Face causal LM")
    run_dir = run if adapter != run else run.parent
    model, _, _ = load_model(find_checkpoint(run_dir))
    load_adapter(adapter, model)  # minillm's A and B onto the run's architecture
    folder = save_peft_adapter(out_dir, model, base=meta.get("base"))
    tensors, targets = peft_tensors(model)
    return {"path": str(folder), "base": meta.get("base"), "rank": model.lora_config["rank"],
            "targets": targets, "tensors": len(tensors)}
