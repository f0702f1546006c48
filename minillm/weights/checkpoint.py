"""Model checkpoints: a folder anyone can read without running our code, committed as a whole.

One checkpoint is a folder:

    model.safetensors        weights (tied matrices stored once); safetensors never unpickles code
    config.json              {"model": ModelConfig fields, ...anything the writer adds: step, train config}
                             an encoder–decoder (model/seq2seq.py) adds {"seq2seq": {n_enc_layer, n_dec_layer,
                             pad_id, bos_id, eos_id, label_smoothing}}: its presence makes load_model build a Seq2Seq;
                             a fine-tuned classifier adds {"classifier": {labels, pooling}} (model/heads.py)
    tokenizer.json           the tokenizer's own JSON (minillm.data.tokenizer)
    train_state.safetensors  only in training checkpoints: optimizer, RNGs, data position (train/state.py)
    manifest.json            written LAST: the size and sha256 of every file above

A checkpoint is *complete* when manifest.json exists and every file it lists has the listed size.
Each file is written with `atomic_write` (temp file, fsync, rename), but a checkpoint is several
files, and a kill between two of them would leave new weights beside an old optimizer state. The
manifest makes the whole folder one commit: until it is written the folder does not count, and
once it is written every file it names is on disk. Loading checks the sha256s, so a file changed
afterwards (a bit flip, a truncated copy) is named instead of silently loaded.

A training run keeps its checkpoints in step folders and keeps the previous one until the new one
is complete, so a kill at any byte leaves at least one complete checkpoint:

    OUT_DIR/checkpoints/step-0000500/   (the files above)
    OUT_DIR/metrics.jsonl, OUT_DIR/loss.png

`load_model(path)` takes either a checkpoint folder or a run's OUT_DIR (its newest complete
checkpoint). A quantized model (minillm.compress.quant.quantize_model) is the same folder, whose
model.safetensors holds the QuantLinear buffers (weight_q int8 / packed uint8, scales, zeros, bias),
and whose config.json says how they were made ({"quantization": {"scheme": "int4", ...}}).
Every way a folder can be broken ends in a `CheckpointError` whose one line names the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from minillm.files import atomic_write, write_json
from minillm.model.config import ModelConfig
from minillm.model.heads import SequenceClassifier
from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig
from minillm.model.transformer import build_model

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
STATE_FILE, MANIFEST_FILE = "train_state.safetensors", "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


# --- the manifest: what makes a folder one commit ------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Record size and sha256 of the checkpoint's files; written last, it marks the folder complete."""
    folder = Path(folder)
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE) if (folder / name).exists()}
    write_json(folder / MANIFEST_FILE, {"format": 1, "files": files})
    return folder / MANIFEST_FILE


def _read_manifest(folder: Path) -> dict | None:
    """manifest.json's {file name: {"bytes", "sha256"}}, or None if it is missing, torn or not ours.

    Names must be plain file names of this folder: a manifest cannot send the check elsewhere."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # missing, torn, or not ours
        return None
    ok = isinstance(files, dict) and all(isinstance(v, dict) and Path(n).name == n and n not in ("", ".", "..")
                                         for n, v in files.items())
    return files if ok else None


def incomplete_reason(folder: str | Path) -> str | None:
    """None if `folder` is complete (manifest there, every file it lists there with the listed size;
    no hashing), else one line naming the file that makes it incomplete."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return f"{manifest}: missing (the save was interrupted before it was written)"
    files = _read_manifest(folder)
    if not files:
        return f"{manifest}: not a valid manifest (torn or edited)"
    for name, f in files.items():
        path = folder / name
        if not path.exists():
            return f"{path}: missing, but {MANIFEST_FILE} lists it"
        if not path.is_file():
            return f"{path}: not a file, but {MANIFEST_FILE} lists it as one"
        if path.stat().st_size != f.get("bytes"):
            return (f"{path}: {path.stat().st_size} bytes, but {MANIFEST_FILE} recorded {f.get('bytes')} "
                    "(truncated or edited since it was saved)")
    return None


def is_complete(folder: str | Path) -> bool:
    """The manifest is there and every file it lists exists with the listed size (no hashing)."""
    return incomplete_reason(folder) is None


def verify(folder: str | Path, names: tuple[str, ...] | None = None) -> None:
    """Raise CheckpointError naming the first file that differs from what the manifest recorded
    (only the files in `names`, if given).

    A folder without a manifest (written by hand, or by an older minillm) is taken as it is."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).exists():
        return
    reason = incomplete_reason(folder)
    if reason is not None:
        raise CheckpointError(reason + "; the checkpoint cannot be used")
    for name, f in _read_manifest(folder).items():
        path = folder / name
        if (names is None or name in names) and sha256_file(path) != f.get("sha256"):
            raise CheckpointError(f"{path}: differs from what {MANIFEST_FILE} recorded when it was saved "
                                  "(corrupted or edited since)")


# --- a run's checkpoints: step folders ---------------------------------------------------------

def step_folder(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def step_folders(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Every step folder of a run, complete or not, newest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()] \
        if root.is_dir() else []
    return sorted(found, reverse=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    return next((p for _, p in step_folders(out_dir) if is_complete(p)), None)


def begin_checkpoint(out_dir: str | Path, step: int) -> Path:
    """An empty folder for step `step`. A leftover of the same step can only be an incomplete one
    (a complete one would have been resumed from), so it is cleared."""
    folder = step_folder(out_dir, step)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def check_output_folder(path: str | Path, option: str = "--out_dir") -> None:
    """ValueError if `path`, or a folder above it, exists as something other than a folder: called
    before any work, so that a run does not train for an hour and then fail to save."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option}={path}: {p} is a file, not a folder; pick another {option}")


def prune_checkpoints(out_dir: str | Path, keep: Path) -> None:
    """After `keep` is complete: remove the other step folders and stale temporary files."""
    for _, folder in step_folders(out_dir):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
    remove_temporaries(out_dir)


def remove_temporaries(out_dir: str | Path) -> None:
    """atomic_write's leftovers of a killed process (.NAME.XXXX.tmp) in a run's folder: never read,
    so removed when a run starts and after each complete save."""
    for tmp in Path(out_dir).glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself if it holds config.json, else a run's newest complete one."""
    from minillm.weights.gguf_llama import is_gguf_file
    from minillm.weights.pull import resolve

    path = resolve(path)  # a pulled model's name (minillm pull) stands for its file
    if (path / CONFIG_FILE).exists() or (path.is_file() and is_gguf_file(path)):
        return path  # a checkpoint or Hugging Face folder, or a GGUF file: load_model reads each
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    folders = step_folders(path)
    if folders:  # name what is wrong with the newest one, and what to do: there is nothing to resume
        raise CheckpointError(f"{incomplete_reason(folders[0][1])}; {path / CHECKPOINTS_DIR} holds no complete "
                              "checkpoint (the run stopped inside its first save); train it again with "
                              "--overwrite=true")
    if not path.exists():
        raise FileNotFoundError(f"{path} is not a minillm checkpoint: it does not exist")
    raise FileNotFoundError(f"{path} is not a minillm checkpoint (no {CONFIG_FILE}, no {CHECKPOINTS_DIR}/); "
                            "train one with `minillm train --out_dir=...`")


# --- saving --------------------------------------------------------------------------------------

def save_model(out_dir: str | Path, model: torch.nn.Module, tokenizer=None, **meta) -> Path:
    """Write weights, tokenizer and config (+ `meta`) into `out_dir`, float or quantized, then the
    manifest that makes it complete. Returns the folder."""
    out_dir = Path(out_dir)
    with atomic_write(out_dir / MODEL_FILE) as tmp:
        st_save_model(model, str(tmp))  # tied matrices (and a tied quantized head) are stored once
    if tokenizer is not None:
        write_json(out_dir / TOKENIZER_FILE, tokenizer.to_dict(), indent=None, sort_keys=False)
    record = {k: v for k, v in meta.items() if k not in ("model", "seq2seq", "quantization")}
    if isinstance(model.cfg, Seq2SeqConfig):  # the shared ModelConfig, then what only an encoder–decoder has
        record["model"] = model.cfg.model.to_dict()
        record["seq2seq"] = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "model"}
    else:
        record["model"] = model.cfg.to_dict()
    quantization = getattr(model, "quant_config", None)  # set by quantize_model
    if quantization is not None:
        record["quantization"] = quantization
    write_json(out_dir / CONFIG_FILE, record)
    write_manifest(out_dir)
    return out_dir


# --- loading -------------------------------------------------------------------------------------

def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:  # a folder in its place, no permission to read it, ...
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise CheckpointError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None


def read_config(path: str | Path) -> dict:
    """config.json of the checkpoint `path` names (a folder, or a run's newest complete one)."""
    file = find_checkpoint(path) / CONFIG_FILE
    meta = _read_json(file)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{file}: expected an object with a \"model\" object (the ModelConfig fields)")
    return meta


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_fields(dc, values: dict, file: Path, what: str) -> None:
    """Every key a field of dataclass `dc`, every value of the field's type; errors naming the file."""
    fields = {f.name: f for f in dataclasses.fields(dc)}
    for key, value in values.items():
        if key not in fields or key == "model" and dc is Seq2SeqConfig:
            raise CheckpointError(f"{file}: unknown {what} field {key!r} (written by another program or version?)")
        kinds = str(fields[key].type).replace(" ", "").split("|")  # e.g. "int", "float|None"
        if value is None and "None" in kinds:
            continue
        ok = [t for k in kinds for t in _TYPES.get(k, (object,))]
        if not isinstance(value, tuple(ok)) or (isinstance(value, bool) and bool not in ok):
            raise CheckpointError(f"{file}: {what} field {key}={value!r} should be {fields[key].type}")
        if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN/Infinity: Python reads them
            raise CheckpointError(f"{file}: {what} field {key}={value!r} should be a finite number")


def model_config(meta: dict, file: Path, **overrides) -> ModelConfig:
    """ModelConfig from config.json's "model", every field's type checked, errors naming the file."""
    values = {**meta["model"], **overrides}
    _check_fields(ModelConfig, values, file, "model")
    try:
        return ModelConfig(**values)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def seq2seq_config(meta: dict, file: Path, **overrides) -> Seq2SeqConfig:
    """Seq2SeqConfig from config.json's "model" (shared by both sides) and "seq2seq" objects."""
    s = meta["seq2seq"]
    if not isinstance(s, dict):
        raise CheckpointError(f"{file}: \"seq2seq\" should be an object (n_enc_layer, n_dec_layer, pad_id, ...)")
    _check_fields(Seq2SeqConfig, s, file, "seq2seq")
    try:
        return Seq2SeqConfig(model_config(meta, file, **overrides), **s)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def build_from_config(meta: dict, file: Path, **overrides) -> torch.nn.Module:
    """A fresh model of the kind and shape config.json describes: Seq2Seq if it has "seq2seq", a
    SequenceClassifier if it has "classifier", else a CausalLM or MaskedLM."""
    if "seq2seq" in meta:
        return Seq2Seq(seq2seq_config(meta, file, **overrides))
    if "classifier" in meta:
        c = meta["classifier"]
        if not (isinstance(c, dict) and isinstance(c.get("labels"), list) and all(isinstance(x, str) for x in c["labels"])):
            raise CheckpointError(f"{file}: \"classifier\" should be an object with a list of label names")
        try:
            return SequenceClassifier(model_config(meta, file, **overrides), c["labels"], c.get("pooling"))
        except ValueError as e:
            raise CheckpointError(f"{file}: classifier: {e}") from None
    return build_model(model_config(meta, file, **overrides))


def check_against_header(meta: dict, folder: Path, **overrides) -> None:
    """CheckpointError if config.json cannot describe model.safetensors, found from the file's header
    before anything is allocated (weights/header.py): the layer counts first (cheap, and what keeps
    n_layer=100000 from building 100000 blocks), then every shape, from the model built on the meta
    device, and a bound on the position tables the config alone sizes. What the header cannot show
    (a missing tensor, an extra one) is left to load_weights' strict load."""
    from minillm.weights.header import (HeaderMismatch, block_counts, build_on_meta, check_block_count,
                                        check_derived_buffers, check_shapes, safetensors_shapes)

    file, config_file = folder / MODEL_FILE, folder / CONFIG_FILE
    if not file.is_file() or file.stat().st_size == 0:
        return  # load_weights says what is wrong with it
    try:
        shapes = safetensors_shapes([file])
        counts = block_counts(shapes)
        s = meta.get("seq2seq")
        layers = ({"encoder.": ("n_enc_layer", s.get("n_enc_layer")), "": ("n_dec_layer", s.get("n_dec_layer"))}
                  if isinstance(s, dict) else {} if "seq2seq" in meta  # (a bad "seq2seq": the build names it)
                  else {"transformer.": ("n_layer", meta["model"].get("n_layer"))})
        for prefix, (key, n) in layers.items():
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:  # (a bad value: the config check names it)
                check_block_count(n, counts.get(prefix, 0), key, config_file, file)
        model = build_on_meta(lambda: build_from_config(meta, config_file, **overrides))
        check_shapes(model, shapes, file)
        check_derived_buffers(model, config_file)
    except HeaderMismatch as e:
        raise CheckpointError(str(e)) from None


def load_weights(model: torch.nn.Module, file: Path, device: str | torch.device = "cpu") -> None:
    """safetensors -> model, strictly (same names, same shapes); one-line errors naming the file."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing" if not file.exists() else f"{file}: not a file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file}: empty file")
    try:
        st_load_model(model, str(file), device=str(device))
    except SafetensorError as e:  # a broken header, a truncated file
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    except RuntimeError as e:  # missing/unexpected tensors, other shapes than config.json says
        # torch's message is a title line ("Error(s) in loading state_dict for ...") and one line per problem
        lines = [line.strip() for line in str(e).strip().splitlines()]
        detail = " ".join(lines[1:] or lines)
        raise CheckpointError(f"{file}: does not match {CONFIG_FILE}: "
                              f"{detail[:300] + ('...' if len(detail) > 300 else '')}") from None


def load_tokenizer_file(file: Path):
    from minillm.data.tokenizer import tokenizer_from_dict

    d = _read_json(file)
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    try:
        return tokenizer_from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a minillm tokenizer ({type(e).__name__}: {e})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", backend: str | None = None,
               keep_quantized: bool = False, **config_overrides):
    """(model, tokenizer or None, config dict) from a checkpoint, float or quantized.

    path: a checkpoint folder, a training run's out_dir (its newest complete checkpoint), a
    Hugging Face model folder (minillm.weights.huggingface.load_hf_folder), a llama GGUF file
    (minillm.weights.gguf_llama.load_gguf), or the name of a pulled model (minillm.weights.pull).
    config_overrides: fields that do not alter the weights, e.g. attention="sdpa".
    backend (quantized models only): the matmul of the quantized layers; None picks the fastest
    that runs here (compress.quant.default_backend: "triton" on CUDA, "cpu" on a CPU with a compiler).
    keep_quantized (GGUF files only): keep the file's quantized blocks as QuantLinear layers instead
    of dequantizing every weight to fp32 (gguf_keep.py); other formats ignore it.
    """
    from minillm.weights.huggingface import is_hf_folder, load_hf_folder
    from minillm.weights.pull import resolve

    path = resolve(path)

    if is_hf_folder(path):  # a downloaded Hugging Face folder (Llama, Qwen2, Mistral, GPT-2, BERT)
        try:
            return load_hf_folder(path, device, **config_overrides)
        except (ValueError, KeyError, TypeError, SafetensorError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    from minillm.weights.gguf_llama import is_gguf_file, load_gguf

    if is_gguf_file(path):  # a llama.cpp GGUF file; its errors are already one line naming the file
        from minillm.data.tokenizer_gguf import GGUFTokenizer
        from minillm.weights.gguf import GGUFError

        model, meta = load_gguf(path, keep_quantized, **config_overrides)
        try:  # the tokenizer (and chat template) travel in the file's metadata
            tokenizer = GGUFTokenizer.from_metadata(meta["gguf"]["metadata"])
        except (KeyError, TypeError) as e:
            raise GGUFError(f"{path}: incomplete tokenizer metadata ({e})") from None
        except ValueError as e:
            raise GGUFError(f"{path}: {e}") from None
        model.to(device)
        if keep_quantized:
            from minillm.weights.gguf_keep import set_kept_backend

            set_kept_backend(model, backend)
        return model, tokenizer, meta
    folder = find_checkpoint(path)
    verify(folder)
    meta = read_config(folder)
    check_against_header(meta, folder, **config_overrides)  # before a byte is allocated for the model
    model = build_from_config(meta, folder / CONFIG_FILE, **config_overrides)
    q = meta.get("quantization")
    if q is None:
        load_weights(model, folder / MODEL_FILE, device)
        model.to(device).eval()
    else:
        from minillm.compress.quant import default_backend, quantize_model, set_backend

        if not isinstance(q, dict):
            raise CheckpointError(f"{folder / CONFIG_FILE}: \"quantization\" should be an object")
        try:
            # Rebuild the same module tree: the fresh float model quantized the same way (its codes
            # are then overwritten by the stored ones; strict loading catches any mismatch).
            quantize_model(model, q.get("scheme"), q.get("group_size") or 128, q.get("include_embeddings", False),
                           q.get("include_head", False), backend="reference", int8_groups=bool(q.get("int8_groups")))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder / CONFIG_FILE}: quantization {q}: {e}") from None
        load_weights(model, folder / MODEL_FILE)
        model.to(device).eval()
        set_backend(model, backend or default_backend(device))
    tokenizer = None
    if (folder / TOKENIZER_FILE).exists():
        tokenizer = load_tokenizer_file(folder / TOKENIZER_FILE)
        check_vocab(tokenizer, model.cfg.model if isinstance(model, Seq2Seq) else model.cfg, folder)
    return model, tokenizer, meta


def check_vocab(tokenizer, cfg: ModelConfig, folder: Path) -> None:
    """Every id the tokenizer can produce must be a row of the model's embedding.

    A training run makes the two sizes equal; a model may also have more rows than the tokenizer
    has tokens (nanoGPT pads GPT-2's 50257 to 50304 for faster matmuls), never fewer: an id past
    the table would fail every request that contains it.
    """
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{folder / TOKENIZER_FILE}: {tokenizer.vocab_size} tokens, but the model's "
                              f"vocabulary has only {cfg.vocab_size} ({CONFIG_FILE}); they belong to different models")


@torch.no_grad()
def check_finite_forward(model: torch.nn.Module, where: str | Path, n_tokens: int = 8) -> None:
    """A short warm-up forward pass; CheckpointError if any output is NaN or infinite.

    A checkpoint can be well-formed (right names, shapes, dtypes, sha256s) and still be useless: a run
    trained with a NaN hyper-parameter saves NaN weights, and every command on it would print "loss nan"
    or generate token 0 forever. One forward of `n_tokens` ids (a few milliseconds on a small model)
    finds that at load time. Every command that loads a model for use calls this after load_model
    (the CLI's commands, and the server at start-up and on each admin switch); `where` names the checkpoint.
    """
    cfg = model.cfg.model if isinstance(model, Seq2Seq) else model.cfg
    T = max(1, min(n_tokens, cfg.block_size))
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()))
    ids = (torch.arange(T, device=tensor.device) % cfg.vocab_size).unsqueeze(0)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Seq2Seq):
            tgt = ids.clone()
            tgt[0, 0] = model.cfg.bos_id
            out = model(ids, tgt)
        else:
            out = model(ids)
    finally:
        model.train(was_training)
    logits = out[0] if isinstance(out, tuple) else out
    if not torch.isfinite(logits.float()).all():
        bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        which = (f"{len(bad)} tensors hold NaN or infinite values (first: {bad[0]})" if bad
                 else "the weights are finite but overflow in the forward pass")
        raise CheckpointError(f"{where}: the model's outputs are not finite on a warm-up forward pass: {which}; "
                              "it was probably trained with a NaN or infinite hyper-parameter")
