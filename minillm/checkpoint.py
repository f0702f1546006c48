"""Model checkpoints: a folder anyone can read without running our code.

    OUT_DIR/
      model.safetensors   weights (tied matrices stored once); safetensors never unpickles code
      config.json         {"model": ModelConfig fields, ...anything the writer adds: step, train config}
      tokenizer.json      the tokenizer's own JSON (minillm.tokenizer)

Every file is written to a temporary name and renamed into place (`atomic_write`), and rename is
atomic on POSIX filesystems, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from .config import ModelConfig
from .model import build_model

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


class atomic_write:
    """`with atomic_write(path) as tmp: write to tmp` — renamed to `path` only if the block succeeds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)  # atomic: readers see the old file or the new one
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def write_json(path: str | Path, obj: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def save_model(out_dir: str | Path, model: torch.nn.Module, tokenizer=None, **meta) -> Path:
    """Write weights, config (+ `meta`) and tokenizer into `out_dir`. Returns the folder."""
    out_dir = Path(out_dir)
    with atomic_write(out_dir / MODEL_FILE) as tmp:
        st_save_model(model, str(tmp))
    if tokenizer is not None:
        write_json(out_dir / TOKENIZER_FILE, tokenizer.to_dict())
    write_json(out_dir / CONFIG_FILE, {"model": model.cfg.to_dict(), **meta})
    return out_dir


def read_config(out_dir: str | Path) -> dict:
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} is not a minillm checkpoint (no {CONFIG_FILE}); "
                                "train one with `minillm train --out_dir=...`")
    return json.loads(path.read_text())


def load_model(out_dir: str | Path, device: str | torch.device = "cpu", **config_overrides):
    """(model, tokenizer or None, config dict) from a checkpoint folder.

    `config_overrides` change fields that do not alter the weights, e.g. attention="sdpa".
    """
    out_dir = Path(out_dir)
    meta = read_config(out_dir)
    if "quantization" in meta:
        raise ValueError(f"{out_dir} holds a quantized model ({meta['quantization']}); "
                         "load it with minillm.quant_io.load_quantized")
    cfg = ModelConfig(**{**meta["model"], **config_overrides})
    model = build_model(cfg)
    st_load_model(model, str(out_dir / MODEL_FILE), device=str(device))
    model.to(device).eval()
    tokenizer = None
    if (out_dir / TOKENIZER_FILE).exists():
        from .tokenizer import tokenizer_from_dict
        tokenizer = tokenizer_from_dict(json.loads((out_dir / TOKENIZER_FILE).read_text()))
    return model, tokenizer, meta
