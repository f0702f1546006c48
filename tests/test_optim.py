"""The written-out AdamW and gradient clipping equal their PyTorch twins; the schedule has its shape.

AdamW is compared with torch.optim.AdamW over 100 steps on a small model with both weight-decay groups
(so decay on matrices and none on embeddings/norms/biases are both exercised), and its state goes
through the checkpoint's train-state file (train/state.py) and comes back able to continue the run.
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from minillm.train.optim import AdamW, clip_grad_norm, lr_at, make_optimizer, param_groups
from minillm.train.state import load_train_state, save_train_state


class TinyNet(nn.Module):
    """Embedding → Linear → LayerNorm → Linear: one parameter of every kind param_groups tells apart."""

    def __init__(self, V: int = 50, C: int = 16):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.fc = nn.Linear(C, 2 * C)
        self.ln = nn.LayerNorm(2 * C)
        self.head = nn.Linear(2 * C, V, bias=False)

    def forward(self, idx):  # idx (B, T) -> logits (B, T, V)
        return self.head(self.ln(torch.relu(self.fc(self.wte(idx)))))


def make_pair(seed: int = 0):
    torch.manual_seed(seed)
    ours = TinyNet()
    theirs = TinyNet()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def train_steps(model, opt, n, seed, clip=0.0):
    """n steps of next-token loss on random batches drawn from their own generator (same for both)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 50, (4, 9), generator=gen)
        logits = model(idx[:, :-1])  # (B, T, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            clip_grad_norm(model, clip)
        opt.step()


def test_param_groups_decay_matrices_only():
    model, _ = make_pair()
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.fc.weight), id(model.head.weight)}
    assert id(model.wte.weight) in {id(p) for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_adamw_matches_torch_over_100_steps():
    ours, theirs = make_pair()
    opt = make_optimizer(ours, 3e-3, 0.1, (0.9, 0.95), readable=True)
    ref = torch.optim.AdamW(param_groups(theirs, 0.1), lr=3e-3, betas=(0.9, 0.95))
    assert isinstance(opt, AdamW)
    start = ours.fc.weight.detach().clone()
    for step in range(100):  # a changing learning rate, as the trainer's schedule gives
        lr = lr_at(step, 3e-3, 3e-4, warmup_iters=10, lr_decay_iters=100)
        for o in (opt, ref):
            for g in o.param_groups:
                g["lr"] = lr
        train_steps(ours, opt, 1, seed=step)
        train_steps(theirs, ref, 1, seed=step)
    assert (ours.fc.weight - start).abs().max() > 1e-2  # the weights moved: not two idle models compared
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(p, q), name  # on CPU the same float operations in the same order: bit-identical
    for p, q in zip(ours.parameters(), theirs.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-6)


def test_adamw_decay_is_decoupled():
    """With a zero gradient, Adam's step is 0 and only θ(1 - lr·λ) remains (L2-in-the-gradient would not)."""
    w = nn.Parameter(torch.ones(3))
    opt = AdamW([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(3)
    opt.step()
    assert_close(w.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_adamw_state_survives_the_train_state_file(tmp_path):
    """Save after 20 steps, load into a fresh optimizer, 20 more steps: the same as 40 uninterrupted."""
    straight, resumed = make_pair(seed=1)
    opt_a = AdamW(param_groups(straight, 0.1), lr=1e-2, betas=(0.9, 0.99))
    train_steps(straight, opt_a, 20, seed=5)

    opt_b = AdamW(param_groups(resumed, 0.1), lr=1e-2, betas=(0.9, 0.99))
    train_steps(resumed, opt_b, 20, seed=5)
    save_train_state(tmp_path, opt_b, torch.Generator(), step=20, best_val_loss=1.0)
    fresh = AdamW(param_groups(resumed, 0.1), lr=1e-3, betas=(0.5, 0.5))  # wrong hyper-parameters, restored
    load_train_state(tmp_path, fresh, torch.Generator())
    assert fresh.param_groups[1]["betas"] == (0.9, 0.99) and fresh.param_groups[0]["lr"] == 1e-2
    assert all(torch.is_tensor(v) for s in fresh.state.values() for v in s.values())

    train_steps(straight, opt_a, 20, seed=6)
    train_steps(resumed, fresh, 20, seed=6)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_torch_adamw_state_loads_into_ours():
    """A checkpoint written with torch's AdamW resumes with ours, and the next step is the same."""
    ours, theirs = make_pair(seed=2)
    ref = torch.optim.AdamW(param_groups(theirs, 0.1), lr=1e-2)
    train_steps(theirs, ref, 5, seed=3)
    ours.load_state_dict(theirs.state_dict())
    opt = AdamW(param_groups(ours, 0.1), lr=1e-2)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from a file: no tensor shared with ref
    train_steps(theirs, ref, 3, seed=4)
    train_steps(ours, opt, 3, seed=4)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.05, 1e3, 0.0])  # clipped, left alone, clipping disabled
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = make_pair(seed=3)
    idx = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    for m in (ours, theirs):
        nn.functional.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    norm = clip_grad_norm(ours, max_norm)
    if max_norm > 0:
        ref = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    else:  # clipping disabled: the norm is still reported, the gradients untouched
        ref = torch.nn.utils.get_total_norm([p.grad for p in theirs.parameters()])
    assert_close(norm, ref)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours.parameters()]))
    if max_norm == 0.05:
        assert norm > 0.05 and abs(after.item() - 0.05) < 1e-5  # really clipped, to max_norm
    else:
        assert_close(after, norm)


def test_lr_schedule_warms_up_decays_and_floors():
    lrs = [lr_at(t, 1.0, 0.1, warmup_iters=10, lr_decay_iters=100) for t in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1) and lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warm-up
