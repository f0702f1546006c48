"""The written-out softmax and cross-entropy equal F.softmax and F.cross_entropy, gradients included,
and stay finite for huge logits (×1000, where exp() without the max subtracted overflows)."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minillm.model.losses import causal_lm_loss, cross_entropy, logsumexp, mlm_loss, next_token_targets, softmax


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


def twin(x):
    """Two independent leaves holding the same numbers: one for ours, one for PyTorch's."""
    return x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()


def test_naive_softmax_overflows_at_1000x():
    """Why the max is subtracted: exp(1000·z) is inf in fp32 and inf/inf is NaN."""
    z = torch.tensor([1.0, 2.0, 3.0]) * 1000
    assert torch.isnan(torch.exp(z) / torch.exp(z).sum()).any()
    assert torch.isfinite(softmax(z)).all()


def test_softmax_matches_torch_with_gradients_even_scaled_1000x():
    torch.manual_seed(0)
    base = torch.randn(3, 5, 40)
    w = torch.randn(3, 5, 40)  # a loss Σ w·softmax(x), so the backward is not trivially zero
    for scale in (1.0, 1000.0):
        for dim in (-1, 1):
            ours_x, ref_x = twin(base * scale)
            ours, ref = softmax(ours_x, dim=dim), F.softmax(ref_x, dim=dim)
            assert torch.isfinite(ours).all()
            assert_close(ours, ref)
            (ours * w).sum().backward(), (ref * w).sum().backward()
            assert torch.isfinite(ours_x.grad).all()
            assert_close(ours_x.grad, ref_x.grad)


def test_cross_entropy_gradient_with_ignore_index_even_scaled_1000x():
    torch.manual_seed(1)
    logits, targets = torch.randn(6, 7, 30), torch.randint(0, 30, (6, 7))
    targets[:, ::4] = -100
    for scale in (1.0, 1000.0):
        ours_x, ref_x = twin(logits * scale)
        ours = causal_lm_loss(ours_x, targets)
        ref = F.cross_entropy(ref_x.view(-1, 30), targets.view(-1), ignore_index=-100, label_smoothing=0.0)
        assert torch.isfinite(ours)
        assert_close(ours, ref)
        ours.backward(), ref.backward()
        assert torch.isfinite(ours_x.grad).all()
        assert_close(ours_x.grad, ref_x.grad)
        assert torch.all(ours_x.grad[:, ::4] == 0)  # an ignored position gets no gradient


def test_mlm_loss_counts_only_the_masked_positions():
    torch.manual_seed(2)
    logits = torch.randn(2, 12, 20)
    labels = torch.full((2, 12), -100)
    labels[0, 3], labels[1, 7], labels[1, 8] = 4, 9, 0  # three masked tokens of 24
    picked = torch.stack([logits[0, 3], logits[1, 7], logits[1, 8]])  # (3, V)
    assert_close(mlm_loss(logits, labels), F.cross_entropy(picked, torch.tensor([4, 9, 0])))
