"""Training state for exact resume, stored without pickle.

A checkpoint folder (minillm.checkpoint) holds what a *user* of the model needs: weights, config,
tokenizer. Resuming a run needs more — everything that decides what happens next:

    optimizer state   AdamW's m, v and step count per parameter, and its hyper-parameters
    step, best val    where the loop was
    RNG states        torch's CPU (and CUDA) generators, which draw dropout masks, and the run's own
                      batch-sampling generator, which picks the next batch

With all of them restored, the resumed run makes exactly the same computations as the uninterrupted
one, so on CPU its losses match bit for bit (tests/test_train.py).

`torch.save` would pickle all this, and unpickling a file can run arbitrary code. Instead everything
goes into ONE safetensors file: tensors as tensors, and the JSON skeleton (the nesting of the
optimizer state dict, plain numbers, the order of parameters) in the file's string metadata:

    OUT_DIR/train_state.safetensors
        tensors:  "optim/state/3/exp_avg", ..., "rng/torch_cpu", "rng/cuda/0", "rng/batches"
        metadata: {"state": JSON}

One file written with `atomic_write` is replaced whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write

STATE_FILE = "train_state.safetensors"


def _flatten_optimizer(sd: dict, tensors: dict) -> dict:
    """Move every tensor of an optimizer state dict into `tensors`; return the JSON-able rest."""
    state = {}
    for pid, pstate in sd["state"].items():
        entry = {}
        for name, value in pstate.items():
            if torch.is_tensor(value):
                key = f"optim/state/{pid}/{name}"
                tensors[key] = value.detach().contiguous()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        state[str(pid)] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(skeleton: dict, tensors: dict) -> dict:
    state = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"]
                           for name, v in entry.items()}
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in skeleton["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_train_state(out_dir: str | Path, optimizer: torch.optim.Optimizer, batch_generator: torch.Generator,
                     scaler=None, **scalars) -> Path:
    """Write optimizer + RNG states and `scalars` (step, best_val_loss, ...) to OUT_DIR/train_state."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {
        "optimizer": _flatten_optimizer(optimizer.state_dict(), tensors),
        "scalars": scalars,
        "n_cuda": 0,
    }
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    tensors["rng/batches"] = batch_generator.get_state()
    if torch.cuda.is_available():
        states = torch.cuda.get_rng_state_all()
        for i, s in enumerate(states):
            tensors[f"rng/cuda/{i}"] = s
        skeleton["n_cuda"] = len(states)
    if scaler is not None and scaler.is_enabled():
        # GradScaler's state is a few numbers (scale, growth tracker, ...): plain JSON
        skeleton["scaler"] = {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}
    # safetensors wants CPU tensors it owns (no shared storage): clone to be safe
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    path = Path(out_dir) / STATE_FILE
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})
    return path


def load_train_state(out_dir: str | Path, optimizer: torch.optim.Optimizer, batch_generator: torch.Generator,
                     scaler=None) -> dict:
    """Restore what `save_train_state` wrote (optimizer, RNGs, scaler); return the scalars dict."""
    path = Path(out_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (was the run started with this "
                                "out_dir, and did it reach its first checkpoint?)")
    with safe_open(str(path), framework="pt", device="cpu") as f:  # reads tensors; never unpickles
        skeleton = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    optimizer.load_state_dict(_unflatten_optimizer(skeleton["optimizer"], tensors))
    torch.set_rng_state(tensors["rng/torch_cpu"])
    batch_generator.set_state(tensors["rng/batches"])
    n_cuda = skeleton.get("n_cuda", 0)
    if n_cuda and torch.cuda.is_available():
        states = [tensors[f"rng/cuda/{i}"] for i in range(n_cuda)]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    if scaler is not None and "scaler" in skeleton:
        scaler.load_state_dict(skeleton["scaler"])
    return skeleton["scalars"]
