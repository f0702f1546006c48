"""Quantized checkpoints and the `minillm quantize` command.

A quantized checkpoint is an ordinary minillm checkpoint folder (minillm/checkpoint.py) whose
model.safetensors holds the QuantLinear buffers (weight_q int8 / packed uint8, scales, zeros, bias)
instead of float weights, and whose config.json says how they were made:

    {"model": {...ModelConfig...}, "quantization": {"scheme": "int4", "group_size": 64,
     "include_embeddings": false, "include_head": false}, "quant_report": {...}, ...source meta}

safetensors stores raw tensors and never unpickles code, so loading one is safe.

    minillm quantize out/shakespeare --scheme=int4 --group_size=64 --out=out/shakespeare-int4
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from .checkpoint import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, atomic_write, load_model, read_config, write_json
from .config import ModelConfig
from .model import build_model
from .quant import BACKENDS, GROUP_SIZES, SCHEMES, default_backend, quantize_model, set_backend, weight_bytes


def save_quantized(out_dir: str | Path, model: torch.nn.Module, tokenizer=None, meta: dict | None = None) -> Path:
    """Write a model returned by quantize_model (+ tokenizer, + extra meta) into `out_dir`."""
    if not hasattr(model, "quant_config"):
        raise ValueError("save_quantized needs a quantized model: call minillm.quant.quantize_model first "
                         "(a float model is saved with minillm.checkpoint.save_model)")
    out_dir = Path(out_dir)
    with atomic_write(out_dir / MODEL_FILE) as tmp:
        st_save_model(model, str(tmp))  # a tied head and embedding share buffers: stored once
    if tokenizer is not None:
        write_json(out_dir / TOKENIZER_FILE, tokenizer.to_dict())
    write_json(out_dir / CONFIG_FILE, {**(meta or {}), "model": model.cfg.to_dict(),
                                       "quantization": model.quant_config})
    return out_dir


def load_quantized(out_dir: str | Path, device: str | torch.device = "cpu", backend: str | None = None):
    """(model, tokenizer or None, config dict) from a folder written by save_quantized.

    `backend` None picks "triton" on CUDA (triton installed), "reference" otherwise.
    """
    out_dir = Path(out_dir)
    meta = read_config(out_dir)
    q = meta.get("quantization")
    if q is None:
        raise ValueError(f"{out_dir} holds a float checkpoint (no 'quantization' in {CONFIG_FILE}); "
                         "load it with minillm.checkpoint.load_model")
    # Rebuild the same module tree: a fresh float model, quantized the same way (its random codes
    # are then overwritten by the stored ones; strict loading catches any mismatch).
    model = build_model(ModelConfig(**meta["model"]))
    quantize_model(model, q["scheme"], q.get("group_size") or 128, q["include_embeddings"],
                   q["include_head"], backend="reference")
    st_load_model(model, str(out_dir / MODEL_FILE), strict=True)
    model.to(device).eval()
    set_backend(model, backend or default_backend(device))
    tokenizer = None
    if (out_dir / TOKENIZER_FILE).exists():
        from .tokenizer import tokenizer_from_dict
        tokenizer = tokenizer_from_dict(json.loads((out_dir / TOKENIZER_FILE).read_text()))
    return model, tokenizer, meta


# --- the `minillm quantize` command ----------------------------------------------------------

def _data_source(meta: dict) -> str | None:
    """The text a checkpoint was trained on, as recorded by `minillm train` (None if unrecorded)."""
    for where in (meta, meta.get("train") or {}, meta.get("train_config") or {}):
        for key in ("data", "data_source"):
            if isinstance(where.get(key), str):
                return where[key]
    return None


def _val_tokens(source: str, tokenizer, val_fraction: float) -> np.ndarray:
    """The validation split of `source` (its last val_fraction, as minillm.data splits it), tokenized
    with the checkpoint's own tokenizer so ids mean what the model learned."""
    from .data import load_text

    text = load_text(source)
    val_text = text[int(len(text) * (1 - val_fraction)):]
    return np.asarray(tokenizer.encode(val_text), dtype=np.int64)


def _perplexity(model, tokens, args, block_size: int) -> float:
    from .train import evaluate

    gen = torch.Generator().manual_seed(args.seed)  # the same batches for both models
    out = evaluate(model, tokens, args.batch_size, block_size, args.eval_iters, args.device, generator=gen)
    return float(out["ppl"]) if "ppl" in out else math.exp(out["loss"])


def _tokens_per_s(model, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    from .generate import generate

    generate(model, prompt, min(4, n), temperature=0.0)  # warm-up (kernel compilation on a GPU)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, n, temperature=0.0)  # greedy: comparable across the two models
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), out[0, prompt.shape[1]:]


def cmd_quantize(args, overrides: list[str]) -> int:
    """Quantize a trained checkpoint's linear layers to int8 or int4 and report what it costs and gains."""
    for arg in overrides:  # argparse passes on what it did not know: name it, and the close matches
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        close = difflib.get_close_matches(key, [k for k in vars(args) if k not in ("func", "command")], n=2)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown option --{key} for quantize{hint}")
    if args.out is None:
        raise ValueError("--out=OUT_DIR is required: where to write the quantized checkpoint")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError("--out must differ from the input checkpoint (it would overwrite the float weights)")
    if args.scheme == "int4" and args.group_size not in GROUP_SIZES:
        raise ValueError(f"--group_size must be one of {GROUP_SIZES}, got {args.group_size}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    model, tokenizer, meta = load_model(args.checkpoint, device=args.device)
    qmodel = quantize_model(copy.deepcopy(model), args.scheme, args.group_size, args.include_embeddings,
                            args.include_head, backend=args.backend)
    source_meta = {k: v for k, v in meta.items() if k not in ("model", "quantization", "quant_report")}
    out = save_quantized(args.out, qmodel, tokenizer, {**source_meta, "quantized_from": str(args.checkpoint)})
    label = args.scheme + (f" (group {args.group_size})" if args.scheme == "int4" else " (per channel)")
    report = {"scheme": label, "device": args.device,
              "backend": sorted({m.backend for m in qmodel.modules() if hasattr(m, "backend")}),
              "bytes": [weight_bytes(model), weight_bytes(qmodel)],
              "file_bytes": [(Path(args.checkpoint) / MODEL_FILE).stat().st_size, (out / MODEL_FILE).stat().st_size]}

    source = args.data or _data_source(meta)
    if source is None or tokenizer is None:
        why = "no tokenizer in the checkpoint" if tokenizer is None else "no --data and none recorded"
        print(f"perplexity: skipped ({why})")
    else:
        tokens = _val_tokens(source, tokenizer, args.val_fraction)
        T = min(model.cfg.block_size, len(tokens) - 1)
        report["data"] = source
        report["val_ppl"] = [_perplexity(m, tokens, args, T) for m in (model, qmodel)]
    if args.gen_tokens > 0:
        start = tokenizer.encode("\n") if tokenizer is not None else [0]
        prompt = torch.tensor([start[-1:]], device=args.device)  # (1, 1)
        (fp_tps, fp_ids), (q_tps, q_ids) = (_tokens_per_s(m, prompt, args.gen_tokens) for m in (model, qmodel))
        same = (fp_ids == q_ids).long().cumprod(0).sum().item()  # greedy tokens equal before they diverge
        report.update(tokens_per_s=[fp_tps, q_tps], greedy_same_prefix=f"{same}/{args.gen_tokens}")
    write_json(out / CONFIG_FILE, {**read_config(out), "quant_report": report})
    _print_report(args, report, out)
    return 0


def _print_report(args, r: dict, out: Path) -> None:
    b, fb = r["bytes"], r["file_bytes"]
    print(f"quantized {args.checkpoint} -> {out}: {r['scheme']}, layers on the {'/'.join(r['backend'])} "
          f"path, {r['device']}")
    print(f"{'':22}{'before':>12}{'after':>12}{'change':>10}")
    print(f"{'weights (MB)':22}{b[0] / 1e6:12.3f}{b[1] / 1e6:12.3f}{b[1] / b[0]:9.2f}x")
    print(f"{'model.safetensors (MB)':22}{fb[0] / 1e6:12.3f}{fb[1] / 1e6:12.3f}{fb[1] / fb[0]:9.2f}x")
    if "val_ppl" in r:
        p = r["val_ppl"]
        print(f"{'val perplexity':22}{p[0]:12.4f}{p[1]:12.4f}{100 * (p[1] / p[0] - 1):+9.2f}%"
              f"   ({r['data']}, {args.eval_iters} batches of {args.batch_size})")
    if "tokens_per_s" in r:
        t = r["tokens_per_s"]
        print(f"{'generation tokens/s':22}{t[0]:12.1f}{t[1]:12.1f}{t[1] / t[0]:9.2f}x"
              f"   (batch 1, {args.gen_tokens} greedy tokens; same first {r['greedy_same_prefix']})")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="int8/int4 weight-only quantization of a checkpoint, with a before/after report",
        description=cmd_quantize.__doc__ + " Linear layers become QuantLinear (minillm/quant.py): int8 "
        "with one scale per output channel, or int4 with a scale and zero per group of --group_size "
        "inputs, two codes per byte. The report compares weight bytes, validation perplexity (on the "
        "checkpoint's training text, or --data) and greedy generation tokens/s before and after.",
        epilog="example: minillm quantize out/shakespeare --scheme=int4 --group_size=64 "
               "--out=out/shakespeare-int4.  Load the result with minillm.quant_io.load_quantized.")
    p.add_argument("checkpoint", help="a checkpoint folder written by `minillm train` (or save_model)")
    p.add_argument("--scheme", choices=SCHEMES, default="int8", help="int8 per channel, or int4 per group")
    p.add_argument("--group_size", type=int, default=64, help=f"int4 group size along K, one of {GROUP_SIZES}")
    p.add_argument("--out", default=None, help="output folder for the quantized checkpoint (required)")
    p.add_argument("--data", default=None, help="text for the perplexity check (default: the source "
                   "recorded in the checkpoint): a corpus name or a .txt file/folder")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last share of the text used as validation")
    p.add_argument("--include_embeddings", action="store_true", help="also quantize the token embedding")
    p.add_argument("--include_head", action="store_true",
                   help="also quantize the output head (with tied weights: only with --include_embeddings)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="matmul of the quantized layers (default: triton on CUDA, reference elsewhere)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches per perplexity")
    p.add_argument("--batch_size", type=int, default=8, help="validation batch size")
    p.add_argument("--gen_tokens", type=int, default=100, help="tokens generated for the speed check (0: skip)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the validation batches")
    p.set_defaults(func=cmd_quantize)
