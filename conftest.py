"""Test-session setup shared by tests/ and bench/.

Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present. The
interpreter is chosen when triton is first imported, so TRITON_INTERPRET must be set here,
before any test module imports triton or minillm.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
