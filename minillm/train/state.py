"""Training state for exact resume, stored without pickle.

A checkpoint folder (minillm.weights.checkpoint) holds what a *user* of the model needs: weights, config,
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

    OUT_DIR/checkpoints/step-0000500/train_state.safetensors
        tensors:  "optim/state/3/exp_avg", ..., "rng/torch_cpu", "rng/cuda/0", "rng/batches"
        metadata: {"state": JSON}

It sits in the checkpoint's step folder beside the weights, and the folder's manifest, written last,
commits them together (minillm/weights/checkpoint.py).

Resuming is all here too: `resume_configs` rebuilds the run's configs from the checkpoint folder,
and `resume` loads weights and train state into a freshly built model and optimizer, checking that
they belong together and to the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minillm.weights.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, MODEL_FILE, STATE_FILE, TOKENIZER_FILE,
                                        CheckpointError, check_against_header, find_checkpoint, load_tokenizer_file, load_weights,
                                        model_config, read_config, verify)
from minillm.files import atomic_write


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


def save_train_state(folder: str | Path, optimizer: torch.optim.Optimizer, batch_generator: torch.Generator,
                     scaler=None, **scalars) -> Path:
    """Write optimizer + RNG states and `scalars` (step, best_val_loss, ...) to FOLDER/train_state."""
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
    path = Path(folder) / STATE_FILE
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(skeleton)})
    return path


def load_train_state(folder: str | Path, optimizer: torch.optim.Optimizer, batch_generator: torch.Generator,
                     scaler=None) -> dict:
    """Restore what `save_train_state` wrote (optimizer, RNGs, scaler); return the scalars dict."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: missing, so the run cannot be resumed exactly (a checkpoint written "
                              "by save_model alone holds no optimizer state)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # reads tensors; never unpickles
            skeleton = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        optimizer.load_state_dict(_unflatten_optimizer(skeleton["optimizer"], tensors))
        # load_state_dict takes moments of any shape; the first step after resuming would then fail
        for p, pstate in optimizer.state.items():
            for name, value in pstate.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"optimizer {name} of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")
        torch.set_rng_state(tensors["rng/torch_cpu"])
        batch_generator.set_state(tensors["rng/batches"])
        scalars = skeleton["scalars"]
        int(scalars["step"]), float(scalars["best_val_loss"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable train state ({type(e).__name__}: {first})") from None
    n_cuda = skeleton.get("n_cuda", 0)
    if n_cuda and torch.cuda.is_available():
        states = [tensors[f"rng/cuda/{i}"] for i in range(n_cuda)]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    if scaler is not None and "scaler" in skeleton:
        scaler.load_state_dict(skeleton["scaler"])
    return scalars


def resume_configs(out_dir: str | Path, model_changes: dict, train_changes: dict):
    """(ModelConfig, TrainConfig, data source) of the run saved in out_dir, with changes applied
    (e.g. a larger max_iters to train on). The saved configs are the run's; only what is changed
    on the command line differs."""
    if not (Path(out_dir) / CONFIG_FILE).exists() and not (Path(out_dir) / CHECKPOINTS_DIR).exists() \
            and (Path(out_dir) / "metrics.jsonl").is_file():
        raise CheckpointError(f"{out_dir} is not a minillm checkpoint yet (no {CONFIG_FILE}, no {CHECKPOINTS_DIR}/: "
                              "a run started here and stopped before its first save), so there is nothing to "
                              "resume; start it again with --overwrite=true")
    folder = find_checkpoint(out_dir)
    verify(folder, names=(CONFIG_FILE,))  # the configs are read before anything else: check them first
    meta = read_config(folder)
    model_cfg = model_config(meta, folder / CONFIG_FILE, **model_changes)
    check_against_header(meta, folder, **model_changes)  # a config the weights cannot fill: before building
    if "quantization" in meta:
        raise CheckpointError(f"{folder / CONFIG_FILE}: a quantized checkpoint cannot be resumed (training needs "
                              "float weights); resume the run it was quantized from")
    if "train" not in meta or not isinstance(meta.get("data"), str):
        raise CheckpointError(f"{folder / CONFIG_FILE}: no \"train\" config or \"data\" source: not written by "
                              "minillm train, so it cannot be resumed")
    train_cfg = saved_train_config(meta, folder / CONFIG_FILE, **{**train_changes, "resume": True, "overwrite": False})
    return model_cfg, train_cfg, meta["data"]


def saved_train_config(meta: dict, file: Path, **changes):
    """TrainConfig from config.json's "train" (defaults where a checkpoint has none), with changes;
    errors name the file."""
    from minillm.train.config import TrainConfig

    saved = meta.get("train", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: \"train\" should be an object (the TrainConfig fields), "
                              f"got {type(saved).__name__}")
    try:
        return TrainConfig(**{**saved, **changes})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: train config: {e}") from None


def resume(out_dir: str | Path, model, optimizer, batch_generator: torch.Generator, scaler, tokenizer,
           device) -> tuple[int, float, Path]:
    """Load the newest complete checkpoint of out_dir into model/optimizer/RNGs; (step, best val loss, folder).

    A checkpoint is complete only once its manifest is written (minillm/weights/checkpoint.py), so a kill
    during a save leaves the previous one to resume from. The checks: the files are what the
    manifest recorded, the weights and the train state come from the same step, and the tokenizer
    of this run's data is the one the checkpoint was trained with.
    """
    folder = find_checkpoint(out_dir)
    verify(folder)
    meta = read_config(folder)
    load_weights(model, folder / MODEL_FILE, device)  # strict: names and shapes must match
    scalars = load_train_state(folder, optimizer, batch_generator, scaler)
    if scalars["step"] != meta.get("step"):
        raise CheckpointError(f"{folder / STATE_FILE}: train state is at step {scalars['step']} but the "
                              f"weights at step {meta.get('step')}; cannot resume exactly")
    saved_tok = load_tokenizer_file(folder / TOKENIZER_FILE)
    if saved_tok.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{folder / TOKENIZER_FILE}: trained with a different tokenizer than this data gives; "
                         "resume with the same --data, --tokenizer and --vocab_size")
    return int(scalars["step"]), float(scalars["best_val_loss"]), folder
