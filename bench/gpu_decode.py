"""The decode section of bench/gpu_table.py: SmolLM2-135M tokens per second at batch 1.

Like the sections in bench/gpu_sections.py (whose Context, run_case and timer it uses), a generator
of result rows, run in its own process by bench/gpu_table.py.
"""

from __future__ import annotations

import copy

import torch

from bench.gpu_sections import CUDA, Context, median_seconds, run_case

DECODE_VARIANTS = ("bf16", "int8", "int4")  # minillm's own weight-only formats, the float one first


def decode(ctx: Context):
    """Greedy tokens/s at batch 1 after a 34-token prompt (its prefill included, as a user waits for
    it), on the path `minillm generate` runs: fused ops, flat decode steps, a KV cache.

    The real SmolLM2-135M-Instruct GGUF when it is pulled (ctx.model); otherwise (and in --toy)
    a model of its shape with random weights, since decoding speed does not depend on the values.
    """
    from minillm.compress.quant import quantize_model
    from minillm.generate.sampling import generate
    from minillm.model.builtin_ops import for_inference
    from minillm.model.config import ModelConfig
    from minillm.model.transformer import CausalLM

    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32  # the CPU's bf16 matmuls are slower than fp32
    new = 16 if ctx.toy else 128
    model, name, why = None, "SmolLM2-135M shape, random weights", None
    if ctx.model is None:
        why = "no --model given"
    else:
        from minillm.weights.checkpoint import load_model
        from minillm.weights.pull import resolve

        try:
            path = resolve(ctx.model)  # a pulled model's name -> its file; says how to pull it if it is not
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file")
        except FileNotFoundError as e:
            why = str(e).splitlines()[0]
        else:
            model, name = load_model(path, device=dev)[0], f"{path.name} (real weights)"
    if model is None:
        yield {"section": "decode", "status": "skipped", "model": str(ctx.model), "reason": why}
        small = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128, vocab_size=256) if ctx.toy else {}
        torch.manual_seed(0)
        model = CausalLM(ModelConfig.from_preset("smollm2-135m", block_size=512, **small)).to(dev)
    model = for_inference(model.to(dev, dtype).eval())  # PyTorch's fused norms and attention, as the CLI
    idx = torch.randint(0, model.cfg.vocab_size, (1, 34), generator=torch.Generator().manual_seed(0)).to(dev)
    seconds = {}

    def measure(variant: str):
        m = model if variant == "bf16" else quantize_model(copy.deepcopy(model), variant, 32 if ctx.toy else 128)
        run = lambda: generate(m, idx, new, temperature=0.0, flat_decode=True)  # noqa: E731
        # correctness once: the flat decode steps pick the module path's tokens (a bf16 near-tie may differ)
        tokens = run()
        same = (tokens == generate(m, idx, new, temperature=0.0)).float()[0, 34:].mean().item()
        t = median_seconds(run, ctx.reps(3), ctx.warmup(1))
        seconds[variant] = t
        figures = {"tokens_per_s": new / t, "ms_per_token": t / new * 1e3, "same_tokens_as_modules": same}
        if "bf16" in seconds:
            figures["vs_float"] = seconds["bf16"] / t
        return figures

    for variant in DECODE_VARIANTS:
        label = "fp32" if variant == "bf16" and dtype == torch.float32 else variant
        yield run_case(ctx, "decode", lambda: measure(variant), model=name, variant=label, new_tokens=new)
