"""The CPU backend of QuantLinear: a small C kernel (csrc/quant_cpu.c), compiled on first use.

Batch-1 decoding is bound by the bytes it reads, and the reference backend makes int8/int4 *slower*
than float on a CPU: it expands the whole matrix to float on every call. The kernel in
csrc/quant_cpu.c reads each weight byte once and multiplies it with an 8-bit copy of the activations,
32 inputs per block, on integers (llama.cpp's scheme; the math and the AVX2 are written out there).
Its only difference from the reference is the rounding of x to 8 bits per block of 32:
    |y - x @ Ŵᵀ| ≤ Σ_k |Ŵ'[n, k]| · d_b / 2,     d_b = max|x| over k's block / 127,  Ŵ' = Ŵ - zero term
For many rows (prefill), a float GEMM wins over per-row integer dots, so from M = GEMM_MIN_M rows on the kernel
only expands W to fp32 (in C, in parallel) and PyTorch's GEMM does the rest.

Exact mode (CpuLayer(exact=True), QuantLinear's backend "cpu-exact"): x is not rounded; each weight is
expanded to exactly the float the reference computes and dotted with x in fp32, so y is the reference's
answer up to the order of the sums (and a quantized model gives the reference's greedy tokens). With
AVX-512 a group's 16 possible weights sit in one register and one permute looks up 16 codes, which makes
it nearly as fast as the 8-bit path at batch 1 and faster at batch 8; with AVX2 only, each code becomes
its weight by arithmetic, 8 at a time (exact_is_fast(); the figures are in docs/guides/real-models.md).
Without either it runs a scalar loop.

The same library holds csrc/decode_cpu.c: a whole decode step of a Llama-family model (norms, RoPE,
attention, SwiGLU around these matmuls), driven by minillm/generate/native.py.

How it is built, and why this way:
  * Plain C, compiled by the system's C compiler into a shared library and called through ctypes.
    A PyTorch C++ extension (torch.utils.cpp_extension) would give at::parallel_for, but compiling
    against torch's headers takes on the order of a minute on first use (the issue's estimate, not
    re-measured); this file compiled and loaded in 2.7 s on our 2-core CPU under a load of 15.
    ctypes costs a few µs per call, so a layer is described to C once (CpuLayer) and each call
    passes 6 arguments.
  * Threads: OpenMP, which is what PyTorch's own CPU ops use on Linux. The library asks for
    libgomp.so.1, and the dynamic linker hands it the copy torch already loaded (same soname), so
    there is ONE thread pool: no two runtimes spinning against each other on the same cores
    (checked in /proc/self/maps with torch 2.13's wheel; a wheel that renames its libgomp would give
    two). A compiler without -fopenmp builds a one-thread library.
    The thread count is torch.get_num_threads(), passed on every call.
  * `-O3 -march=native`: the library is built on the machine that runs it (the cache key includes
    the CPU's flags), so native instructions are safe. Without AVX2+FMA the C falls back to a
    portable scalar loop; without a C compiler, available() is False, why_unavailable() says why in
    one line, and QuantLinear stays on the reference backend.
  * Cache: $TORCH_EXTENSIONS_DIR/minillm, else $XDG_CACHE_HOME/minillm/kernels (~/.cache/...), one
    file per (source hash, compiler, flags, CPU flags), written atomically.

    >>> from minillm.compress import cpu_kernel
    >>> cpu_kernel.available(), cpu_kernel.why_unavailable()
    >>> y = cpu_kernel.quant_matmul_cpu(x, layer.weight_q, layer.scales, layer.zeros, layer.bias, "int4", 32)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "quant_cpu.c", CSRC / "decode_cpu.c"]  # compiled together into one library (decode_cpu.c:
# a Llama-family decode step over all layers, driven by minillm/generate/native.py)
HEADERS = [CSRC / "quant_cpu.h"]  # what they share (part of the cache key: a changed header rebuilds)
FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off"]  # no silent FMA: dequantize is bit-exact
# From this many rows on, expand W to fp32 once and use PyTorch's GEMM: the integer kernel's time grows
# with M while the GEMM's barely does; on our 2-core CPU (one thread, 576x1536 and 128x512 layers) they
# crossed between M = 8 and 32. Prefill pays the expansion once per layer per call, decode never.
GEMM_MIN_M = 16
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_loaded: dict[str | None, tuple[ctypes.CDLL | None, str]] = {}  # compiler ($CC or given) -> (library, why not)


def available(cc: str | None = None) -> bool:
    """True when the kernel is compiled and loaded (compiling it on the first call)."""
    return load(cc) is not None


def exact_is_fast(cc: str | None = None) -> bool:
    """True when the kernel's exact mode (float activations, backend "cpu-exact") has its SIMD tiles
    here (AVX-512 or AVX2). SmolLM2 Q4_1 kept, batch 1, our 2-core CPU, medians of 4 alternating rounds:
    exact 107 against 120 tok/s with the 8-bit mode; built for AVX2 only (-march=haswell), 80 against
    100. Without the tiles it runs scalar loops: correct, slow."""
    lib = load(cc)
    return bool(lib is not None and lib.minillm_exact_is_simd())


def why_unavailable(cc: str | None = None) -> str:
    """One line saying why the CPU kernel cannot run ("" when it can)."""
    load(cc)
    return _loaded[cc or os.environ.get("CC")][1]


def load(cc: str | None = None) -> ctypes.CDLL | None:
    """Compile (once, cached on disk) and load the library; None, with the reason in why_unavailable().
    `cc` overrides $CC (tests name a missing compiler to exercise the fallback)."""
    cc = cc or os.environ.get("CC")
    if cc not in _loaded:
        try:
            _loaded[cc] = (_build_and_load(cc), "")
        except RuntimeError as e:
            _loaded[cc] = (None, str(e))
    return _loaded[cc][0]


def _build_and_load(cc: str | None, flag_sets: list[list[str]] | None = None) -> ctypes.CDLL:
    compiler = cc or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler or not shutil.which(compiler):
        raise RuntimeError(f"no C compiler found ({compiler or 'cc, gcc, clang'}: set CC or install gcc); "
                           "using the reference path")
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    flag_sets = flag_sets or [FLAGS + ["-march=native", "-fopenmp"], FLAGS + ["-fopenmp"], FLAGS]  # best first
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"quant_cpu_{key}.so"
        if not path.exists():
            err = _compile(compiler, flags, path)
            if err:
                errors.append(err)
                continue
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        return lib
    raise RuntimeError(f"the C kernel did not compile with {compiler} ({errors[-1]}); using the reference path")


def _compile(compiler: str, flags: list[str], path: Path) -> str:
    """Compile to a temporary file, then rename into place (atomic: two processes may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        r = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        return str(e).splitlines()[0]
    if r.returncode != 0:
        os.unlink(tmp)
        return (r.stderr.strip().splitlines() or ["failed"])[-1]
    os.replace(tmp, path)
    return ""


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.minillm_qlinear.argtypes = [p, p, i32, i64, p, i32]
    lib.minillm_qlinear.restype = i32
    lib.minillm_dequantize.argtypes = [p, i32, i64, i64, i64, p, i32, p, i32, p, i32]
    lib.minillm_dequantize.restype = None
    lib.minillm_has_avx2.restype = i32
    lib.minillm_exact_is_simd.restype = i32
    lib.minillm_decode_step.argtypes = [p, p, i64, i64, p, p, i64, i32]
    lib.minillm_decode_step.restype = i32


def _cache_dir() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "minillm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minillm" / "kernels"


def _cpu_flags() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


# --- the op ------------------------------------------------------------------------------------

class _QLayer(ctypes.Structure):  # csrc/quant_cpu.h's QLayer, field for field
    _fields_ = [("w", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("s_type", ctypes.c_int32), ("z_type", ctypes.c_int32),
                ("exact", ctypes.c_int32), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class CpuLayer:
    """One quantized layer's tensors, checked once and described to the C kernel: calling it costs a
    few microseconds of Python, which matters when a small model's whole token takes a millisecond.
    It holds the tensors it describes; QuantLinear rebuilds it when one of them is replaced."""

    def __init__(self, weight_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, scheme: str, lib: ctypes.CDLL | None = None, exact: bool = False):
        """exact: keep x in float and expand each weight to the reference's value (quant_cpu.c, 3b)
        instead of rounding x to 8 bits per block: the reference's answer up to the order of the sums."""
        self.lib = lib or load()
        if self.lib is None:
            raise RuntimeError(f"the CPU quantized matmul is unavailable: {why_unavailable()}")
        N = weight_q.shape[0]
        K = weight_q.shape[1] * (2 if scheme == "int4" else 1)
        _check(weight_q.new_empty(0, K, dtype=torch.float32), weight_q, scales, zeros, scheme)
        if bias is not None and bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        self.tensors = (weight_q, scales, zeros, bias)  # kept alive: the C side holds their addresses
        self.bias32 = bias.float().contiguous() if bias is not None else None
        z = zeros if zeros is not None else scales  # int8: never read
        self.N, self.K, self.bits = N, K, (8 if scheme == "int8" else 4)
        self.G = K // scales.shape[1] if scales.dim() == 2 else 0  # 0 = int8 per output channel
        self.desc = _QLayer(weight_q.data_ptr(), N, K, self.G, self.bits, _DTYPE_CODE[scales.dtype],
                            _DTYPE_CODE[z.dtype], int(exact), scales.data_ptr(), z.data_ptr(),
                            self.bias32.data_ptr() if self.bias32 is not None else None)
        self.addr = ctypes.addressof(self.desc)

    def __reduce__(self):  # a copied or pickled model rebuilds its description (addresses do not travel)
        return type(None), ()

    def describes(self, weight_q, scales, zeros, bias) -> bool:
        w, s, z, b = self.tensors
        return w is weight_q and s is scales and z is zeros and b is bias and w.data_ptr() == self.desc.w

    def bound_call(self):
        """x -> self(x), leaner, for a decode step (generate/flat.py via QuantLinear.bound_forward): a
        contiguous fp32 x of fewer than GEMM_MIN_M rows goes straight to C; anything else takes
        __call__. On the tiny preset a step's matmuls are ~1 µs each, so the checks around them are
        what a quantized model pays over a float one."""
        fn, addr, K, N, full = self.lib.minillm_qlinear, self.addr, self.K, self.N, self.__call__
        threads, empty, f32, gemm_min = torch.get_num_threads, torch.empty, torch.float32, GEMM_MIN_M

        def call(x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
            M = x.numel() // K
            if x.dtype is not f32 or x.shape[-1] != K or M >= gemm_min or not x.is_contiguous() or not x.is_cpu:
                return full(x)
            y = empty(x.shape[:-1] + (N,))
            if fn(addr, x.data_ptr(), 0, M, y.data_ptr(), threads()):
                raise MemoryError(f"quant_matmul_cpu: no memory for the quantized activations (M={M}, K={K})")
            return y
        return call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        K, N = self.K, self.N
        if x.shape[-1] != K or x.dtype not in _DTYPE_CODE or not x.is_cpu:
            raise ValueError(f"x must be a CPU float32/bfloat16/float16 tensor (..., {K}), got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        M = x.numel() // K  # rows: x is read as (M, K), y written as (M, N), no reshape needed
        if M >= GEMM_MIN_M:  # prefill: expand W once (bit-exact to the reference), then a float GEMM
            w = torch.empty(N, K, dtype=torch.float32)
            d = self.desc
            self.lib.minillm_dequantize(d.w, self.bits, N, K, self.G, d.s, d.s_type, d.z, d.z_type, w.data_ptr(),
                                        torch.get_num_threads())
            return F.linear(x.float(), w, self.bias32).to(x.dtype)  # (..., N)
        y = torch.empty(x.shape[:-1] + (N,), dtype=torch.float32)  # (..., N)
        if self.lib.minillm_qlinear(self.addr, x.data_ptr(), _DTYPE_CODE[x.dtype], M, y.data_ptr(),
                                    torch.get_num_threads()):
            raise MemoryError(f"quant_matmul_cpu: no memory for the quantized activations (M={M}, K={K})")
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def quant_matmul_cpu(x: torch.Tensor, weight_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bias: torch.Tensor | None, scheme: str, group_size: int | None = None,
                     exact: bool = False) -> torch.Tensor:
    """x (..., K) float -> y (..., N) in x's dtype; the tensors as quant_format.py stores them:
    int8: weight_q (N, K) int8, scales (N,) or (N, K/G);  int4: weight_q (N, K/2) uint8, scales/zeros
    (N, K/G). Scales, zeros and bias may each be fp32, bf16 or fp16; the group size is read off the
    shape of `scales` (group_size, when given, must agree). Inference only (no autograd)."""
    if group_size is not None and scales.dim() == 2 and scales.shape[1] * group_size != x.shape[-1]:
        raise ValueError(f"group_size={group_size} does not match scales {tuple(scales.shape)} for K={x.shape[-1]}")
    if x.shape[-1] != weight_q.shape[-1] * (2 if scheme == "int4" else 1):
        raise ValueError(f"x has K={x.shape[-1]} features but weight_q is {tuple(weight_q.shape)} ({scheme})")
    return CpuLayer(weight_q, scales, zeros, bias, scheme, exact=exact)(x)


def _check(x, weight_q, scales, zeros, scheme) -> None:
    """Clear errors before the C code runs: a wrong shape there is a wrong answer or a crash."""
    if x.device.type != "cpu" or weight_q.device.type != "cpu":
        raise ValueError("quant_matmul_cpu runs on CPU tensors; on CUDA use backend='triton'")
    for name, t in (("x", x), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.dtype not in _DTYPE_CODE:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name, t in (("weight_q", weight_q), ("scales", scales), ("zeros", zeros)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    N, K = weight_q.shape[0], x.shape[-1]
    if scheme == "int8":
        if weight_q.dtype != torch.int8 or weight_q.shape != (N, K):
            raise ValueError(f"int8 weight_q must be int8 ({N}, {K}), got {weight_q.dtype} {tuple(weight_q.shape)}")
        if not (scales.shape == (N,) or (scales.dim() == 2 and scales.shape[0] == N and scales.shape[1] > 0
                                         and K % scales.shape[1] == 0 and (K // scales.shape[1]) % 32 == 0)):
            raise ValueError(f"int8 scales must be ({N},) or ({N}, K/G) with G a multiple of 32, "
                             f"got {tuple(scales.shape)}")
    elif scheme == "int4":
        if weight_q.dtype != torch.uint8 or weight_q.shape != (N, K // 2) or K % 2:
            raise ValueError(f"int4 weight_q must be uint8 ({N}, {K // 2}), got {weight_q.dtype} "
                             f"{tuple(weight_q.shape)}")
        if (zeros is None or scales.dim() != 2 or zeros.shape != scales.shape or scales.shape[0] != N
                or K % scales.shape[1] or (K // scales.shape[1]) % 32):
            raise ValueError(f"int4 scales and zeros must both be ({N}, K/G) with G a multiple of 32, got "
                             f"{tuple(scales.shape)} and {None if zeros is None else tuple(zeros.shape)}")
    else:
        raise ValueError(f"scheme must be 'int8' or 'int4', got {scheme!r}")
