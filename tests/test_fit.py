"""The shared training step and loop (minillm/train/fit.py): the step is PyTorch's AdamW step written by
hand, evaluation comes where the docstring says, and evaluation time is not training time."""

import math
import time

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM
from minillm.train.fit import fit, fit_step, finetune
from minillm.train.optim import lr_at, make_optimizer, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU
CFG = dict(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**CFG))


def batch_of(step: int) -> dict:
    """A fixed batch per step, drawn from its own generator: the same for every model."""
    x = torch.randint(CFG["vocab_size"], (4, 8), generator=torch.Generator().manual_seed(step))
    return {"idx": x, "targets": torch.roll(x, -1, 1)}


def test_fit_equals_the_loop_written_with_torch_builtins():
    """fit_step = lr, forward, backward, clip ‖g‖, AdamW, zero grads; checked against torch's own pieces."""
    model, reference = tiny(), tiny()
    schedule = lambda step: lr_at(step, 1e-2, 1e-3, 2, 6)  # noqa: E731
    losses = []
    fit(model, make_optimizer(model, 1e-2, 0.1, (0.9, 0.99)), batch_of, steps=6, schedule=schedule,
        grad_clip=0.5, on_step=lambda step, loss, lr: losses.append(loss.item()))

    opt = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.99))  # decay: 2-D weights
    expected = []
    reference.train()
    for step in range(6):
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        loss = reference(**batch_of(step))[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_fit_step_returns_the_loss_detached_and_leaves_no_gradient():
    model = tiny()
    loss = fit_step(model, make_optimizer(model, 1e-3, 0.0, (0.9, 0.99)), batch_of(0), 0, lr=1e-3, grad_clip=1.0)
    assert not loss.requires_grad and math.isfinite(loss.item())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("start, eval_first, expected", [(0, True, [0, 4, 8, 10]), (4, False, [8, 10]),
                                                          (4, True, [4, 8, 10]), (10, True, [10])])
def test_evaluation_comes_at_multiples_of_the_interval_and_at_the_end(start, eval_first, expected):
    model, seen, stepped = tiny(), [], []

    def evaluate(step):
        assert len(stepped) == step - start  # before that step's update, after the ones before it
        model.eval()  # fit puts the model back into training mode
        seen.append(step)

    def on_step(step, loss, lr):
        assert model.training
        stepped.append(step)

    fit(model, make_optimizer(model, 1e-3, 0.0, (0.9, 0.99)), batch_of, steps=10, schedule=lambda s: 1e-3,
        start=start, evaluate=evaluate, eval_interval=4, eval_first=eval_first, on_step=on_step)
    assert seen == expected and stepped == list(range(start, 10))


def test_evaluation_time_is_not_training_time():
    model = tiny()
    train_s = fit(model, make_optimizer(model, 1e-3, 0.0, (0.9, 0.99)), batch_of, steps=2, schedule=lambda s: 1e-3,
                  evaluate=lambda step: time.sleep(0.3), eval_interval=1)
    assert 0 < train_s < 0.3  # three evaluations slept 0.9 s; two tiny steps take milliseconds


def test_finetune_on_text_same_seed_same_losses_and_the_model_left_in_eval_mode():
    tokens = torch.randint(CFG["vocab_size"], (500,), generator=torch.Generator().manual_seed(0))
    a, b = tiny(), tiny()
    losses_a = finetune(a, tokens, 5, batch_size=4, learning_rate=1e-2, warmup_iters=1)
    losses_b = finetune(b, tokens, 5, batch_size=4, learning_rate=1e-2, warmup_iters=1)
    assert losses_a == losses_b and len(losses_a) == 5 and not a.training
    assert finetune(tiny(), tokens, 0) == []
    with pytest.raises(ValueError, match="iters must be >= 0"):
        finetune(tiny(), tokens, -1)
