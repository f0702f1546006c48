"""Compression: smaller, cheaper models for deployment.

Read in this order:
    quant.py      weight-only int8 (per channel) and int4 (group-wise) quantization, written out:
                  quantize / dequantize, QuantLinear, quantize_model
    quantize.py   quantize a saved checkpoint and measure what it cost: bytes, perplexity, speed
"""

from minillm.compress.quant import QuantLinear, dequantize, quantize, quantize_model, set_backend, weight_bytes

__all__ = ["QuantLinear", "dequantize", "quantize", "quantize_model", "set_backend", "weight_bytes"]
