"""minillm.kernels: Triton kernels, the optional fast path (pip install 'minillm[kernels]').

This folder sits at the top of the repository as `kernels/` and is installed as `minillm.kernels`
(see pyproject.toml's package-dir), so it never collides with the unrelated PyPI package `kernels`.
Nothing here is imported by minillm unless a model asks for it (ModelConfig.attention="triton",
or quantized layers on CUDA).

Reading order (imports only point up this list, never down):
    common.py          what every kernel file shares: LOG2E, is_interpreted(), input checks, autotuning
    attention_bwd.py   FlashAttention-2 backward: dQ, dK, dV
    attention.py       FlashAttention-2 forward and `flash_attention`, the autograd Function over both
    quant_matmul.py    int8 / int4 weight-only matmul that dequantizes while loading
"""
