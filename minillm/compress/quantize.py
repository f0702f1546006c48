"""Quantize a saved checkpoint and measure what it costs and gains.

The result is an ordinary checkpoint folder (minillm/weights/checkpoint.py) whose config.json also holds
the quantization settings and this report:

    bytes          weight bytes of the float and the quantized model (what sits in GPU memory)
    file_bytes     model.safetensors on disk, before and after
    val_ppl        validation perplexity of both, on the same batches of the same held-out text
    tokens_per_s   greedy generation speed of both at batch 1, and how many greedy tokens agree

    minillm quantize out/shakespeare --scheme=int4 --group_size=64 --out=out/shakespeare-int4
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from minillm.weights.checkpoint import (CONFIG_FILE, MODEL_FILE, check_finite_forward, check_output_folder,
                                        find_checkpoint, load_model, read_config, save_model, write_manifest)
from minillm.compress.quant import GROUP_SIZES, quantize_model, weight_bytes
from minillm.files import write_json
from minillm.train.evaluate import checkpoint_eval_batches, describe_batches


def recorded_data_source(meta: dict) -> str | None:
    """The text a checkpoint was trained on, as recorded by `minillm train` (None if unrecorded)."""
    for where in (meta, meta.get("train"), meta.get("train_config")):
        for key in ("data", "data_source"):
            if isinstance(where, dict) and isinstance(where.get(key), str):
                return where[key]
    return None


def val_tokens(source: str, tokenizer, val_fraction: float = 0.1) -> np.ndarray:
    """The validation split of `source`, tokenized with the checkpoint's own tokenizer so that ids
    mean what the model learned."""
    from minillm.data.dataset import load_text, split_text

    _, val_text = split_text(load_text(source), val_fraction)
    return np.asarray(tokenizer.encode(val_text), dtype=np.int64)


def model_file_bytes(folder: Path) -> int:
    """Bytes of the model's weight files in `folder`: model.safetensors, or a Hugging Face folder's
    shards (model-00001-of-00002.safetensors, ...). Not train_state.safetensors: the optimizer's
    moments are twice the weights, and counting them would make every ratio look 3x better."""
    if (folder / MODEL_FILE).is_file():
        return (folder / MODEL_FILE).stat().st_size
    return sum(f.stat().st_size for f in folder.glob("model*.safetensors"))


def perplexity(model, tokens, batch_size: int, block_size: int, iters: int, device, seed: int) -> float:
    from minillm.train.evaluate import evaluate

    gen = torch.Generator().manual_seed(seed)  # the same batches for every model measured
    return float(evaluate(model, tokens, batch_size, block_size, iters, device, generator=gen)["ppl"])


def greedy_tokens_per_s(model, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """(tokens/s, the n greedy tokens) at batch 1, after a short warm-up (kernel compilation on a GPU)."""
    from minillm.generate.sampling import generate

    generate(model, prompt, min(4, n), temperature=0.0)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, n, temperature=0.0)  # greedy: comparable across the two models
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), out[0, prompt.shape[1]:]


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, scheme: str = "int8", group_size: int = 64,
                        include_embeddings: bool = False, include_head: bool = False, backend: str | None = None,
                        device: str | torch.device = "cpu", data: str | None = None, val_fraction: float = 0.1,
                        eval_iters: int | None = None, batch_size: int | None = None, gen_tokens: int = 100,
                        seed: int | None = None) -> dict:
    """Quantize `checkpoint` into `out` and return the before/after report (also stored in its config).

    eval_iters, batch_size, seed: the validation batches; None = the checkpoint's own (the batches
    `minillm eval` and training's evaluations score, train.evaluate.checkpoint_eval_batches)."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError("the output folder must differ from the input checkpoint (it would overwrite the "
                         "float weights)")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    check_output_folder(out, "--out")
    folder = find_checkpoint(checkpoint)  # a checkpoint folder, or a run's newest complete one
    if Path(out).resolve() == folder.resolve():
        raise ValueError(f"the output folder must differ from the input checkpoint {folder}")
    model, tokenizer, meta = load_model(folder, device=device)
    check_finite_forward(model, folder)
    if "quantization" in meta:
        raise ValueError(f"{folder / CONFIG_FILE}: already quantized ({meta['quantization'].get('scheme')}); "
                         "quantize the float checkpoint it came from")
    qmodel = quantize_model(copy.deepcopy(model), scheme, group_size, include_embeddings, include_head,
                            backend=backend)
    report = {"scheme": scheme + (f" (group {group_size})" if scheme == "int4" else " (per channel)"),
              "device": str(device),
              "backend": sorted({m.backend for m in qmodel.modules() if hasattr(m, "backend")}),
              "bytes": [weight_bytes(model), weight_bytes(qmodel)],
              "gen_tokens": gen_tokens}
    ev = checkpoint_eval_batches(meta, batch_size, eval_iters, seed)
    report.update(eval_iters=ev["iters"], batch_size=ev["batch_size"], eval_seed=ev["seed"])

    # Measure first, write last: a failure here (a missing --data file, say) leaves no half-made output.
    source = data or recorded_data_source(meta)
    if source is None or tokenizer is None:
        report["val_ppl_skipped"] = ("no tokenizer in the checkpoint" if tokenizer is None
                                     else "no data given and none recorded")
    else:
        tokens = val_tokens(source, tokenizer, val_fraction)
        T = min(model.cfg.block_size, len(tokens) - 1)
        report["data"] = source
        report["eval_tokens"] = ev["iters"] * ev["batch_size"] * T
        report["eval_batches"] = describe_batches(ev["iters"], ev["batch_size"], T, f"{source} val")
        report["val_ppl"] = [perplexity(m, tokens, ev["batch_size"], T, ev["iters"], device, ev["seed"])
                             for m in (model, qmodel)]
    if not all(map(math.isfinite, report.get("val_ppl", []))):
        report["val_ppl_warning"] = "a perplexity is not finite"
    if gen_tokens > 0:
        start = tokenizer.encode("\n") if tokenizer is not None else [0]
        prompt = torch.tensor([start[-1:]], device=device)  # (1, 1)
        (fp_tps, fp_ids), (q_tps, q_ids) = (greedy_tokens_per_s(m, prompt, gen_tokens) for m in (model, qmodel))
        same = (fp_ids == q_ids).long().cumprod(0).sum().item()  # greedy tokens equal before they diverge
        report.update(tokens_per_s=[fp_tps, q_tps], greedy_same_prefix=f"{same}/{gen_tokens}")

    source_meta = {k: v for k, v in meta.items() if k not in ("model", "quantization", "quant_report")}
    out = save_model(out, qmodel, tokenizer, **source_meta, quantized_from=str(checkpoint))
    # the file sizes are known only now; config.json changes, so the manifest records it again
    report["file_bytes"] = [model_file_bytes(folder), (out / MODEL_FILE).stat().st_size]
    write_json(out / CONFIG_FILE, {**read_config(out), "quant_report": report})
    write_manifest(out)
    return report
