"""The kernel sections of bench/gpu_table.py: attention, quantized matmul, the baby GPT's training step
(decoding is in bench/gpu_decode.py).

Each section is a generator of result rows (plain dicts, one per measured case) that runs cases until
its time box is spent; bench/gpu_table.py runs each in its own process and writes the rows as JSON
lines. The cases reuse the pytest benchmarks' pieces (bench/test_attention.py's providers,
bench/test_quant_matmul.py's layers and tinygemm packing) so the table and the suites time the same
calls; what is new here is the fixed list of shapes (../shared/docs/performance-targets.md), one
timer, and the ratios against the baseline measured in the same run.

A row: {"section", "status": "ok" | "skipped" | "failed", the case's labels, its figures}. A case that
raises is recorded as failed with the error's first line, and the section goes on with the next.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # the pytest suites' pieces raise pytest.skip(...) where a case cannot run; without pytest only
    import pytest  # the attention and quant sections (which import those suites) fail, and say so

    _SKIPS: tuple = (pytest.skip.Exception,)
except ImportError:
    _SKIPS = ()

CUDA = torch.cuda.is_available()


@dataclass
class Context:
    """What every section needs to know about this run."""
    toy: bool  # tiny shapes, few repetitions: a CPU smoke run through Triton's interpreter
    deadline: float  # time.monotonic() after which a section starts no new case (its time box)
    model: str | None = None  # the GGUF (name or path) the decode section loads; None: random weights only

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def reps(self, n: int) -> int:
        return 1 if self.toy else n

    def warmup(self, n: int) -> int:
        return 0 if self.toy else n


class Unavailable(Exception):
    """This case cannot run here (a backend this GPU or torch lacks): recorded as skipped, not failed."""


def run_case(ctx: Context, section: str, measure, **labels) -> dict:
    """measure() -> figures (a dict); returns the row, whatever happens inside."""
    row = {"section": section, "status": "ok", **labels}
    if ctx.out_of_time():
        return {**row, "status": "skipped", "reason": "the section's time box was spent"}
    try:
        row.update(measure())
    except (Unavailable, *_SKIPS) as e:
        row.update(status="skipped", reason=str(e).splitlines()[0] if str(e) else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - one failing case is a result to record, not the end of the table
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.update(status="failed", reason=f"{type(e).__name__}: {first}"[:300])
    if CUDA:
        torch.cuda.empty_cache()
    return row


_FLUSH: list[torch.Tensor] = []


def median_seconds(fn, reps: int = 20, warmup: int = 5) -> float:
    """Median seconds of one call of fn, after `warmup` calls (compilation, autotuning).

    On a GPU each call is timed with CUDA events and the L2 cache is flushed before it (256 MB
    zeroed, as triton.testing.do_bench does), so a memory-bound kernel reads its operands from HBM
    as it would inside a model rather than from a cache the previous call warmed.
    """
    for _ in range(warmup):
        fn()
    times = []
    if not CUDA:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    torch.cuda.synchronize()
    for _ in range(reps):
        _FLUSH[0].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    return statistics.median(times)


def first_call_seconds(fn) -> float:
    """Wall seconds of one call including its GPU work: compilation and autotuning show up here."""
    t0 = time.perf_counter()
    fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# --- attention: minillm's Triton kernel against SDPA's flash and cuDNN backends ----------------

# (D, N, causal): the rows of the targets file's attention table; B·N = 16k tokens, H·D = 2048.
ATTENTION_SHAPES = [(64, 1024, False), (64, 4096, True), (128, 1024, True), (128, 4096, False),
                    (128, 4096, True), (128, 16384, True)]
TOY_ATTENTION_SHAPES = [(16, 32, False), (16, 32, True)]  # B·N = 64, H·D = 32: the interpreter is slow
ATTENTION_PROVIDERS = ("sdpa_flash", "sdpa_cudnn", "triton")  # the baselines first: ratios need them


def attention(ctx: Context):
    """fwd and bwd TFLOP/s per shape and provider; the kernel's ratio to each SDPA backend."""
    from bench.test_attention import BACKENDS, attention_fn, relative_error

    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter has no bf16 dot
    tokens, width = (64, 32) if ctx.toy else (16384, 2048)
    for D, N, causal in TOY_ATTENTION_SHAPES if ctx.toy else ATTENTION_SHAPES:
        B, H = tokens // N, width // D
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g) for _ in range(4))
        for direction in ("fwd", "bwd"):
            flops = 4 * B * H * N * N * D // (2 if causal else 1) * (2.5 if direction == "bwd" else 1)
            seconds = {}

            def measure(provider):
                fn = attention_fn(provider, causal)
                leaves = [t.clone().requires_grad_(direction == "bwd") for t in (q, k, v)]
                try:
                    out = fn(*leaves)
                except RuntimeError as e:  # a forced SDPA backend that cannot take this device/dtype/shape
                    if provider in BACKENDS:
                        raise Unavailable(f"{provider} unavailable here: {str(e).splitlines()[0]}") from None
                    raise
                # correctness once, against SDPA's default choice, as bench/test_attention.py checks
                ref_leaves = [t.clone().requires_grad_(direction == "bwd") for t in (q, k, v)]
                ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=causal)
                err = relative_error(out, ref)
                if direction == "fwd":
                    with torch.no_grad():
                        t = median_seconds(lambda: fn(q, k, v), ctx.reps(20), ctx.warmup(5))
                else:
                    got = torch.autograd.grad(out, leaves, do, retain_graph=True)
                    want = torch.autograd.grad(ref, ref_leaves, do)
                    err = max([err] + [relative_error(a, b) for a, b in zip(got, want)])
                    t = median_seconds(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True),
                                       ctx.reps(20), ctx.warmup(5))  # the backward alone
                if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                    raise AssertionError(f"{provider} differs from SDPA: relative error {err:.3g}")
                seconds[provider] = t
                figures = {"ms": t * 1e3, "tflops": flops / t / 1e12, "rel_err": err}
                for base in ("sdpa_flash", "sdpa_cudnn"):
                    if base in seconds:
                        figures[f"vs_{base.removeprefix('sdpa_')}"] = seconds[base] / t
                return figures

            for provider in ATTENTION_PROVIDERS:
                yield run_case(ctx, "attention", lambda: measure(provider), D=D, N=N, causal=causal,
                               direction=direction, provider=provider, B=B, H=H,
                               dtype=str(dtype).removeprefix("torch."))


# --- weight-only quantized matmul at decode sizes -----------------------------------------------

QUANT_PROVIDERS = ("bf16", "torch-int4", "int8", "int4")  # the baselines first


def quant(ctx: Context):
    """µs per call and GB/s of weights read, for M = 1 and 16; ratios to bf16 F.linear and tinygemm."""
    from bench import test_quant_matmul as qm  # its SIZE ("quick" in --toy) picks the shapes and group
    from minillm.compress.quant import dequantize

    dev = "cuda" if CUDA else "cpu"
    for M in (1, 16):
        for K, N in qm.SHAPES:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dev, torch.bfloat16)
            seconds = {}

            def measure(provider):
                fn = qm.make_fn(provider, K, N, x)  # pytest.skip(...) where tinygemm cannot run
                # correctness once: against fp32 x @ Ŵᵀ, allowing twice bf16 F.linear's own error
                L = qm.layer(K, N)
                scheme = "int8" if "int8" in provider else "int4"
                w = (L["bf16"].float() if provider == "bf16" else
                     dequantize(scheme, L[scheme]["weight_q"], L[scheme]["scales"], L[scheme].get("zeros")))
                ref = x.float() @ w.T  # (M, N)
                bf16_err = (F.linear(x, w.bfloat16()).float() - ref).abs().max().item()
                err = (fn().float() - ref).abs().max().item()
                if err > 2 * bf16_err + 1e-2:
                    raise AssertionError(f"{provider}: max error {err:.3g} vs bf16 F.linear's {bf16_err:.3g}")
                t = median_seconds(fn, ctx.reps(50), ctx.warmup(10))
                seconds[provider] = t
                figures = {"us": t * 1e6, "weight_gbps": qm.weight_bytes(provider, K, N) / t / 1e9}
                if "bf16" in seconds:
                    figures["vs_bf16"] = seconds["bf16"] / t
                if "torch-int4" in seconds:
                    figures["vs_tinygemm"] = seconds["torch-int4"] / t
                return figures

            for provider in QUANT_PROVIDERS:
                yield run_case(ctx, "quant", lambda: measure(provider), M=M, K=K, N=N, provider=provider,
                               group=qm.GROUP if "int4" in provider else None)


# --- the baby GPT's training step: minillm against nanoGPT's recipe ----------------------------

# nanoGPT's config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, block 256, batch 64;
# AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, clip 1.0, bf16 autocast, torch.compile.
# Dropout is 0 for both (the recipe's 0.2 changes the function, not the speed, and keeps the
# loss check below exact). --toy shrinks it to 2 layers × 32 wide, block 32, batch 2.
TRAIN_CASES = [("nanoGPT", False), ("minillm sdpa", False), ("minillm triton", False),
               ("nanoGPT", True), ("minillm sdpa", True)]  # (provider, torch.compile); the yardstick first


def nanogpt_optimizer(model, lr: float, weight_decay: float, betas, device_type: str):
    """nanoGPT's configure_optimizers: weight decay on ≥ 2-D tensors only, fused AdamW on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if device_type == "cuda" else {}))


def train(ctx: Context):
    """ms per step, tokens/s and MFU of one optimizer step; minillm's ratio to nanoGPT's (same compile)."""
    from bench.common import peak_tflops
    from bench.nanogpt import from_minillm
    from minillm.model.config import ModelConfig
    from minillm.model.transformer import build_model, count_parameters, flops_per_token
    from minillm.train.fit import fit_step
    from minillm.train.optim import make_optimizer

    dev = torch.device("cuda" if CUDA else "cpu")
    small = dict(n_layer=2, n_head=2, n_embd=32, block_size=32) if ctx.toy else {}
    B = 2 if ctx.toy else 64
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)

    def minillm_model(attention: str):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("char-small", positional="learned", dropout=0.0, attention=attention, **small)
        return build_model(cfg).to(dev)

    cfg = minillm_model("naive").cfg
    T = cfg.block_size
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(dev) for _ in range(2))
    flops = flops_per_token(cfg, count_parameters(minillm_model("naive"), non_embedding=True))["train"] * B * T
    peak = peak_tflops()
    seconds = {}

    def measure(provider: str, compiled: bool):
        ours = minillm_model("sdpa" if provider == "nanoGPT" else provider.split()[-1])
        if provider == "nanoGPT":
            model = from_minillm(ours).train()  # the same weights in nanoGPT's modules
            with torch.no_grad():  # correctness once: nanoGPT's loss equals minillm's on the same batch (fp32)
                tol = 1e-3 if CUDA else 1e-4
                torch.testing.assert_close(model(x, y)[1], ours(x, y)[1], rtol=tol, atol=tol)
            opt = nanogpt_optimizer(model, 1e-3, 0.1, (0.9, 0.99), dev.type)
        else:
            model = ours
            opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), dev.type)
        # --toy compiles through dynamo without code generation ("eager"): the same path, in seconds
        net = torch.compile(model, backend="eager" if ctx.toy else "inductor") if compiled else model

        def amp_loss(m, batch, step):
            with amp:
                return net(batch["x"], batch["y"])[1]

        if provider == "nanoGPT":  # nanoGPT train.py's step (without its GradScaler: bf16 needs none)
            def step():
                with amp:
                    _, loss = net(x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:  # the step every minillm loop but the showpiece shares
            def step():
                fit_step(model, opt, {"x": x, "y": y}, 0, 1e-3, grad_clip=1.0, loss_fn=amp_loss)

        first = first_call_seconds(step)
        t = median_seconds(step, ctx.reps(20), ctx.warmup(3))
        seconds[(provider, compiled)] = t
        figures = {"ms": t * 1e3, "tokens_per_s": B * T / t, "first_step_s": first}
        if peak is not None:
            figures["mfu"] = flops / t / 1e12 / peak
        if ("nanoGPT", compiled) in seconds:
            figures["vs_nanogpt"] = seconds[("nanoGPT", compiled)] / t
        return figures

    shape = f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}, block {T}, batch {B}"
    for provider, compiled in TRAIN_CASES:
        yield run_case(ctx, "train", lambda: measure(provider, compiled), model=shape, provider=provider,
                       compiled=compiled)

