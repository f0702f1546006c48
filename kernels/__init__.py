"""minillm.kernels: Triton kernels, the optional fast path (pip install 'minillm[kernels]').

This folder sits at the top of the repository as `kernels/` and is installed as `minillm.kernels`
(see pyproject.toml's package-dir), so it never collides with the unrelated PyPI package `kernels`.
Nothing here is imported by minillm unless a model asks for it (ModelConfig.attention="triton",
or quantized layers on CUDA).
"""
