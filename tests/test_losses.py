"""The written-out cross-entropy equals F.cross_entropy and stays finite for huge logits."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.model.losses import cross_entropy, logsumexp, next_token_targets


def test_cross_entropy_matches_torch_even_scaled_1000x():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 6, 50), torch.randint(0, 50, (4, 6))
    for scale in (1.0, 1000.0):
        ours = cross_entropy(logits * scale, targets)
        assert torch.isfinite(ours)
        assert_close(ours, F.cross_entropy((logits * scale).view(-1, 50), targets.view(-1)))


def test_ignore_index_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(10, 7, requires_grad=True)
    targets = torch.randint(0, 7, (10,))
    targets[::3] = -100
    ours = cross_entropy(logits, targets)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets, ignore_index=-100)
    assert_close(ours, ref)
    ours.backward(), ref.backward()
    assert_close(logits.grad, ref_logits.grad)
    assert cross_entropy(logits, torch.full((10,), -100)).item() == 0.0


def test_logsumexp_and_shift():
    x = torch.randn(3, 9) * 300
    assert_close(logsumexp(x), torch.logsumexp(x, -1))
    idx = torch.tensor([[5, 6, 7]])
    assert next_token_targets(idx).tolist() == [[6, 7, -100]]
