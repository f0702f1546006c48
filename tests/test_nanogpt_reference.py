"""bench/nanogpt.py, the yardstick of bench/decode.py: the same function as minillm's CausalLM.

Speed ratios against it mean something only if it computes what minillm computes: with minillm's
weights copied in, its logits and its greedy tokens (past block_size too) must be minillm's.
"""

import pytest
import torch

from bench.nanogpt import from_minillm
from minillm.generate.sampling import generate
from minillm.model.config import ModelConfig
from minillm.model.transformer import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def twin(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                positional="learned"), **kw})
    model = CausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits, so greedy picks are not near-ties
        model.transformer.tok_emb.weight.mul_(20.0)
    return model, from_minillm(model)


@pytest.mark.parametrize("bias", [True, False])
def test_the_nanogpt_twin_computes_minillms_logits(bias):
    ours, theirs = twin(bias=bias)
    idx = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(idx)[0]
        torch.testing.assert_close(theirs(idx, targets=idx)[0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(idx)[0], want[:, -1:], atol=1e-5, rtol=1e-5)  # last position only


def test_nanogpt_generate_matches_minillms_sliding_window_and_samples_from_the_same_model():
    ours, theirs = twin()
    idx = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    want = theirs.generate_greedy(idx, 30)  # 35 tokens: past block_size = 16
    assert torch.equal(generate(ours, idx, 30, 0.0, window_stride=1), want)
    torch.manual_seed(0)
    out = theirs.generate(idx, 30, temperature=0.8, top_k=5)  # sample.py's path: global RNG
    assert out.shape == (2, 35) and torch.equal(out[:, :5], idx)


def test_only_a_nanogpt_shaped_model_has_a_twin():
    torch.manual_seed(0)
    rotary = CausalLM(ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32, positional="rotary"))
    with pytest.raises(ValueError, match="positional"):
        from_minillm(rotary)
