"""Compression: smaller, cheaper models for deployment.

Read in this order:
    quant_format.py  the int8 (per channel) and int4 (group-wise, packed) formats: quantize / dequantize
    quant.py      weight-only quantization of a model: QuantLinear, quantize_model, the kernel switch
    cpu_kernel.py the 'cpu' backend: a small C kernel (csrc/quant_cpu.c), compiled on first use, that dots
                  int8/int4 codes with 8-bit activations per block of 32, as llama.cpp does;
                  csrc/decode_cpu.c, built beside it, runs a whole decode step (generate/native.py)
    quant_grad.py the gradient through a frozen QuantLinear (QLoRA), Ŵ recomputed in the backward
    quantize.py   quantize a saved checkpoint and measure what it cost: bytes, perplexity, speed
    prune.py      pruning: unstructured magnitude (layer-wise, global, gradual), 2:4, and structured
                  (whole heads and FFN neurons removed: a smaller dense model)
    distill.py    knowledge distillation: τ²·KL(p_T^τ ‖ p_S^τ) + hard loss, teacher on the fly or top-k
    jobs.py       prune / distil a saved checkpoint into a new one (what `minillm prune|distill` run)
    report.py     one table and a Pareto plot for any set of checkpoints (`minillm compress report`)

The short fine-tune after pruning, and the loop distillation trains in, are training: `finetune` in
train/fit.py, the step and loop that every training loop but the showpiece shares.
"""

from minillm.compress.quant import QuantLinear, dequantize, quantize, quantize_model, set_backend, weight_bytes

__all__ = ["QuantLinear", "dequantize", "quantize", "quantize_model", "set_backend", "weight_bytes"]
