"""The runtimes bench/real_model.py compares, each behind the same two verbs.

A row is one way of running the same GGUF file. Every row can `generate(rows, n_new)`: greedy
tokens for a batch of equal-length prompts, timed so that prefill and decode can be told apart
(the first token comes out right after the prefill; every later one costs a decode step). The
minillm rows can also give `logits(ids)` for perplexity, and carry their model for the greedy
comparisons.

    key           what runs
    fp32          minillm, the GGUF dequantized to fp32 (load_model), for_inference, flat decode:
                  the path `minillm generate` takes
    bf16          the same model cast to bfloat16
    int8, int4    minillm's own quantize_model of those fp32 weights: int8 per output channel,
                  int4 in groups of 32; the tied head+embedding stays fp32 unless --quant_head=true;
                  the matmul backend load_model would give them (default_backend: "cpu" where
                  QuantLinear's C kernel compiles), unless --backend
    q4_1          load_model(keep_quantized=True): the file's Q4_1/Q8_0 blocks kept as they are
    transformers  transformers' GGUF loader (dequantized to fp32) and its `generate`
    llama.cpp     llama-cpp-python on the file as it is (Q4_1 matmuls), when installed

A row whose feature is missing (a minillm switch not written yet, an optional library not
installed) is built with `skip` set to the reason, and the benchmark prints it instead of a figure.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

KEYS = ("fp32", "bf16", "int8", "int4", "q4_1", "transformers", "llama.cpp")
MINILLM_KEYS = ("fp32", "bf16", "int8", "int4", "q4_1")
GROUP_SIZE = 32  # int4 group, the GGUF's Q4_1 block size


@dataclass
class Row:
    """One runtime. generate(rows: list[list[int]], n_new) -> (tokens (B, n_new), t_first_s, t_total_s)."""
    key: str
    label: str
    generate: Callable | None = None
    logits: Callable | None = None  # ids -> (T, V) logits, for perplexity (minillm rows)
    model: torch.nn.Module | None = None
    skip: str | None = None  # why this row is not measured
    no_batch: str | None = None  # why this row cannot decode several prompts at once
    info: dict = field(default_factory=dict)


def skipped(key: str, label: str, reason: str) -> Row:
    return Row(key, label, skip=reason)


# --- minillm ---------------------------------------------------------------------------------

def minillm_generate(model):
    """Greedy tokens through generate_tokens(flat_decode=True), as `minillm generate` runs them."""
    from minillm.generate.sampling import generate_tokens

    def run(rows: list[list[int]], n_new: int):
        idx = torch.tensor(rows)  # (B, T), all prompts the same length: no padding
        out, t_first, t0 = [], 0.0, time.perf_counter()
        for nxt in generate_tokens(model, idx, n_new, temperature=0.0, flat_decode=True):  # (B,)
            if not out:
                t_first = time.perf_counter() - t0  # the prefill and the first sample
            out.append(nxt)
        return torch.stack(out, dim=1).tolist(), t_first, time.perf_counter() - t0
    return run


def minillm_logits(model):
    @torch.inference_mode()
    def logits(ids: list[int]) -> torch.Tensor:  # (T, V)
        return model(torch.tensor([ids]))[0][0]
    return logits


def has_keep_quantized() -> bool:
    from minillm.weights.checkpoint import load_model
    return "keep_quantized" in inspect.signature(load_model).parameters


def _backend(model) -> str | None:
    from minillm.compress.quant import QuantLinear
    return next((m.backend for m in model.modules() if isinstance(m, QuantLinear)), None)


def minillm_rows(path: str, keys, *, quant_head: bool = False, backend: str | None = None,
                 block_size: int = 2048) -> tuple[dict[str, Row], object]:
    """The minillm rows among `keys`, and the tokenizer. All start from one load of the file."""
    from minillm.compress.quant import BACKENDS, default_backend, quantize_model, set_backend
    from minillm.model.builtin_ops import for_inference
    from minillm.weights.checkpoint import load_model

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--backend={backend}: this checkout's QuantLinear knows {', '.join(BACKENDS)}")
    base, tok, _ = load_model(path, block_size=block_size)
    base.eval()
    head = "head and embedding too" if quant_head else "head and embedding in fp32"
    labels = {"fp32": "minillm fp32 (GGUF dequantized)", "bf16": "minillm bf16",
              "int8": f"minillm int8 per-channel ({head})", "int4": f"minillm int4 g{GROUP_SIZE} ({head})",
              "q4_1": "minillm Q4_1 kept (GGUF blocks as they are)"}
    models: dict[str, torch.nn.Module] = {}
    rows: dict[str, Row] = {}
    for key in keys:  # every copy is made from the untouched fp32 model
        if key == "bf16":
            models[key] = copy.deepcopy(base).to(torch.bfloat16)
        elif key in ("int8", "int4"):
            models[key] = quantize_model(copy.deepcopy(base), key, group_size=GROUP_SIZE, include_embeddings=quant_head,
                                         include_head=quant_head)
            # the backend load_model gives a quantized checkpoint (quantize_model builds on the reference)
            set_backend(models[key], backend or default_backend("cpu"))
        elif key == "q4_1":
            if not has_keep_quantized():
                rows[key] = skipped(key, labels[key], "load_model has no keep_quantized=True in this checkout "
                                    "(issue 27 item 2)")
                continue
            models[key], _, _ = load_model(path, block_size=block_size, keep_quantized=True)
            if backend is not None:
                set_backend(models[key], backend)
    if "fp32" in keys:
        models["fp32"] = base
    for key, model in models.items():
        for_inference(model.eval())
        b = _backend(model)
        rows[key] = Row(key, labels[key] + (f", backend {b}" if b else ""), minillm_generate(model),
                        minillm_logits(model), model, info={"backend": b})
    return {k: rows[k] for k in keys if k in rows}, tok


# --- references ------------------------------------------------------------------------------

def transformers_model(path: str):
    """transformers' own loader of the same GGUF (dequantized to fp32), or None when not installed."""
    try:
        import transformers
    except ImportError:
        return None
    p = Path(path)
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                             dtype=torch.float32).eval()


def transformers_row(path: str, hf=None) -> Row:
    label = "transformers fp32 generate"
    hf = hf if hf is not None else transformers_model(path)
    if hf is None:
        return skipped("transformers", label, "transformers not installed (pip install transformers)")
    import transformers
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate calls put() once with the prompt, then once per new token: the second call is
        the first token, i.e. the end of the prefill."""
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(rows: list[list[int]], n_new: int):
        idx, clock = torch.tensor(rows), Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():  # eos_token_id=None: all n_new steps run, through an EOS too
            out = hf.generate(idx, max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                              pad_token_id=0, streamer=clock)
        t_total = time.perf_counter() - t0
        return out[:, idx.shape[1]:].tolist(), clock.times[1] - t0, t_total
    return Row("transformers", f"transformers {transformers.__version__} fp32 generate", run,
               lambda ids: hf(torch.tensor([ids])).logits[0], hf)


def _import_llama():
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama


LLAMA_MISSING = ("llama-cpp-python not installed (pip install llama-cpp-python: an sdist that compiles "
                 "llama.cpp, ~10 min on 2 cores)")


def llama_cpp_row(path: str, threads: int, n_ctx: int) -> Row:
    """llama.cpp on the file as it is, n_threads (prefill and decode) = `threads`."""
    Llama = _import_llama()
    if Llama is None:
        return skipped("llama.cpp", "llama.cpp", LLAMA_MISSING)
    import llama_cpp
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def run(rows: list[list[int]], n_new: int):
        if len(rows) != 1:
            raise ValueError("llama.cpp row: one prompt at a time")
        llm.reset()  # forget the last prompt: no prefix of it is reused from the KV cache
        out, t_first, t0 = [], 0.0, time.perf_counter()
        for token in llm.generate(rows[0], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if not out:
                t_first = time.perf_counter() - t0
            out.append(token)
            if len(out) == n_new:
                break
        return [out], t_first, time.perf_counter() - t0
    return Row("llama.cpp", f"llama.cpp {llama_cpp.__version__} (llama-cpp-python), the GGUF as it is", run,
               no_batch="llama-cpp-python's Llama decodes one sequence at a time")


def llama_cpp_logits(path: str, window: int, threads: int):
    """ids -> (T, V) logits from llama.cpp, or None when llama-cpp-python is not installed."""
    Llama = _import_llama()
    if Llama is None:
        return None
    llm = Llama(model_path=path, n_ctx=window, n_batch=window, logits_all=True, verbose=False, n_threads=threads,
                n_threads_batch=threads)

    def logits(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(llm.scores[:len(ids)].copy())
    return logits
