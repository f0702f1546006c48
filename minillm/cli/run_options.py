"""The options every command that runs a model shares: threads, GGUF weights kept quantized, the
quantized matmul's backend, and compiled decode steps (`minillm generate`, `chat`, `serve`).

Decoding one token at batch 1 reads every weight once, so on a CPU its speed is set by the bytes
per token (SmolLM2-135M: 540 MB in fp32, 98 MB as the Q4_1 GGUF's blocks) and by how many cores
pull them from memory. So a GGUF file is kept quantized by default (minillm/weights/gguf_keep.py:
the file's blocks as minillm's int4/int8 formats, exactly its values), --dequantize asks for fp32
weights instead, and --backend picks the quantized layers' matmul (minillm/compress/quant.py).

    add_run_options(parser, compile=True)   --threads, --backend, --dequantize (and --compile)
    set_threads(args)                       torch.set_num_threads(--threads); returns the count used
    load_options(args, device)              the keywords for load_model: backend, keep_quantized
    flat_decode(args)                       False / True / "compile": generate_text's flat_decode
"""

from __future__ import annotations

import inspect

import torch

BACKEND_CHOICES = ("auto", "reference", "cpu", "cpu-exact", "triton")

THREADS_HELP = ("CPU threads for PyTorch's ops (default: PyTorch's own choice, one per physical core, "
                f"here {torch.get_num_threads()}); on a CPU shared with other jobs, fewer threads than "
                "cores can be faster, since each op waits for its slowest thread")
BACKEND_HELP = ("the matmul of quantized layers (a GGUF file kept quantized, or a `minillm quantize` "
                "checkpoint): auto = the library's default_backend for the device; reference = "
                "dequantize each weight matrix in PyTorch, then F.linear (what a student reads); cpu = "
                "the C kernel over the packed blocks (compiled on first use), activations rounded to 8 bits "
                "per block of 32 as llama.cpp does; cpu-exact = the same kernel with float activations and "
                "each weight expanded to the reference's value (the reference's tokens, 10-20% slower; auto "
                "picks it where the CPU has AVX2 or AVX-512); triton = the fused Triton kernel "
                "(CUDA). Float models ignore it")
DEQUANTIZE_HELP = ("GGUF files: dequantize every weight to fp32 at load (540 MB for SmolLM2-135M) "
                   "instead of keeping the file's quantized blocks (98 MB for its Q4_1 file), the default")
COMPILE_HELP = ("run each decode step through torch.compile (minillm/generate/flat.py): fuses the small "
                "ops between the matmuls, but compiling takes minutes on a small CPU (and needs a C++ "
                "compiler) and the logits differ from the eager step in the last bits; off by default")


def add_run_options(p, compile: bool = True) -> None:
    """--threads, --backend, --dequantize, and (compile=True) --compile on the parser `p`."""
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    p.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    if compile:
        p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def set_threads(args) -> int:
    """Apply --threads (None keeps PyTorch's default) and return the number of threads in use."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def load_options(args, device) -> dict:
    """load_model's keywords for --backend and --dequantize: backend= always (float models ignore it),
    keep_quantized= for GGUF files (other formats ignore it), when this load_model takes it."""
    from minillm.compress.quant import default_backend
    from minillm.weights.checkpoint import load_model

    kw = {"backend": default_backend(device) if args.backend == "auto" else args.backend}
    if "keep_quantized" in inspect.signature(load_model).parameters:  # (a loader without it dequantizes)
        kw["keep_quantized"] = not args.dequantize
    return kw


def flat_decode(args, readable: bool = False):
    """generate_text's flat_decode for these options: "compile" with --compile, else not --readable."""
    if getattr(args, "compile", False):
        if readable:
            raise ValueError("--compile compiles the flat decode step; --readable runs the modules: "
                             "choose one")
        return "compile"
    return not readable
