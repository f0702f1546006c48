"""What the kernel files share, so that each idea is written once and imports never go in a circle.

Every other file in kernels/ imports from this one, and this one imports none of them (the reading
order is in __init__.py). Inside: the base-2 constants and `_key_blocks` / `_window_key_blocks`, which
the attention forward and backward kernels both use; `is_interpreted()`, the one interpreter check; the launchers' input
checks; attention's launch configurations; and `autotuned`, which builds every autotuned kernel.

Autotuning looks the same in every kernel file (after the Triton tutorials and Liger-Kernel): a
short, explicit list of `triton.Config` per kernel, one small config for the interpreter, and a
`keep(config, args)` filter that drops the configs not worth timing for a call. `autotuned` below
turns them into the kernel to launch. To re-tune for a new GPU: run that file's benchmark
(`pytest bench/test_attention.py --benchmark-only`, `bench/test_quant_matmul.py`) with
TRITON_PRINT_AUTOTUNING=1, see which configs win, add or drop rows in the list, and re-run.
"""

from __future__ import annotations

import numbers

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the engine runs without kernels; this file cannot
    raise ImportError("minillm.kernels needs Triton: pip install 'minillm[kernels]' (Linux)") from e

# Kernels may only read globals that are tl.constexpr; Python code reads their `.value`.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x = 2^(x · log2 e); exp2 is the GPU's native exp
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): turns a base-2 log-sum-exp back into natural units
HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs ≥ 16 along each dim, and a power of two for tl.arange
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _key_blocks(start_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which key blocks the query rows [start_m, start_m + BLOCK_M) need, in two ranges:
    [0, n_full) every key is visible to every row (no mask work), [n_full, hi) needs masking.
    Shared by the attention forward and the dQ backward, which visit keys the same way.

    Causal skipping: row i sees keys j ≤ i + Tk - Tq. The block's first row sees every key up to
    start_m + offset, so blocks ending there are unmasked; its last real row sees up to
    min(start_m + BLOCK_M, Tq) - 1 + offset, so blocks after that are never loaded at all.
    """
    n_tail = (Tk // BLOCK_N) * BLOCK_N  # blocks past this one hang over the end of the keys
    if CAUSAL:
        offset = Tk - Tq
        n_full = (tl.maximum(start_m + offset + 1, 0) // BLOCK_N) * BLOCK_N
        n_full = tl.minimum(n_full, n_tail)
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M, Tq) + offset, 0)
        hi = tl.maximum(hi, n_full)
    else:
        n_full = n_tail
        hi = Tk
    return n_full, hi



@triton.jit
def _window_key_blocks(start_m, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_key_blocks` for causal sliding-window attention, in three ranges: [lo, full_lo) the window's
    left edge, masked; [full_lo, full_hi) every key visible to every row, unmasked; [full_hi, hi)
    the diagonal and the ragged tail, masked. Blocks before lo and from hi on are never loaded.

    Row i sees keys j with  i + offset - window < j ≤ i + offset  (offset = Tk - Tq): its own key
    position and the window - 1 before it. Over the block's rows, from the first (start_m) to the
    last real one, the union of what they see starts at start_m + offset - window + 1 (lo, rounded
    down to a block) and ends at the last row's position (hi). A key block is seen whole by every
    row if it starts at or after the *last* row's window start (full_lo, rounded up) and ends at or
    before the *first* row's own position (full_hi, rounded down, as in `_key_blocks`). When the
    window is narrower than a block, full_lo > full_hi and every visited block is masked.
    Everything is clamped at 0 before `//`: Triton's integer division truncates, Python's floors.
    """
    offset = Tk - Tq
    first = start_m + offset  # the first row's own key position
    last = tl.minimum(start_m + BLOCK_M, Tq) - 1 + offset  # the last real row's own key position
    hi = tl.maximum(last + 1, 0)
    lo = tl.minimum((tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N, hi)
    full_lo = tl.minimum(tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N, hi)
    full_hi = tl.minimum((tl.maximum(first + 1, 0) // BLOCK_N) * BLOCK_N, (Tk // BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)  # an empty middle range when the window is narrow
    return lo, full_lo, full_hi, hi

def is_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before triton was imported: @triton.jit then returned an
    interpreter (numpy on the CPU) instead of a GPU kernel. Asked of a kernel, not of the environment,
    because the choice was made once, when the kernels were defined; any @triton.jit function tells."""
    return not isinstance(_key_blocks, triton.runtime.jit.JITFunction)


def dot_precision(dtype) -> str:
    """fp32 inputs get exact fp32 products ("ieee"), matching torch's default (TF32 off)."""
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16


def bucket(n: int) -> int:
    """Autotune per power-of-two size, not per size: decoding grows Tk (or M) by one every token."""
    return triton.next_power_of_2(n)


# ------------------------------------------------------------------------------------------------
# Input checks. A wrong shape in a kernel is a silent wrong answer or a crash, so launchers check
# first and name the problem.
# ------------------------------------------------------------------------------------------------
def check_runnable(x: torch.Tensor, op: str, fallback: str, interpreted: bool) -> None:
    """The two refusals every launcher shares; both are about where the kernel runs, not the math.
    `interpreted` is is_interpreted(), passed in so that a caller may keep it as a flag."""
    if x.dtype == torch.bfloat16 and interpreted:
        # triton-lang/triton#11584: numpy has no bfloat16, and the interpreter's tl.dot multiplies
        # bf16 bit patterns. Refuse rather than answer wrongly; bf16 is tested on CUDA.
        raise TypeError(f"{op}: Triton's interpreter (TRITON_INTERPRET=1) cannot run bf16 tl.dot: "
                        "use fp32 or fp16 on the CPU, or run bf16 on a GPU")
    if x.device.type != "cuda" and not interpreted:
        raise RuntimeError(f"{op} got {x.device} tensors, but Triton kernels need CUDA tensors: {fallback}. "
                           "To run the kernels (slowly) on the CPU instead, set TRITON_INTERPRET=1 before "
                           "triton is first imported")


def check_inputs(q, k, v, key_padding_mask=None, causal=False, window=None):
    """Attention's checks (forward and backward); returns the (B, Tk) mask as uint8 or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention expects {name} of shape (B, H, T, D); got {got}")
    (B, H, Tq, D), (H_kv, Tk) = q.shape, k.shape[1:3]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must both be "
                         "(B, H_kv, Tk, D) with the same B and D as q")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"q has H={H} heads and k, v have H_kv={H_kv}: grouped-query attention needs H to be "
                         "a multiple of H_kv")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window must be an int (keys each query sees, itself included) or None; got {window!r}")
        if window < 1:
            raise ValueError(f"window={window}: a sliding window must be >= 1 (a query always sees itself)")
        if not causal:
            raise ValueError("window (sliding-window attention) needs causal=True: a query sees its own position "
                             "and the window - 1 keys before it")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the Triton kernel; use one of {HEAD_DIMS} "
                         "(or attention='sdpa' / 'naive')")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"q, k, v must share one dtype among fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.bfloat16 and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 8:
        raise TypeError("bf16 tensor cores need an Ampere or newer GPU (sm80+); use fp16 on this GPU")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    check_runnable(q, "flash_attention", "move q, k, v to the GPU (or use attention='sdpa' / 'naive')",
                   interpreted=is_interpreted())
    if Tq == 0 or Tk == 0:
        raise ValueError(f"empty sequence: Tq={Tq}, Tk={Tk}; attention needs at least one query and one key")
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (B, Tk):
        raise ValueError(f"key_padding_mask must be (B, Tk) = {(B, Tk)}; got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.is_floating_point():
        raise TypeError("key_padding_mask must be bool (True = real key), not an additive float mask")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    return (key_padding_mask != 0).to(torch.uint8)  # (B, Tk); 1 byte per key, any int/bool accepted


def window_arg(window, Tk: int) -> int:
    """The window the kernels get: 0 for none. A window of Tk keys or more hides no key from any
    query (the last query's window starts at Tk - window ≤ 0), so it is dropped and the kernels take
    the plain causal path, skipping the window's mask work."""
    return 0 if window is None or window >= Tk else int(window)


# ------------------------------------------------------------------------------------------------
# Attention's launch configurations, forward and backward in one place, as they are tuned together.
# Short on purpose: every surviving config is timed once per (dtype, D, causal, length bucket).
# To re-tune: see this file's docstring; the benchmark is bench/test_attention.py.
# ------------------------------------------------------------------------------------------------
def _attn_config(BLOCK_M, BLOCK_N, warps, stages):
    return triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}, num_warps=warps, num_stages=stages)


FWD_CONFIGS = [
    _attn_config(128, 64, warps=4, stages=3), _attn_config(128, 64, warps=8, stages=3),
    _attn_config(128, 128, warps=8, stages=3), _attn_config(128, 32, warps=4, stages=4),
    _attn_config(64, 64, warps=4, stages=4), _attn_config(64, 32, warps=4, stages=3),
]
BWD_DKDV_CONFIGS = [  # one program per BLOCK_N keys
    _attn_config(32, 128, warps=4, stages=3), _attn_config(64, 128, warps=8, stages=3),
    _attn_config(32, 64, warps=4, stages=3), _attn_config(64, 64, warps=4, stages=2),
]
BWD_DQ_CONFIGS = [  # one program per BLOCK_M queries
    _attn_config(128, 32, warps=4, stages=3), _attn_config(128, 64, warps=8, stages=3),
    _attn_config(64, 64, warps=4, stages=3), _attn_config(64, 32, warps=4, stages=2),
]
# Under the interpreter small tiles run fastest on a CPU. They are deliberately unequal
# (BLOCK_M != BLOCK_N), as on the GPU, so that CPU tests cover that case.
FWD_INTERPRETER_CONFIG = _attn_config(64, 32, warps=4, stages=1)
BWD_DKDV_INTERPRETER_CONFIG = _attn_config(32, 64, warps=4, stages=1)
BWD_DQ_INTERPRETER_CONFIG = _attn_config(64, 32, warps=4, stages=1)
# WINDOW_BUCKET: a sliding window makes a long sequence's work that of a short one (0 without a window)
ATTENTION_TUNING_KEY = ["TQ_BUCKET", "TK_BUCKET", "WINDOW_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM"]  # + dtypes


def keep_attention(config, args: dict) -> bool:
    """Drop configs not worth timing: 8 warps need a big tile, or most of them idle."""
    return not (config.num_warps == 8 and config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] < 128 * 64)


# ------------------------------------------------------------------------------------------------
# Autotuning: each kernel file lists its configs and a keep() filter; this builds the launcher.
# ------------------------------------------------------------------------------------------------
def hardware_configs(configs):
    """The hardware-specific part, kept out of the kernels: trim pipelining depth to the GPU's
    shared memory. Hopper/A100 (sm80, sm90: 164-228 KB) take the list as is; consumer Ampere/Ada
    (sm86, sm89: ~100 KB; A10G, L4, RTX) and older get at most 2 stages."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) in ((8, 0), (9, 0)) or major >= 10:
        return configs
    trimmed = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, 2), pre_hook=c.pre_hook)
               for c in configs]
    return list(dict.fromkeys(trimmed))  # configs that became equal are timed once


_TUNED = {}  # name -> autotuned kernel, built on first launch (trimming the list needs the GPU)


def autotuned(name: str, kernel, configs, interpreter_config, key, keep):
    """`kernel` wrapped in triton.autotune, built once per name on first use.

    On a GPU it times every config of `configs` (trimmed to the GPU) that `keep(config, args)` lets
    through, once per value of the `key` arguments (and tensor dtypes), and keeps the fastest.
    Under the interpreter there is nothing to time: it runs `interpreter_config`, a small one.
    Launch it without the config's meta-parameters (BLOCK_M, ...): the autotuner passes them.
    """
    if name not in _TUNED:
        configs = [interpreter_config] if is_interpreted() else hardware_configs(configs)

        def prune(configs, named_args, **kwargs):  # triton's early_config_prune hook
            return [c for c in configs if keep(c, {**named_args, **kwargs})]

        _TUNED[name] = triton.autotune(configs=configs, key=key,
                                       prune_configs_by={"early_config_prune": prune})(kernel)
    return _TUNED[name]
