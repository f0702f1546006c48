"""Seq2Seq with attention="triton" computes what the readable Seq2Seq computes: the FlashAttention kernel
serves bidirectional encoder self-attention, causal decoder self-attention and cross-attention
(non-causal, Tq ≠ Tk, source key padding). Without a GPU the kernel runs in Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():  # must happen before the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton kernels need: pip install 'minillm[kernels]'")

from minillm.model.config import ModelConfig  # noqa: E402
from minillm.model.seq2seq import Seq2Seq, Seq2SeqConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_seq2seq_matches_naive_logits_and_gradients():
    torch.manual_seed(0)
    models = []
    for impl in ("naive", "triton"):
        cfg = Seq2SeqConfig(ModelConfig(vocab_size=16, n_embd=32, n_head=2, block_size=32, attention=impl),
                            n_enc_layer=1, n_dec_layer=1)
        models.append(Seq2Seq(cfg).to(DEVICE))
    ref, fast = models
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 16, (2, 11), generator=g).to(DEVICE)
    tgt = torch.randint(3, 16, (2, 8), generator=g).to(DEVICE)
    src[1, 7:] = 0  # source padding: a key-padding mask for encoder self-attention and cross-attention
    tgt[1, 6:] = 0
    (lr, loss_r), (lf, loss_f) = ref(src, tgt[:, :-1], tgt[:, 1:]), fast(src, tgt[:, :-1], tgt[:, 1:])
    real = tgt[:, :-1] != 0
    torch.testing.assert_close(lf[real], lr[real], atol=2e-5, rtol=1e-4)
    loss_r.backward()
    loss_f.backward()
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, atol=2e-5, rtol=1e-4, msg=name)
