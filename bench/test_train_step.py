"""One training step (forward, backward, clip, AdamW) of the model presets: tokens/s and MFU.

    pytest bench/test_train_step.py                          sizes from bench.common.SIZE
    pytest bench/test_train_step.py --bench-size=full --benchmark-json=train.json    a GPU run

"quick" (CPU, CI): every preset shrunk to 2 layers × 128 wide, block 64, vocab 512, batch 4, so the
suite only checks that each architecture trains. "full" (GPU): the presets at their real sizes
(gpt2: nanoGPT's bench.py step, batch 12 × 1024 tokens), bf16 autocast. FLOPs per step are
6·N + 12·L·T·C per token (minillm.model.transformer.flops_per_token), the figure MFU is quoted against.
Providers are the attention implementations; each case first checks that its loss equals the
naive (readable) attention's on the same weights and batch, then times the step.
"""

from __future__ import annotations

import pytest
import torch

from bench import common
from minillm.model.config import ModelConfig
from minillm.model.transformer import build_model, count_parameters, flops_per_token
from minillm.train.optim import clip_grad_norm, make_optimizer

PRESETS = ["tiny", "char-small", "gpt2", "bert-tiny", "llama-style"]
PROVIDERS = common.pick(quick=["naive", "sdpa"], full=["naive", "sdpa", "triton"])
QUICK = dict(n_layer=2, n_embd=128, n_head=4, block_size=64, vocab_size=512, ffn_hidden=0)
BATCH = {"gpt2": 12, "llama-style": 8}  # full-size batch per preset (default 32)


def config(preset: str, provider: str) -> tuple[ModelConfig, int]:
    cfg = ModelConfig.from_preset(preset, attention=provider, dropout=0.0)
    if common.SIZE == "quick":
        cfg = ModelConfig.from_preset(preset, attention=provider, dropout=0.0, **QUICK)
        return cfg, 4
    return cfg, BATCH.get(preset, 32)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset", PRESETS)
def test_train_step(benchmark, preset, provider):
    dev = common.device()
    if provider == "triton" and dev.type != "cuda":
        pytest.skip("the Triton attention is timed on a GPU only")
    cfg, B = config(preset, provider)
    T = cfg.block_size
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.99), dev.type)
    use_amp = dev.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(dev)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(dev)  # next tokens / MLM labels

    # correctness once: the provider's loss equals the readable attention's on the same weights
    reference = build_model(ModelConfig(**{**cfg.to_dict(), "attention": "naive"})).to(dev)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad(), amp:
        loss, ref = model(x, y)[1], reference(x, y)[1]
    del reference
    tol = 2e-2 if use_amp else 1e-4
    torch.testing.assert_close(loss.float(), ref.float(), rtol=tol, atol=tol)
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 1.0  # ≈ ln V at init

    def step():
        with amp:
            _, loss = model(x, y)
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    benchmark(common.synchronized(step))
    flops = flops_per_token(cfg, count_parameters(model, non_embedding=True))["train"] * B * T
    common.record(benchmark, flops=flops, tokens=B * T, provider=provider, preset=preset,
                  batch=B, seq_len=T, params=count_parameters(model))
