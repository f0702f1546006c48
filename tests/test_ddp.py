"""Distributed data parallel: 2 CPU processes (gloo) compute exactly what 1 process does on the same batch.

Each process takes its slice of a global batch drawn from a generator seeded the same everywhere,
and DDP averages the gradients, so `torchrun --nproc_per_node=2` with gradient_accumulation_steps=2
(one micro-batch per process) must match one process accumulating the same two micro-batches.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from minillm.weights.checkpoint import load_model
from minillm.model.config import ModelConfig
from minillm.train import TrainConfig, train

TEXT = "All the world's a stage,\nAnd all the men and women merely players;\n" * 30
STEPS = 6


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(out_dir / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.skipif(not dist.is_available(), reason="this PyTorch build has no torch.distributed")
@pytest.mark.parametrize("ddp_accum", [2, 1], ids=["accum2", "accum1-rounded-up"])
def test_two_process_ddp_matches_single_process(tmp_path, ddp_accum):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    common = dict(max_iters=STEPS, eval_interval=STEPS, eval_iters=1, log_interval=1, batch_size=4,
                  gradient_accumulation_steps=2, learning_rate=1e-2, warmup_iters=2, device="cpu",
                  cache_dir=str(tmp_path / "cache"))
    model = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)

    # accumulation 1 over 2 processes (the default, as the torchrun line in docs/guides/pretrain.md runs it) is rounded
    # up to one micro-batch per process: the same global batch as accumulation 2
    ddp_args = {**common, **model, "gradient_accumulation_steps": ddp_accum}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minillm.cli", "train", "--preset=tiny", "--data", str(corpus), "--sample_tokens=0",
           f"--out_dir={tmp_path / 'ddp'}", *[f"--{k}={v}" for k, v in ddp_args.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout
    assert ("using 2 (one or more micro-batches per process)" in run.stdout) == (ddp_accum == 1)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(ModelConfig(**model), TrainConfig(**common, out_dir=str(tmp_path / "single")), str(corpus),
              progress=False)
    finally:
        torch.set_num_threads(n)

    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(ddp) == len(single) == STEPS
    # the same sums in a different order (gradients all-reduced across processes): equal to fp32 rounding
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-5, atol=1e-5)
    m_ddp, _, _ = load_model(tmp_path / "ddp")
    m_single, _, _ = load_model(tmp_path / "single")
    for (name, a), b in zip(m_ddp.state_dict().items(), m_single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
