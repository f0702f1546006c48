"""Model checkpoints: a folder anyone can read without running our code.

    OUT_DIR/
      model.safetensors   weights (tied matrices stored once); safetensors never unpickles code
      config.json         {"model": ModelConfig fields, ...anything the writer adds: step, train config}
      tokenizer.json      the tokenizer's own JSON (minillm.data.tokenizer)

One format for every model: a quantized one (minillm.compress.quant.quantize_model) is the same
folder, whose model.safetensors holds the QuantLinear buffers (weight_q int8 / packed uint8,
scales, zeros, bias) instead of float weights, and whose config.json says how they were made:
    {"model": {...}, "quantization": {"scheme": "int4", "group_size": 64, "include_embeddings": false,
     "include_head": false}, ...}
`load_model` rebuilds whichever it finds, so generate, eval and serve take either.

Every file is written to a temporary name and renamed into place (`atomic_write`), and rename is
atomic on POSIX filesystems, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from minillm.files import atomic_write, write_json
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


def save_model(out_dir: str | Path, model: torch.nn.Module, tokenizer=None, **meta) -> Path:
    """Write weights, config (+ `meta`) and tokenizer into `out_dir`, float or quantized. Returns the folder.

    The weights go first and config.json last, so a folder whose config.json is present was
    written completely at least once.
    """
    out_dir = Path(out_dir)
    with atomic_write(out_dir / MODEL_FILE) as tmp:
        st_save_model(model, str(tmp))  # tied matrices (and a tied quantized head) are stored once
    if tokenizer is not None:
        write_json(out_dir / TOKENIZER_FILE, tokenizer.to_dict())
    record = {k: v for k, v in meta.items() if k not in ("model", "quantization")}
    record["model"] = model.cfg.to_dict()
    quantization = getattr(model, "quant_config", None)  # set by quantize_model
    if quantization is not None:
        record["quantization"] = quantization
    write_json(out_dir / CONFIG_FILE, record)
    return out_dir


def read_config(out_dir: str | Path) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} is not a minillm checkpoint (no {CONFIG_FILE}); "
                                "train one with `minillm train --out_dir=...`")
    return json.loads(path.read_text())


def load_model(out_dir: str | Path, device: str | torch.device = "cpu", backend: str | None = None,
               **config_overrides):
    """(model, tokenizer or None, config dict) from a checkpoint folder, float or quantized.

    `config_overrides` change fields that do not alter the weights, e.g. attention="sdpa".
    `backend` (quantized models only): the matmul of the quantized layers; None picks "triton" on
    CUDA with triton installed, "reference" otherwise.
    """
    out_dir = Path(out_dir)
    meta = read_config(out_dir)
    if not (out_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"{out_dir} has {CONFIG_FILE} but no {MODEL_FILE}: not a complete checkpoint")
    model = build_model(ModelConfig(**{**meta["model"], **config_overrides}))
    q = meta.get("quantization")
    if q is None:
        st_load_model(model, str(out_dir / MODEL_FILE), device=str(device))
        model.to(device).eval()
    else:
        from minillm.compress.quant import default_backend, quantize_model, set_backend

        # Rebuild the same module tree: the fresh float model quantized the same way (its codes
        # are then overwritten by the stored ones; strict loading catches any mismatch).
        quantize_model(model, q["scheme"], q.get("group_size") or 128, q.get("include_embeddings", False),
                       q.get("include_head", False), backend="reference")
        st_load_model(model, str(out_dir / MODEL_FILE), strict=True)
        model.to(device).eval()
        set_backend(model, backend or default_backend(device))
    tokenizer = None
    if (out_dir / TOKENIZER_FILE).exists():
        from minillm.data.tokenizer import tokenizer_from_dict
        tokenizer = tokenizer_from_dict(json.loads((out_dir / TOKENIZER_FILE).read_text()))
    return model, tokenizer, meta
