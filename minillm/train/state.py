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

Resuming is all here too: `resume_configs` rebuilds the run's configs from the checkpoint folder,
and `resume` loads weights and train state into a freshly built model and optimizer, checking that
they belong together and to the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minillm.checkpoint import MODEL_FILE, TOKENIZER_FILE, read_config
from minillm.files import atomic_write
from minillm.model.config import ModelConfig

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


def resume_configs(out_dir: str | Path, model_changes: dict, train_changes: dict):
    """(ModelConfig, TrainConfig, data source) of the run saved in out_dir, with changes applied
    (e.g. a larger max_iters to train on). The saved configs are the run's; only what is changed
    on the command line differs."""
    from minillm.train.config import TrainConfig

    meta = read_config(out_dir)
    model_cfg = ModelConfig(**{**meta["model"], **model_changes})
    train_cfg = TrainConfig(**{**meta["train"], **train_changes, "resume": True})
    return model_cfg, train_cfg, meta["data"]


def resume(out_dir: str | Path, model, optimizer, batch_generator: torch.Generator, scaler, tokenizer,
           device) -> tuple[int, float]:
    """Load weights and train state from out_dir into model/optimizer/RNGs; (step, best val loss).

    Checks that the weights and the train state were written by the same save (a kill between the
    two files would pair step-20 optimizer moments with step-10 weights), and that the tokenizer of
    this run's data is the one the checkpoint was trained with.
    """
    from safetensors.torch import load_model as st_load_model

    out_dir = Path(out_dir)
    meta = read_config(out_dir)
    st_load_model(model, str(out_dir / MODEL_FILE), device=str(device))  # strict: shapes must match
    scalars = load_train_state(out_dir, optimizer, batch_generator, scaler)
    if scalars["step"] != meta.get("step"):
        raise ValueError(f"{out_dir}: train state is at step {scalars['step']} but the weights at step "
                         f"{meta.get('step')} (a save was interrupted); cannot resume exactly")
    saved_tok = json.loads((out_dir / TOKENIZER_FILE).read_text())
    if saved_tok != json.loads(json.dumps(tokenizer.to_dict())):
        raise ValueError(f"{out_dir} was trained with a different tokenizer than this data gives; "
                         "resume with the same --data, --tokenizer and --vocab_size")
    return int(scalars["step"]), float(scalars["best_val_loss"])
